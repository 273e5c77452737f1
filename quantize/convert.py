"""The streaming converter: a release checkpoint folder -> a quantised safetensors checkpoint folder.

Method:
- Everything that can be checked is checked before anything is written: config.json is
  a MolmoE config with the fields the layout needs, the source checkpoint opens and
  holds exactly the tensors and shapes ``layout.expected_shapes`` lists, the group size
  divides every quantised matrix, the output folder may be created and the disk has room
  for the estimated output.
- The output's tensor list (names, dtypes, shapes) follows from the config alone, so it
  is planned up front in the release's key order and written by ``PlannedShardWriter``:
  each tensor goes to its place in its shard as soon as it exists. The order does not
  depend on the source format, so a ``.bin`` and a safetensors copy of one model give
  byte-identical outputs.
- Tensor groups are streamed one at a time: a layer's experts through
  ``format.quantize_layer_experts`` (one expert's floats at a time, stacked codes out),
  optional attention / lm_head matrices through ``format.quantize_weight``, everything
  else cast to ``dtype`` one tensor at a time. A ``.bin`` source is memory-mapped, so its
  pages are the page cache's, not ours; peak anonymous memory is about one layer of
  quantised experts (codes go straight into preallocated stacks) plus one expert's floats
  and the rounding's temporaries.
- The output is built in ``atomic_output_dir``: a failure or an interrupt at any point
  leaves no DST (and an existing DST untouched).
- Errors of the stacked experts are measured on two experts per layer (cheap: dequantise
  three matrices, compare with the source), averaged per projection, in the summary.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from molmoe_lite.quantize.checkpoint import CheckpointError, open_checkpoint, read_json_object, validate
from molmoe_lite.quantize.config_check import check_against_checkpoint, check_values
from molmoe_lite.quantize.format import (
    FLOAT_DTYPES,
    FORMAT_VERSION,
    QUANT_METHOD,
    QuantFormatError,
    QuantizedWeight,
    dequantize,
    experts_prefix,
    quantize_layer_experts,
    quantize_weight,
    quantized_to_tensors,
    resolve_group_size,
)
from molmoe_lite.quantize.layout import LLM_PREFIX, expected_shapes, expert_hidden_size, expert_key
from molmoe_lite.quantize.planned_writer import PlannedShardWriter
from molmoe_lite.quantize.writer import OutputError, atomic_output_dir, check_free_space

MODULES = ("experts", "attention", "lm_head")  # what ``include`` may name, in canonical order
# Files copied next to the weights (when present); any "auto_map" in them is removed.
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "added_tokens.json",
)
# Fields of config.json the layout (and so the converter) cannot do without.
_REQUIRED = ("d_model", "n_layers", "n_heads", "moe_num_experts", "embedding_size", "vit_layers", "vision_backbone")
_REQUIRED_VISION = (
    "image_emb_dim", "image_num_heads", "image_head_dim", "image_patch_size",
    "image_num_pos", "image_num_layers", "image_mlp_dim",
)
_ERROR_SAMPLES_PER_LAYER = 2
_SPACE_MARGIN = 64 * 1024**2  # bytes on top of the estimate: config, tokenizer, index, slack


class ConvertError(CheckpointError):
    """A source or an option the converter cannot work with (names the file or option)."""


@dataclass
class ConversionSummary:
    """What a conversion did; ``str()`` gives a short human-readable report."""

    src: str
    dst: str
    source_format: str
    bits: int
    group_size: int | None
    method: str
    modules: list[str]
    dtype: str
    device: str
    source_bytes: int  # tensor bytes of the source checkpoint
    output_bytes: int  # bytes of every file written to dst
    weights_bytes: int  # tensor bytes of the output
    seconds: float
    tensors_quantized: int  # quantised matrices (a layer's expert stack counts as 2: w13, w2)
    tensors_other: int
    # Mean relative Frobenius error ||W - dequant(Q(W))|| / ||W|| per projection kind
    # (gate_proj, up_proj, down_proj on sampled experts; att_proj, attn_out, lm_head when quantised).
    rel_errors: dict[str, float] = field(default_factory=dict)
    error_samples: int = 0  # experts sampled for the gate/up/down errors
    files_copied: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        gs = "per-channel" if self.group_size is None else str(self.group_size)
        lines = [
            f"converted {self.src} ({self.source_format}) -> {self.dst}",
            f"  int{self.bits} {'asymmetric' if self.bits == 4 else 'symmetric'}, group size {gs}, "
            f"method {self.method}, modules {','.join(self.modules)}, other tensors {self.dtype}",
            f"  size: {_size(self.source_bytes)} -> {_size(self.output_bytes)} "
            f"({self.source_bytes / max(self.output_bytes, 1):.1f}x smaller)",
            f"  time: {self.seconds:.1f} s ({self.source_bytes / 1e6 / max(self.seconds, 1e-9):.0f} MB/s of source)",
            f"  tensors: {self.tensors_quantized} quantised, {self.tensors_other} other",
        ]
        if self.rel_errors:
            errs = ", ".join(f"{k} {v:.4f}" for k, v in self.rel_errors.items())
            lines.append(f"  mean relative weight error ({self.error_samples} sampled experts): {errs}")
        if "tokenizer.json" not in self.files_copied:  # the output cannot answer without one
            lines.append(f"  note: {self.src} has no tokenizer.json; copy the release's into {self.dst} "
                         "before running the model")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------------------- checks


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in FLOAT_DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in FLOAT_DTYPES:
        return FLOAT_DTYPES[dtype.removeprefix("torch.")]
    raise ConvertError(f"dtype must be one of {', '.join(FLOAT_DTYPES)}; got {dtype!r}")


def _resolve_include(include: Iterable[str] | str) -> list[str]:
    if isinstance(include, str):
        include = [p for p in include.split(",")]
    names = [str(p).strip() for p in include if str(p).strip()]
    bad = [n for n in names if n not in MODULES]
    if bad:
        raise ConvertError(f"include: unknown module(s) {bad}; choose from {', '.join(MODULES)}")
    if "experts" not in names:
        raise ConvertError(
            "include must contain 'experts' (the experts are always quantised; "
            "'attention' and 'lm_head' add to them)"
        )
    return [m for m in MODULES if m in names]


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConvertError(f"device must be 'cpu' or 'cuda', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConvertError(f"device {device!r}: CUDA is not available here; use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ConvertError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


def read_source_config(src: Path) -> dict[str, Any]:
    """config.json of ``src``, checked to be a MolmoE config with the fields the layout needs."""
    path = src / "config.json"
    if not path.is_file():
        raise ConvertError(f"{path}: no config.json in the source folder")
    cfg = read_json_object(path, ConvertError)
    if cfg.get("model_type") != "molmo":
        raise ConvertError(
            f"{path}: not a MolmoE config (model_type is {cfg.get('model_type')!r}, expected 'molmo')"
        )
    quant = cfg.get("quantization_config")
    if quant is not None:
        how = (f"int{quant.get('bits')} by {quant.get('quant_method')}" if isinstance(quant, dict)
               else "a quantization_config")
        raise ConvertError(f"{path}: the source is already quantised ({how}); quantize converts a float "
                           "release: pass the release's folder, or load this one as it is")
    if cfg.get("block_type", "moe") != "moe":
        raise ConvertError(f"{path}: block_type is {cfg.get('block_type')!r}; only MoE (MolmoE) models are supported")
    missing = [k for k in _REQUIRED if cfg.get(k) is None]
    vision = cfg.get("vision_backbone")
    if isinstance(vision, dict):
        missing += [f"vision_backbone.{k}" for k in _REQUIRED_VISION if vision.get(k) is None]
    elif vision is not None:
        missing.append("vision_backbone (not an object)")
    if missing:
        raise ConvertError(f"{path}: missing field(s) needed to convert: {', '.join(missing)}")
    return cfg


# ---------------------------------------------------------------------------- planning


def _qshapes(shape: tuple[int, ...], bits: int, g: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Suffix -> (dtype, shape) of the stored tensors of a quantised [..., N, K] weight."""
    *lead, k = shape
    out = {
        "qweight": (torch.uint8, (*lead, k // 2)) if bits == 4 else (torch.int8, (*lead, k)),
        "scales": (torch.float16, (*lead, k // g)),
    }
    if bits == 4:
        out["zeros"] = (torch.float16, (*lead, k // g))
    return out


def _quantised_key_prefix(key: str, cfg: dict[str, Any], modules: list[str]) -> str | None:
    """``key`` minus ``.weight`` when ``key`` is a single matrix quantised under ``modules``."""
    if "lm_head" in modules and key == "lm_head.weight":
        return "lm_head"
    if "attention" in modules and key.startswith(f"{LLM_PREFIX}.blocks.") and key.endswith(
        (".attn.att_proj.weight", ".attn.attn_out.weight")
    ):
        return key[: -len(".weight")]
    return None


@dataclass
class _Step:
    kind: str  # "experts" (a layer), "matrix" (one quantised matrix), "cast"
    key: str  # source key (experts: layer's first expert key)
    layer: int = -1
    prefix: str = ""
    group_size: int = 0


def _plan(cfg, shapes, reader, bits, group_size, modules, dtype):
    """(steps, output plan [(key, dtype, shape)], source bytes, quantised count, other count)."""
    n_exp = int(cfg["moe_num_experts"])
    d, h = int(cfg["d_model"]), expert_hidden_size(cfg)
    steps: list[_Step] = []
    plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    n_q = n_other = 0
    layers_done: set[int] = set()
    expert_keys: dict[str, int] = {}
    for i in range(int(cfg["n_layers"])):
        for e in range(n_exp):
            for p in ("gate_proj", "up_proj", "down_proj"):
                expert_keys[expert_key(i, e, p)] = i

    def group(k: int, name: str) -> int:
        try:
            return resolve_group_size(k, bits, group_size)
        except QuantFormatError as e:
            raise ConvertError(f"{name}: {e}") from None

    for key, shape in shapes.items():
        if key in expert_keys:
            layer = expert_keys[key]
            if layer in layers_done:
                continue
            layers_done.add(layer)
            prefix = experts_prefix(layer)
            g13, g2 = group(d, f"{prefix}.w13"), group(h, f"{prefix}.w2")
            steps.append(_Step("experts", key, layer, prefix))
            for name, full, g in (("w13", (n_exp, 2 * h, d), g13), ("w2", (n_exp, d, h), g2)):
                for suffix, (dt, s) in _qshapes(full, bits, g).items():
                    plan.append((f"{prefix}.{name}.{suffix}", dt, s))
            n_q += 2
            continue
        qprefix = _quantised_key_prefix(key, cfg, modules)
        if qprefix is not None:
            g = group(shape[-1], key)
            steps.append(_Step("matrix", key, prefix=qprefix, group_size=g))
            for suffix, (dt, s) in _qshapes(tuple(shape), bits, g).items():
                plan.append((f"{qprefix}.{suffix}", dt, s))
            n_q += 1
            continue
        src_dtype = reader.dtype(key)
        out_dtype = dtype if src_dtype.is_floating_point else src_dtype
        steps.append(_Step("cast", key))
        plan.append((key, out_dtype, tuple(shape)))
        n_other += 1
    source_bytes = sum(_numel(s) * _elem(reader.dtype(k)) for k, s in shapes.items())
    return steps, plan, source_bytes, n_q, n_other


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _elem(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------- files


def _strip_auto_map(obj: Any) -> tuple[Any, bool]:
    if isinstance(obj, dict) and "auto_map" in obj:
        return {k: v for k, v in obj.items() if k != "auto_map"}, True
    return obj, False


def _copy_side_files(src: Path, out: Path) -> list[str]:
    """Copy the tokenizer/processor files present in ``src``; rewrite those holding an auto_map."""
    copied = []
    for name in COPIED_FILES:
        path = src / name
        if not path.is_file():
            continue
        try:
            raw = path.read_bytes()
            data = json.loads(raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConvertError(f"{path}: not a readable JSON file ({e})") from e
        data, stripped = _strip_auto_map(data)
        if stripped:
            (out / name).write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        else:
            (out / name).write_bytes(raw)  # unchanged bytes
        copied.append(name)
    return copied


def quantization_config(
    bits: int, group_size: int | None, method: str, modules: list[str], dtype: torch.dtype
) -> dict[str, Any]:
    """The ``quantization_config`` block written into config.json.

    ``group_size`` is the requested size (capped at each matrix's input size when
    larger); None means per output channel (int8 default).
    """
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "bits": bits,
        "group_size": group_size,
        "scheme": "asymmetric" if bits == 4 else "symmetric",
        "method": method,
        "modules": list(modules),
        "dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------- conversion


def _rel_error(w: torch.Tensor, wq: torch.Tensor) -> float:
    w = w.float()
    return float(torch.linalg.vector_norm(w - wq) / torch.linalg.vector_norm(w).clamp_min(1e-30))


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc, dynamic_ncols=True)


def _stream(reader, writer, steps, cfg, bits, group_size, method, out_dtype, dev, bar) -> dict[str, list[float]]:
    """Convert and write every step, one tensor group at a time; returns sampled errors by kind."""
    n_exp = int(cfg["moe_num_experts"])
    h = expert_hidden_size(cfg)
    errors: dict[str, list[float]] = {}

    def fetch(key: str) -> torch.Tensor:
        t = reader.get(key)
        if bar is not None:
            bar.update(t.numel() * t.element_size())
        return t.to(dev) if dev.type != "cpu" else t

    def write_q(prefix: str, qw: QuantizedWeight) -> None:
        for k, t in quantized_to_tensors(prefix, qw).items():
            writer.write(k, t)

    def note(kind: str, key: str, wq: torch.Tensor) -> None:
        errors.setdefault(kind, []).append(_rel_error(reader.get(key), wq))

    for step in steps:
        if step.kind == "experts":
            w13, w2 = quantize_layer_experts(fetch, step.layer, n_exp, bits, group_size, method)
            if dev.type != "cpu":
                w13, w2 = w13.to("cpu"), w2.to("cpu")
            write_q(f"{step.prefix}.w13", w13)
            write_q(f"{step.prefix}.w2", w2)
            # A few experts per layer, different ones in each layer: cheap, and covers the model.
            k = _ERROR_SAMPLES_PER_LAYER
            for e in sorted({(step.layer + j * n_exp // k) % n_exp for j in range(k)}):
                dq13 = dequantize(w13.index(e))  # [2I, H]: gate rows, then up rows
                note("gate_proj", expert_key(step.layer, e, "gate_proj"), dq13[:h])
                note("up_proj", expert_key(step.layer, e, "up_proj"), dq13[h:])
                note("down_proj", expert_key(step.layer, e, "down_proj"), dequantize(w2.index(e)))
            del w13, w2, dq13
        elif step.kind == "matrix":
            w = fetch(step.key)
            qw = quantize_weight(w, bits, step.group_size, method, name=step.key).to("cpu")
            write_q(step.prefix, qw)
            note(step.prefix.rsplit(".", 1)[-1], step.key, dequantize(qw))
            del w, qw
        else:
            t = reader.get(step.key)
            if bar is not None:
                bar.update(t.numel() * t.element_size())
            out = t.to(out_dtype) if t.dtype.is_floating_point else t
            writer.write(step.key, out)
            del t, out
    return errors


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    bits: int = 4,
    group_size: int | None = None,
    include: Iterable[str] | str = ("experts",),
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    force: bool = False,
    method: str = "refit",
    progress: bool = True,
    max_shard_bytes: int = 2 * 1024**3,
) -> ConversionSummary:
    """Convert the release checkpoint in folder ``src`` into a quantised checkpoint folder ``dst``.

    ``bits`` 4 (asymmetric, group-wise) or 8 (symmetric). ``group_size``: int4 groups
    (32/64/128, None = 64; capped at a matrix's input size); int8: None = per output
    channel (the default), an int = group-wise. ``include``: "experts" (required) plus
    optionally "attention" (att_proj, attn_out) and "lm_head", as a list or a
    comma-separated string. Other
    tensors are cast to ``dtype`` (bfloat16/float16/float32). ``device`` "cuda" runs
    the rounding on the GPU. ``force`` replaces a non-empty ``dst``. Raises
    ``ConvertError`` / ``CheckpointError`` (bad source), ``OutputError`` (bad destination),
    all naming the file; on any failure ``dst`` is left as it was.
    """
    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if bits not in (4, 8):
        raise ConvertError(f"bits must be 4 or 8, got {bits!r}")
    if method not in ("refit", "rtn"):
        raise ConvertError(f"method must be 'refit' or 'rtn', got {method!r}")
    if group_size is None and bits == 4:
        group_size = 64
    modules = _resolve_include(include)
    out_dtype = _resolve_dtype(dtype)
    dev = _resolve_device(device)
    if not src.is_dir():
        raise ConvertError(f"{src}: source is not a folder (a hub id must be resolved to a folder first)")
    src_abs, dst_abs = src.resolve(), dst.absolute().resolve()
    if dst_abs == src_abs or src_abs in dst_abs.parents or dst_abs in src_abs.parents:
        raise OutputError(f"{dst}: output folder must not be, contain or lie inside the source folder {src}")
    if dst_abs.is_dir() and any(dst_abs.iterdir()) and not force:
        raise OutputError(f"{dst_abs}: output folder exists and is not empty (pass --force, or force=True, to replace it)")

    cfg = read_source_config(src)
    check_values(cfg, src / "config.json")

    # Shared mapping: a private one of a .bin larger than RAM + swap is refused; never written.
    with open_checkpoint(src, shared_mmap=True) as reader:
        # sizes against the tensor headers before the layout is derived from them
        check_against_checkpoint(cfg, reader.keys(), reader.shape, src / "config.json", reader.path.name)
        try:
            shapes = expected_shapes(cfg)
        except (KeyError, TypeError, ValueError) as e:
            raise ConvertError(
                f"{src / 'config.json'}: cannot derive the tensor layout ({type(e).__name__}: {e})"
            ) from e
        validate(reader, shapes)
        steps, plan, source_bytes, n_q, n_other = _plan(
            cfg, shapes, reader, bits, group_size, modules, out_dtype
        )
        weights_bytes = sum(_numel(s) * _elem(dt) for _, dt, s in plan)
        check_free_space(dst_abs.parent, weights_bytes + _SPACE_MARGIN)

        bar = _progress(source_bytes, progress, f"quantise int{bits}")
        try:
            with atomic_output_dir(dst_abs, force=force) as tmp:
                with PlannedShardWriter(tmp, plan, max_shard_bytes) as writer:
                    errors = _stream(reader, writer, steps, cfg, bits, group_size, method, out_dtype, dev, bar)
                    writer.finish()

                out_cfg, _ = _strip_auto_map(cfg)
                qcfg = quantization_config(bits, group_size, method, modules, out_dtype)
                out_cfg["quantization_config"] = qcfg
                (tmp / "config.json").write_text(json.dumps(out_cfg, indent=2) + "\n", encoding="utf-8")
                copied = _copy_side_files(src, tmp)
                output_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        finally:
            if bar is not None:
                bar.close()

    rel = {k: sum(v) / len(v) for k, v in errors.items()}
    n_samples = len(errors.get("gate_proj", []))
    return ConversionSummary(
        src=str(src), dst=str(dst_abs), source_format=reader.format, bits=bits,
        group_size=group_size, method=method, modules=modules,
        dtype=str(out_dtype).removeprefix("torch."), device=str(dev),
        source_bytes=source_bytes, output_bytes=output_bytes, weights_bytes=weights_bytes,
        seconds=time.perf_counter() - t0, tensors_quantized=n_q, tensors_other=n_other,
        rel_errors=rel, error_samples=n_samples, files_copied=copied,
    )
