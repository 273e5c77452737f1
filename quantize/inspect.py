"""What a checkpoint folder holds and what it will need on a GPU, without loading any weights.

``inspect_checkpoint`` reads config.json and the tensor headers (safetensors headers or the
mapped ``.bin``; no tensor data is read), groups the tensors by kind (experts, attention,
lm_head, embeddings, vision, other), and sizes a KV cache for ``context`` tokens: n_layers * 2
(K and V) * batch * context * n_kv_heads * head_dim * bytes per element, from config.json
alone. ``format_report`` renders it. The weights a load puts on the GPU differ from the weights
as stored (fp32 on disk, bf16 on the GPU; presets): ``molmoe-lite inspect`` adds those from
``molmoe_lite.api.weights_plan``, which this package does not import.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from molmoe_lite.quantize.checkpoint import CheckpointError, open_checkpoint, read_json_object
from molmoe_lite.quantize.config_check import check_config
from molmoe_lite.quantize.layout import LLM_PREFIX, VIT_PREFIX
from molmoe_lite.quantize.writer import human_size  # noqa: F401  (the CLI formats its plans with it too)
from molmoe_lite.errors import UsageError

KINDS = ("experts", "attention", "lm_head", "embeddings", "vision", "other")
_KV_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


def tensor_kind(key: str) -> str:
    """Which part of the model a (release or quantised) key belongs to."""
    if ".mlp.experts." in key:
        return "experts"
    if key.startswith(f"{LLM_PREFIX}.blocks.") and (".attn.att_proj." in key or ".attn.attn_out." in key):
        return "attention"
    if key.startswith("lm_head."):
        return "lm_head"
    if key.startswith(f"{LLM_PREFIX}.wte."):
        return "embeddings"
    if key.startswith(f"{VIT_PREFIX}."):
        return "vision"
    return "other"


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def kv_cache_bytes(cfg: dict[str, Any], context: int, batch: int = 1, bytes_per_elem: int = 2) -> int:
    """K and V for every layer: n_layers * 2 * batch * context * n_kv_heads * head_dim * bytes."""
    n_heads = int(cfg["n_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["d_model"]) // n_heads)
    n_kv = int(cfg.get("n_kv_heads") or n_heads)
    return int(cfg["n_layers"]) * 2 * batch * context * n_kv * head_dim * bytes_per_elem


def inspect_checkpoint(folder: str | Path, context: int = 4096, batch: int = 1) -> dict[str, Any]:
    """Quantisation config, tensors by kind (count, bytes, weights stood for), sizes, KV cache."""
    folder = Path(folder)
    if context <= 0 or batch <= 0:
        raise UsageError(f"context and batch must be positive, got context={context}, batch={batch}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: is a file; pass the folder that holds config.json and the weights"
                              if folder.exists() else f"{folder}: no such folder")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path}: no config.json in {folder}")
    cfg = read_json_object(cfg_path)
    qcfg = cfg.get("quantization_config")
    bits = int(qcfg["bits"]) if isinstance(qcfg, dict) and "bits" in qcfg else None

    kinds = {k: {"tensors": 0, "bytes": 0, "weights": 0, "quantized": False} for k in KINDS}
    with open_checkpoint(folder, shared_mmap=True) as reader:  # headers only; never written
        if cfg.get("model_type") == "molmo":
            check_config(cfg, reader, cfg_path)  # before any size from config.json is used
        fmt = reader.format
        for key in reader.keys():
            shape, dtype = reader.shape(key), reader.dtype(key)
            nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
            k = kinds[tensor_kind(key)]
            k["tensors"] += 1
            k["bytes"] += nbytes
            if key.endswith(".qweight"):
                k["quantized"] = True
                k["weights"] += _numel(shape) * (2 if dtype == torch.uint8 else 1)
            elif not key.endswith((".scales", ".zeros")):
                k["weights"] += _numel(shape)
    for k in kinds.values():
        k["bits_per_weight"] = 8.0 * k["bytes"] / k["weights"] if k["weights"] else None

    weights_bytes = sum(k["bytes"] for k in kinds.values())
    files = [p for p in folder.iterdir() if p.is_file()]
    kv_dtype = (qcfg or {}).get("dtype", "bfloat16") if isinstance(qcfg, dict) else "bfloat16"
    try:
        kv = kv_cache_bytes(cfg, context, batch, _KV_BYTES.get(kv_dtype, 2))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{cfg_path}: cannot size the KV cache ({type(e).__name__}: {e})") from e
    return {
        "folder": str(folder),
        "format": fmt,
        "model_type": cfg.get("model_type"),
        "quantization_config": qcfg,
        "bits": bits,
        "kinds": kinds,
        "tensors": sum(k["tensors"] for k in kinds.values()),
        "weights_bytes": weights_bytes,
        "files_bytes": sum(p.stat().st_size for p in files),
        "context": context,
        "batch": batch,
        "kv_dtype": kv_dtype,
        "kv_cache_bytes": kv,
    }


def format_report(info: dict[str, Any]) -> str:
    """A plain-text report of ``inspect_checkpoint``'s result."""
    q = info["quantization_config"]
    lines = [f"{info['folder']} ({info['format']}, model_type {info['model_type']})"]
    if isinstance(q, dict):
        gs = q.get("group_size")
        lines.append(
            f"quantisation: {q.get('quant_method')} v{q.get('format_version')}, int{q.get('bits')} "
            f"{q.get('scheme')}, group size {'per-channel' if gs is None else gs}, method {q.get('method')}, "
            f"modules {','.join(q.get('modules', []))}, other tensors {q.get('dtype')}"
        )
    else:
        lines.append("quantisation: none (float checkpoint)")
    lines.append(f"{'kind':<11} {'tensors':>8} {'size':>11} {'bits/weight':>12}  quantised")
    for name, k in info["kinds"].items():
        if not k["tensors"]:
            continue
        bpw = "" if k["bits_per_weight"] is None else f"{k['bits_per_weight']:.2f}"
        q_mark = "yes" if k["quantized"] else "no"
        lines.append(f"{name:<11} {k['tensors']:>8} {human_size(k['bytes']):>11} {bpw:>12}  {q_mark}")
    total, files = human_size(info["weights_bytes"]), human_size(info["files_bytes"])
    lines.append(f"{'total':<11} {info['tensors']:>8} {total:>11}  (files {files})")
    lines.append(
        f"KV cache: {human_size(info['kv_cache_bytes'])} ({info['kv_dtype']}, batch {info['batch']}, "
        f"context {info['context']})"
    )
    return "\n".join(lines)
