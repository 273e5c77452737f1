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
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import torch

from molmoe_lite.config import ConfigError, MolmoeConfig
from molmoe_lite.hub import resolve_model
from molmoe_lite.quantize.checkpoint import open_checkpoint, validate
from molmoe_lite.quantize.format import experts_prefix, quantize_layer_experts, quantized_to_tensors
from molmoe_lite.quantize.layout import expected_shapes

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_QUANTIZE = {"int4": 4, "int8": 8}
QUANT_METHOD = "molmoe-lite"


def pick_device(device: str | torch.device | None) -> torch.device:
    """CUDA when present, else CPU, unless the caller says otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on GPUs that have it, else float16 (Turing)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        try:
            return _DTYPES[str(dtype).lower()]
        except KeyError:
            raise ValueError(f"dtype {dtype!r} is not one of float32, bfloat16, float16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quantize_structure(model, bits: int, group_size: int | None, modules: Iterable[str]) -> None:
    """Swap the (meta) float modules named by ``modules`` for empty quantised ones, in place.

    ``modules``: "experts" (every MoE layer's experts), "attention" (att_proj and
    attn_out), "lm_head".
    """
    from molmoe_lite.quantized import QuantizedExperts, QuantizedLinear

    modules = set(modules)
    unknown = modules - {"experts", "attention", "lm_head"}
    if unknown:
        raise ConfigError(f"quantization_config.modules has unknown entries: {sorted(unknown)}")
    cfg = model.config
    for block in model.model.transformer.blocks:
        if "experts" in modules:
            block.mlp.experts = QuantizedExperts(
                cfg.moe_num_experts, cfg.d_model, cfg.expert_hidden, bits, group_size, device="meta"
            )
        if "attention" in modules:
            for name in ("att_proj", "attn_out"):
                old = getattr(block.attn, name)
                setattr(block.attn, name, QuantizedLinear(old.in_features, old.out_features, bits, group_size, "meta"))
    if "lm_head" in modules:
        old = model.lm_head
        model.lm_head = QuantizedLinear(old.in_features, old.out_features, bits, group_size, "meta")


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
            raise ValueError(f"{folder} is already quantised; load it without quantize=")
        return {**stored, "on_the_fly": False}
    if quantize is None:
        return None
    if quantize not in _QUANTIZE:
        raise ValueError(f"quantize must be one of {sorted(_QUANTIZE)}, got {quantize!r}")
    return {"bits": _QUANTIZE[quantize], "group_size": 64 if quantize == "int4" else None,
            "modules": ["experts"], "on_the_fly": True}


PRESETS = ("default", "small")


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    preset: str = "default",
):
    """Load a MolmoE checkpoint folder (or hub id) for inference, processor attached.

    ``quantize`` ("int4" or "int8") quantises a float release's experts while loading,
    layer by layer; a folder written by ``molmoe-lite quantize`` loads quantised as is.
    ``preset="small"`` also makes every decoder linear int4 (attention, lm_head) and keeps
    the token embeddings in CPU memory: the smallest GPU footprint.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    from molmoe_lite.model.molmoe import MolmoE
    from molmoe_lite.processor import Processor

    folder = resolve_model(path)
    config = MolmoeConfig.from_pretrained(folder)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    quant = _quantization(config, folder, quantize)
    with torch.device("meta"):
        model = MolmoE(config, dtype=dtype)
    if quant is not None:
        quantize_structure(model, int(quant["bits"]), quant.get("group_size"), quant.get("modules", ["experts"]))
    # the model chose each tensor's dtype (fp32 norms in a float16 model, uint8 codes, fp16 scales)
    wanted = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    # When every tensor is copied on its way in (to a GPU or another dtype), map a .bin shared:
    # a private mapping of the 29 GB release is refused on machines with less RAM + swap.
    copies = device.type != "cpu" or dtype != torch.float32
    with open_checkpoint(folder, shared_mmap=copies) as reader:
        if quant is not None and quant["on_the_fly"]:
            validate(reader, expected_shapes(config.raw))  # a float release, checked whole
            _quantize_experts_while_loading(reader, config, quant, device, state)
        else:
            validate(reader, {k: shape for k, (shape, _) in wanted.items()})
        for key in reader.keys():
            if key in wanted and key not in state:
                # one tensor at a time: each is converted before the next is read
                state[key] = reader.get(key).to(device=device, dtype=wanted[key][1])
        model.load_state_dict(state, assign=True, strict=True)
    if preset == "small":
        apply_small_preset(model)
    model.eval()
    model.processor = Processor.from_pretrained(folder)
    return model


def _quantize_experts_while_loading(reader, config: MolmoeConfig, quant: dict, device, state: dict) -> None:
    """Read each layer's float experts, quantise them, keep only the quantised tensors."""
    for layer in range(config.n_layers):
        w13, w2 = quantize_layer_experts(
            reader.get, layer, config.moe_num_experts, bits=int(quant["bits"]), group_size=quant["group_size"]
        )
        prefix = experts_prefix(layer)
        for name, qw in (("w13", w13), ("w2", w2)):
            for key, t in quantized_to_tensors(f"{prefix}.{name}", qw).items():
                state[key] = t.to(device)


def apply_small_preset(model, group_size: int = 64) -> list[str]:
    """int4 for every decoder linear still in float, token embeddings moved to CPU memory.

    Returns the names of the changed modules. The embedding lookup then runs on the CPU
    and only the looked-up rows travel to the GPU (``Transformer.embed``).
    """
    from torch import nn

    from molmoe_lite.quantized import QuantizedLinear

    changed = []
    for i, block in enumerate(model.model.transformer.blocks):
        for name in ("att_proj", "attn_out"):
            old = getattr(block.attn, name)
            if isinstance(old, nn.Linear):
                setattr(block.attn, name, QuantizedLinear.from_linear(old, bits=4, group_size=group_size))
                changed.append(f"model.transformer.blocks.{i}.attn.{name}")
    if isinstance(model.lm_head, nn.Linear):
        model.lm_head = QuantizedLinear.from_linear(model.lm_head, bits=4, group_size=group_size)
        changed.append("lm_head")
    model.model.transformer.wte.to("cpu")
    changed.append("model.transformer.wte (to CPU)")
    if model.device.type == "cuda":
        torch.cuda.empty_cache()
    return changed
