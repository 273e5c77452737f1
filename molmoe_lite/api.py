"""``molmoe_lite.load``: a checkpoint folder (or hub id) to a ready ``MolmoE`` with its processor.

Method: read config.json ourselves (no remote code) and build the model on the meta
device (no memory, no random init). A quantised checkpoint (config.json has our
``quantization_config``) or a request to quantise on the fly swaps the meta experts
(and, when asked, attention and lm_head linears) for quantised modules first. The
checkpoint's keys and shapes are checked against the model's own state dict in one
pass (one error naming every problem); then the tensors stream one at a time, each
converted to its parameter's dtype and device, and are assigned into the model
(``load_state_dict(assign=True)``): no tensor is held twice, and when quantising on the
fly one layer's float experts are read, quantised and dropped before the next layer.
On the CPU each layer's quantised experts are repacked for the CPU kernels as soon as they
are read, and the pages of the checkpoint a tensor came from are let go once it is copied,
so a load peaks near the size of the model it builds, not of the file.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from molmoe_lite.config import ConfigError, MolmoeConfig
from molmoe_lite.hub import resolve_model
from molmoe_lite.quantize.checkpoint import open_checkpoint, reading, release_pages, validate
from molmoe_lite.quantize.format import (FLOAT_DTYPES, QUANT_METHOD, QuantizedWeight, experts_prefix,
                                         quantize_layer_experts, quantize_weight, quantized_to_tensors)
from molmoe_lite.quantize.layout import expected_shapes
from molmoe_lite.errors import UsageError

_QUANTIZE = {"int4": 4, "int8": 8}


def pick_device(device: str | torch.device | None) -> torch.device:
    """CUDA when present, else CPU, unless the caller says otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"device {device!r} is not a device torch knows; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r}: CUDA is not available here (no NVIDIA GPU, or torch "
                         f"{torch.__version__} built without CUDA); use 'cpu'")
    return dev


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), read from its flags."""
    if str(torch.backends.cpu.get_cpu_capability()).upper().startswith("AMX"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads counted once)."""
    import os

    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores, cpu, ids = set(), None, {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "processor":
                    cpu, ids = int(value), {}
                elif key in ("physical id", "core id"):
                    ids[key] = value.strip()
                    if len(ids) == 2 and cpu in allowed:
                        cores.add((ids["physical id"], ids["core id"]))
    except (OSError, ValueError):
        pass
    return len(cores) or len(allowed) or 1


def set_threads(threads: int | None) -> int:
    """torch's CPU threads for this process: ``threads``, or every physical core by default."""
    if threads is None:
        threads = physical_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UsageError(f"threads must be a positive whole number, got {threads!r}")
    torch.set_num_threads(threads)
    return threads


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """On the CPU bfloat16 where it is native (AVX512-BF16, AMX), else float32; on GPUs
    bfloat16 where they have it, else float16 (Turing)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        try:
            return FLOAT_DTYPES[str(dtype).lower()]
        except KeyError:
            raise UsageError(f"dtype {dtype!r} is not one of float32, bfloat16, float16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_fast_bf16() else torch.float32


LINEAR_GROUPS = ("attention", "lm_head", "vision", "experts")


def float_linears(model, groups: Iterable[str]) -> Iterator[tuple[nn.Module, str, str]]:
    """(parent, attribute, full name) of the linears in the named groups that are still float.

    "attention": every decoder layer's att_proj and attn_out; "lm_head"; "vision": the ViT
    blocks' wq/wk/wv/wo and MLP w1/w2; "experts": each float expert's gate/up/down projections.
    """
    groups = set(groups)
    unknown = groups - set(LINEAR_GROUPS)
    if unknown:
        raise UsageError(f"unknown module groups {sorted(unknown)}; known: {', '.join(LINEAR_GROUPS)}")
    found = []
    for i, block in enumerate(model.model.transformer.blocks):
        prefix = f"model.transformer.blocks.{i}"
        if "attention" in groups:
            found += [(block.attn, a, f"{prefix}.attn.{a}") for a in ("att_proj", "attn_out")]
        if "experts" in groups and isinstance(block.mlp.experts, nn.ModuleList):
            found += [(expert, a, f"{prefix}.mlp.experts.{e}.{a}")
                      for e, expert in enumerate(block.mlp.experts) for a in ("gate_proj", "up_proj", "down_proj")]
    if "lm_head" in groups:
        found.append((model, "lm_head", "lm_head"))
    if "vision" in groups:
        for i, rb in enumerate(model.model.vision_backbone.image_vit.transformer.resblocks):
            prefix = f"model.vision_backbone.image_vit.transformer.resblocks.{i}"
            found += [(rb.attention, a, f"{prefix}.attention.{a}") for a in ("wq", "wk", "wv", "wo")]
            found += [(rb.feed_forward, a, f"{prefix}.feed_forward.{a}") for a in ("w1", "w2")]
    return iter([(p, a, n) for p, a, n in found if isinstance(getattr(p, a), nn.Linear)])


def quantize_structure(model, bits: int, group_size: int | None, modules: Iterable[str]) -> dict[str, tuple]:
    """Swap the (meta) float modules named by ``modules`` for empty quantised ones, in place.

    ``modules``: "experts" (every MoE layer's experts, as one stacked module per layer),
    or any of float_linears' groups ("attention", "lm_head", "vision").
    Returns {linear's full name: (bits, group size)} for the linears swapped.
    """
    from molmoe_lite.quantized import QuantizedExperts, QuantizedLinear

    modules = set(modules)
    unknown = modules - set(LINEAR_GROUPS)
    if unknown:
        raise ConfigError(f"quantization_config.modules has unknown entries: {sorted(unknown)}")
    cfg = model.config
    if "experts" in modules:
        for block in model.model.transformer.blocks:
            block.mlp.experts = QuantizedExperts(
                cfg.moe_num_experts, cfg.d_model, cfg.expert_hidden, bits, group_size, device="meta"
            )
    swapped = {}
    for parent, attr, name in float_linears(model, modules - {"experts"}):
        new = QuantizedLinear.like(getattr(parent, attr), bits, group_size)
        setattr(parent, attr, new)
        swapped[name] = (bits, new.group_size)
    return swapped


# The ``small`` preset, beyond the checkpoint's own quantisation: group -> (bits, group size).
# The ViT is int8 per channel: its 0.54 GiB in bf16 is the largest float piece left, and on
# the tiny random model int8 moves the image features by 1.9% where int4 moved them by 18%.
# The token embeddings stay in CPU memory (only looked-up rows travel).
SMALL_PRESET = {"attention": (4, 64), "lm_head": (4, 64), "vision": (8, None)}
SMALL_CPU_MODULES = ("model.transformer.wte",)


def small_preset_structure(model) -> dict[str, tuple]:
    """``quantize_structure`` for every group of SMALL_PRESET (meta model, before loading)."""
    swapped = {}
    for group, (bits, group_size) in SMALL_PRESET.items():
        swapped.update(quantize_structure(model, bits, group_size, [group]))
    return swapped


def _quantization(config: MolmoeConfig, folder: Path, quantize: str | None) -> dict[str, Any] | None:
    """The checkpoint's quantisation (from config.json) or the requested on-the-fly one, or None."""
    stored = config.raw.get("quantization_config")
    if stored is not None:
        if stored.get("quant_method") != QUANT_METHOD:
            raise ConfigError(
                f"{folder}/config.json: quantization_config.quant_method is {stored.get('quant_method')!r}; "
                f"only checkpoints written by `molmoe-lite quantize` ({QUANT_METHOD!r}) can be loaded"
            )
        if quantize is not None:
            raise UsageError(f"{folder} is already quantised; load it without --quantize (quantize=None)")
        return {**stored, "on_the_fly": False}
    if quantize is None:
        return None
    if quantize not in _QUANTIZE:
        raise UsageError(f"quantize must be one of {sorted(_QUANTIZE)}, got {quantize!r}")
    return {"bits": _QUANTIZE[quantize], "group_size": 64 if quantize == "int4" else None,
            "modules": ["experts"], "on_the_fly": True}


PRESETS = ("default", "small")


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    preset: str = "default",
    threads: int | None = None,
    progress: bool = True,
):
    """Load a MolmoE checkpoint folder (or hub id) for inference, processor attached.

    ``quantize`` ("int4" or "int8") quantises a float release's experts while loading,
    layer by layer; a folder written by ``molmoe-lite quantize`` loads quantised as is.
    ``preset="small"`` also quantises, while reading, every decoder linear to int4 (attention,
    lm_head) and the ViT's linears to int8 (SMALL_PRESET), and keeps the token embeddings in
    CPU memory: the smallest GPU footprint.
    ``dtype`` None: bfloat16 on GPUs and on CPUs with native bfloat16, else float32.
    ``threads``: torch's CPU threads for this process (default: every physical core).
    ``progress``: a progress bar on stderr when loading takes more than a few seconds.
    """
    if preset not in PRESETS:  # before any download or file access
        raise UsageError(f"preset must be one of {PRESETS}, got {preset!r}")
    set_threads(threads)
    from molmoe_lite.processor import Processor

    folder = resolve_model(path)
    config = MolmoeConfig.from_checkpoint(folder)  # sizes checked against the tensors, before building
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    quant = _quantization(config, folder, quantize)
    model, on_read, on_cpu = build_skeleton(config, dtype, quant, preset)
    # the model chose each tensor's dtype (fp32 norms in a float16 model, uint8 codes, fp16 scales)
    wanted = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    # on disk, a linear quantised on read holds its float weight (and its bias, if any, as is)
    quantised_leaves = ("qweight", "scales", "zeros")
    shapes = {k: shape for k, (shape, _) in wanted.items()
              if not (k.rpartition(".")[0] in on_read and k.rpartition(".")[2] in quantised_leaves)}
    shapes.update({f"{name}.weight": model.get_submodule(name).shape for name in on_read})
    state: dict[str, torch.Tensor] = {}
    on_the_fly = quant is not None and quant["on_the_fly"]
    # When every tensor is copied on its way in (to a GPU, another dtype, or while quantising a
    # float release), map a .bin shared: a private mapping of the 29 GB release is refused on
    # machines with less RAM + swap, and counts against a process's data limit.
    copies = device.type != "cpu" or dtype != torch.float32 or on_the_fly
    # on the CPU, each layer's experts go straight into the CPU kernels' layout
    cpu_experts = device.type == "cpu" and quant is not None and "experts" in quant.get("modules", ["experts"])
    pending = _ExpertRepacker(model, config, int(quant["bits"]), folder) if cpu_experts else None
    with open_checkpoint(folder, shared_mmap=copies) as reader, \
            _progress(len(reader.keys()), "loading", progress) as bar:
        if on_the_fly:
            validate(reader, expected_shapes(config.raw))  # a float release, checked whole
            _quantize_experts_while_loading(reader, config, quant, device, state, pending, progress)
        else:
            validate(reader, shapes)
        for key in reader.keys():
            bar.update(1)
            name, _, leaf = key.rpartition(".")
            if leaf == "weight" and name in on_read:
                bits, group_size = on_read[name]
                src = reader.get(key)
                qw = quantize_weight(src.float(), bits=bits, group_size=group_size, name=key)
                release_pages(src)  # the float weight is not needed again
                state.update({k: t.to(device) for k, t in quantized_to_tensors(name, qw).items()})
            elif pending is not None and pending.wants(key):
                pending.add(key, reader.get(key))
            elif key in wanted and key not in state:
                # one tensor at a time: each is converted before the next is read
                target = torch.device("cpu") if key.startswith(on_cpu) else device
                want = _stored_dtype(reader, key, target, wanted[key][1])
                # a tensor kept as stored is copied too: a view would keep the whole mapping
                # of the file alive, with every page a load touched still in this process
                state[key] = _converted(reader.get(key), target, want, own=copies or want != wanted[key][1])
        if pending is not None:
            pending.check_done()
        model.load_state_dict(state, assign=True, strict=True)
        state.clear()
    model.eval()
    model.processor = Processor.from_pretrained(folder)
    return model


# Kept in the checkpoint's narrower float dtype (bf16/fp16) when an fp32 model loads on a CPU:
# the token table is only looked up (the few rows of a step are widened), and the vision
# backbone runs once per image (each block widened for its own call). The values are the same
# as an fp32 copy's, in half the memory (0.8 GB for MolmoE-1B).
KEPT_NARROW = ("model.transformer.wte.", "model.vision_backbone.")


def _stored_dtype(reader, key: str, device: torch.device, wanted: torch.dtype) -> torch.dtype:
    """The dtype ``key`` is held in: the model's, or the checkpoint's own for KEPT_NARROW."""
    if device.type == "cpu" and wanted == torch.float32 and key.startswith(KEPT_NARROW):
        stored = reader.dtype(key)
        if stored in (torch.bfloat16, torch.float16):
            return stored
    return wanted


def _converted(src: torch.Tensor, device: torch.device, dtype: torch.dtype, own: bool) -> torch.Tensor:
    """``src`` (read from the checkpoint) on ``device`` in ``dtype``; with ``own``, never a view
    of the file's mapping."""
    t = src.to(device=device, dtype=dtype)
    if own and t.data_ptr() == src.data_ptr():
        # still a view of the mapping (a CPU tensor already in the wanted dtype): copy it, so
        # the model never writes into a shared mapping of the checkpoint
        t = t.clone()
    if t.data_ptr() != src.data_ptr():
        release_pages(src)  # its pages are not needed again
    return t


def build_skeleton(config: MolmoeConfig, dtype: torch.dtype, quant: dict[str, Any] | None,
                   preset: str = "default") -> tuple[Any, dict[str, tuple], tuple[str, ...]]:
    """The meta-device model ``load()`` fills: (model, linears to quantise as they are read ->
    (bits, group size), key prefixes that stay in CPU memory). ``quant``: as _quantization."""
    from molmoe_lite.model.molmoe import MolmoE

    if preset not in PRESETS:
        raise UsageError(f"preset must be one of {PRESETS}, got {preset!r}")
    with torch.device("meta"):
        model = MolmoE(config, dtype=dtype)
    if quant is not None:
        quantize_structure(model, int(quant["bits"]), quant.get("group_size"), quant.get("modules", ["experts"]))
    # the small preset's linears are quantised as they are read: no float copy reaches the device
    on_read = small_preset_structure(model) if preset == "small" else {}
    on_cpu = tuple(f"{name}." for name in SMALL_CPU_MODULES) if preset == "small" else ()
    return model, on_read, on_cpu


def weights_plan(config: MolmoeConfig, dtype: torch.dtype = torch.bfloat16, quantize: str | None = None,
                 preset: str = "default", folder: str | Path = ".",
                 device: str | torch.device = "cuda") -> dict[str, int]:
    """Bytes of weights ``load(folder, device, dtype, quantize, preset)`` would put on the device
    (a GPU unless ``device`` says otherwise) and in CPU memory, without loading: shapes and dtypes
    of the meta skeleton, so it is instant at full size. On the CPU, as load holds them: quantised
    experts in the CPU kernels' layout (with a copy of their scales when quantised while loading),
    and in a float32 model the KEPT_NARROW tensors in the checkpoint's dtype, read from the header
    of the checkpoint in ``folder`` (the only case that reads it; otherwise it names it in errors).
    """
    from molmoe_lite.kernels.cpu_experts import cpu_layout_nbytes
    from molmoe_lite.quantized import QuantizedExperts

    quant = _quantization(config, Path(folder), quantize)
    device = torch.device(device)
    model, _, on_cpu = build_skeleton(config, dtype, quant, preset)
    state = model.state_dict()
    sizes = {key: t.numel() * t.element_size() for key, t in state.items()}
    if device.type == "cpu" and dtype == torch.float32 and any(k.startswith(KEPT_NARROW) for k in state):
        with open_checkpoint(folder) as reader:
            for key in state:
                # not the ViT linears the small preset quantises on read: the file holds their floats
                if key.startswith(KEPT_NARROW) and key in reader:
                    sizes[key] = state[key].numel() * _stored_dtype(reader, key, device, state[key].dtype).itemsize
    if device.type == "cpu":  # each layer's experts are repacked as they are read
        for name, module in model.named_modules():
            if isinstance(module, QuantizedExperts):
                for leaf in ("w13", "w2"):
                    w = getattr(module, leaf)
                    for key in [k for k in sizes if k.startswith(f"{name}.{leaf}.")]:
                        del sizes[key]
                    sizes[f"{name}.{leaf}"] = cpu_layout_nbytes(w.shape, w.bits, w.group_size, quant["on_the_fly"])
    plan = {"device_bytes": 0, "cpu_bytes": 0}
    for key, n in sizes.items():
        plan["cpu_bytes" if key.startswith(on_cpu) else "device_bytes"] += n
    return plan


def _quantize_experts_while_loading(reader, config: MolmoeConfig, quant: dict, device, state: dict,
                                    repacker: "_ExpertRepacker | None" = None, progress: bool = True) -> None:
    """Read each layer's float experts, quantise them, keep only the quantised tensors (on the
    CPU: repacked for the CPU kernels at once)."""
    with _progress(config.n_layers, "quantising experts", progress, unit="layer") as bar:
        for layer in range(config.n_layers):
            read: list[torch.Tensor] = []

            def get(key: str) -> torch.Tensor:
                read.append(reader.get(key))
                return read[-1]

            w13, w2 = quantize_layer_experts(
                get, layer, config.moe_num_experts, bits=int(quant["bits"]), group_size=quant["group_size"]
            )
            for t in read:  # this layer's float experts: their pages are not needed again
                release_pages(t)
            read.clear()
            prefix = experts_prefix(layer)
            for name, qw in (("w13", w13), ("w2", w2)):
                if repacker is not None:
                    repacker.take(layer, name, qw)
                    continue
                for key, t in quantized_to_tensors(f"{prefix}.{name}", qw).items():
                    state[key] = t.to(device)
            bar.update(1)


def _progress(total: int, desc: str, enabled: bool, unit: str = "tensor"):
    """A tqdm bar on stderr that shows itself only when the work takes more than a few seconds."""
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, delay=3, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=False)


class _ExpertRepacker:
    """Collects each layer's quantised expert tensors as they are read and repacks a layer for
    the CPU kernels (``QuantizedTensor.use_cpu_layout``) as soon as it is complete. Weights read
    from ``folder`` keep no copy of their stored scales: ``state_dict()`` reads them again."""

    def __init__(self, model, config: MolmoeConfig, bits: int, folder: Path):
        self.model, self.bits, self.folder = model, bits, folder
        leaves = ("qweight", "scales", "zeros") if bits == 4 else ("qweight", "scales")
        self.keys = {f"{experts_prefix(i)}.{name}.{leaf}": (i, name, leaf)
                     for i in range(config.n_layers) for name in ("w13", "w2") for leaf in leaves}
        self.parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.leaves = len(leaves)
        self.done = 0

    def wants(self, key: str) -> bool:
        return key in self.keys

    def add(self, key: str, t: torch.Tensor) -> None:
        layer, name, leaf = self.keys[key]
        parts = self.parts.setdefault((layer, name), {})
        parts[leaf] = t
        if len(parts) == self.leaves:
            del self.parts[(layer, name)]
            module = getattr(self.model.get_submodule(experts_prefix(layer)), name)
            qw = QuantizedWeight(parts["qweight"], parts["scales"], parts.get("zeros"), self.bits,
                                 module.group_size, module.shape)
            prefix = key.rpartition(".")[0]
            self.take(layer, name, qw, reread=partial(_read_stored_scales, self.folder, prefix, self.bits))
            # the kernels keep their own copies (int8: the codes themselves, still needed)
            for leaf, t in parts.items():
                if self.bits == 4 or leaf != "qweight":
                    release_pages(t)

    def take(self, layer: int, name: str, qw: QuantizedWeight, reread=None) -> None:
        getattr(self.model.get_submodule(experts_prefix(layer)), name).use_cpu_layout(qw, reread_stored=reread)
        self.done += 1

    def check_done(self) -> None:
        if self.parts:  # validate() checked the keys: this would be a bug
            raise RuntimeError(f"expert tensors left unpacked: {sorted(self.parts)}")


def _read_stored_scales(folder: Path, prefix: str, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``prefix``'s stored scales (and zeros for int4), read again from the checkpoint in ``folder``
    (opened once for a whole ``state_dict()``: see ``MolmoE.state_dict``)."""
    with reading(folder) as reader:
        read = [reader.get(f"{prefix}.{leaf}") for leaf in (("scales", "zeros") if bits == 4 else ("scales",))]
        copies = [t.clone() for t in read]
        for t in read:  # the reader may stay open for the next weight: its pages need not
            release_pages(t)
    return copies[0], copies[1] if bits == 4 else None


def apply_small_preset(model, method: str = "refit") -> list[str]:
    """The ``small`` preset on a loaded model: SMALL_PRESET's float linears quantised one at a
    time (each float matrix dropped as soon as it is replaced), token embeddings to CPU memory.

    ``method``: quantize_weight's rounding. Returns the names of the changed modules. The
    embedding lookup then runs on the CPU and only the looked-up rows travel to the GPU
    (``Transformer.embed``). ``load(preset="small")`` does not go through this: it quantises
    while reading, so no float copy reaches the GPU.
    """
    from molmoe_lite.quantized import QuantizedLinear

    changed = []
    with torch.no_grad():
        for group, (bits, group_size) in SMALL_PRESET.items():
            for parent, attr, name in float_linears(model, [group]):
                setattr(parent, attr, QuantizedLinear.from_linear(getattr(parent, attr), bits, group_size, method))
                changed.append(name)
    for name in SMALL_CPU_MODULES:
        model.get_submodule(name).to("cpu")
        changed.append(f"{name} (to CPU)")
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return changed
