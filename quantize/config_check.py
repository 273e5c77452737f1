"""config.json checked before anything is built: value ranges, then sizes against the checkpoint.

A checkpoint folder's config.json is input like any other file (downloaded, hand-edited,
truncated), and every size the model, the converter and ``inspect`` allocate or loop over
comes from it. A wrong size used to surface late and badly: ten million layers built one by
one, an overflowing storage size, a division by zero. So, before any model, layout or plan is
made from it:

1. ``check_values``: every size is an integer of the right sign, ratios divide, choices are in
   range (needs config.json alone);
2. ``check_against_checkpoint``: each size is compared with the checkpoint's own tensors, read
   from headers only (safetensors headers, or the memory-mapped ``.bin``'s pickle; no tensor
   data): the layer count from the block indices present, widths from probe tensors that every
   MolmoE checkpoint holds, float or quantised. A checkpoint holding none of MolmoE's decoder
   tensors is another model's: that is one ``CheckpointError`` naming the file, not a list of sizes.

Each problem names the field, its value and what the checkpoint holds; all problems of one
config.json come in one ``ConfigError``. Lives in ``quantize`` so the converter and ``inspect``
use it too; the runtime's ``molmoe_lite.config`` re-exports ``ConfigError``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from molmoe_lite.errors import MolmoeLiteError
from molmoe_lite.quantize.checkpoint import CheckpointError
from molmoe_lite.quantize.layout import LLM_PREFIX, VIT_PREFIX


class ConfigError(MolmoeLiteError, ValueError):
    """A config.json that is missing, unreadable, inconsistent with its checkpoint, or asks for
    something we do not implement."""


_VIT = f"{VIT_PREFIX}.image_vit"
_BLOCK = re.compile(rf"^{re.escape(LLM_PREFIX)}\.blocks\.(\d+)\.")
_RESBLOCK = re.compile(rf"^{re.escape(_VIT)}\.transformer\.resblocks\.(\d+)\.")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class _Problems(list):
    """The problems found so far, and the checks of single fields that add to them."""

    def positive(self, d: dict, name: str, label: str | None = None, optional: bool = False) -> bool:
        """Whether ``d[name]`` is a positive integer (a missing optional field is no problem)."""
        label = label or name
        if name not in d or d[name] is None:
            if not optional:
                self.append(f"{label} is missing")
            return False
        if not _is_int(d[name]) or d[name] <= 0:
            self.append(f"{label}={d[name]!r} must be a positive integer")
            return False
        return True

    def positive_number(self, d: dict, name: str, label: str | None = None) -> None:
        label = label or name
        v = d.get(name)
        if v is not None and (not _is_number(v) or not v > 0 or v != v or v == float("inf")):
            self.append(f"{label}={v!r} must be a positive finite number")


def check_values(cfg: dict[str, Any], where: str | Path = "config.json") -> None:
    """Types, signs, ranges and divisibility of every size field (config.json alone)."""
    problems = _Problems()
    _check_decoder(cfg, problems)
    vit_layers = _check_vocabulary_and_vit_layers(cfg, problems)
    if not isinstance(cfg.get("vision_backbone"), dict):
        problems.append(f"vision_backbone={cfg.get('vision_backbone')!r} must be an object")
    else:
        _check_vision(cfg["vision_backbone"], vit_layers, problems)
    _raise(where, problems)


def _check_decoder(cfg: dict[str, Any], problems: _Problems) -> None:
    positive = problems.positive
    ok = {n: positive(cfg, n) for n in ("d_model", "n_layers", "n_heads", "moe_num_experts", "moe_top_k")}
    for n in ("n_kv_heads", "head_dim", "mlp_hidden_size", "max_sequence_length", "image_pooling_h",
              "image_pooling_w"):
        ok[n] = positive(cfg, n, optional=True)
    for n in ("mlp_ratio", "rope_theta", "layer_norm_eps"):
        problems.positive_number(cfg, n)

    if ok["d_model"] and ok["n_heads"]:
        d, h = cfg["d_model"], cfg["n_heads"]
        if ok["head_dim"]:
            if cfg["head_dim"] * h != d:
                problems.append(f"head_dim={cfg['head_dim']} x n_heads={h} must equal d_model={d}")
        elif d % h:
            problems.append(f"d_model={d} is not divisible by n_heads={h}")
        if ok["n_kv_heads"] and cfg["n_kv_heads"] != h:
            problems.append(f"n_kv_heads={cfg['n_kv_heads']} != n_heads={h} (grouped-query attention is not supported)")
    if ok["mlp_hidden_size"] and cfg["mlp_hidden_size"] % 2:
        problems.append(f"mlp_hidden_size={cfg['mlp_hidden_size']} must be even (gate and up halves)")
    if ok["moe_top_k"] and ok["moe_num_experts"] and cfg["moe_top_k"] > cfg["moe_num_experts"]:
        problems.append(f"moe_top_k={cfg['moe_top_k']} must be at most moe_num_experts={cfg['moe_num_experts']}")


def _check_vocabulary_and_vit_layers(cfg: dict[str, Any], problems: _Problems) -> list[int] | None:
    """The vocabulary sizes; returns ``vit_layers`` when it is a list of integers, else None."""
    problems.positive(cfg, "embedding_size", optional=True)
    problems.positive(cfg, "vocab_size", optional=True)
    if cfg.get("embedding_size") is None and cfg.get("vocab_size") is None:
        problems.append("embedding_size and vocab_size are both missing")
    add = cfg.get("additional_vocab_size")
    if add is not None and (not _is_int(add) or add < 0):
        problems.append(f"additional_vocab_size={add!r} must be a non-negative integer")
    vit_layers = cfg.get("vit_layers", [-2, -9])
    if not isinstance(vit_layers, list) or not vit_layers or not all(_is_int(i) for i in vit_layers):
        problems.append(f"vit_layers={vit_layers!r} must be a non-empty list of integers")
        return None
    return vit_layers


def _check_vision(vision: dict[str, Any], vit_layers: list[int] | None, problems: _Problems) -> None:
    v_ok = {n: problems.positive(vision, n, f"vision_backbone.{n}", optional=True)
            for n in ("image_emb_dim", "image_num_heads", "image_num_key_value_heads", "image_head_dim",
                      "image_mlp_dim", "image_num_layers", "image_num_pos", "image_patch_size")}
    problems.positive_number(vision, "image_norm_eps", "vision_backbone.image_norm_eps")
    size = vision.get("image_default_input_size")
    if size is not None:
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size)):
            problems.append(f"vision_backbone.image_default_input_size={size!r} must be two positive integers")
        elif v_ok["image_patch_size"]:
            p = vision["image_patch_size"]
            if any(s % p for s in size):
                problems.append(f"vision_backbone.image_default_input_size={size} is not a multiple of "
                                f"image_patch_size={p}")
            elif v_ok["image_num_pos"] and vision["image_num_pos"] != (size[0] // p) * (size[1] // p) + 1:
                problems.append(f"vision_backbone.image_num_pos={vision['image_num_pos']} must be "
                                f"{(size[0] // p) * (size[1] // p) + 1} (one per {p}-pixel patch of "
                                f"{size[0]}x{size[1]}, plus the class token)")
    if vit_layers is not None and v_ok["image_num_layers"]:
        n = vision["image_num_layers"]
        bad = [i for i in vit_layers if not -n <= i < n]
        if bad:
            problems.append(f"vit_layers={vit_layers} has entries outside the {n} ViT blocks: {bad}")


def _raise(where: str | Path, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems))


def _expert_hidden(cfg: dict[str, Any]) -> int:
    if cfg.get("mlp_hidden_size"):
        return int(cfg["mlp_hidden_size"]) // 2
    return int(cfg.get("mlp_ratio", 4) * int(cfg["d_model"])) // 2


def _probes(cfg: dict[str, Any]) -> list[tuple[str, int, str, int]]:
    """(tensor key, dimension, config field(s), value config.json implies for that dimension)."""
    v = cfg["vision_backbone"]
    d = cfg["d_model"]
    heads = cfg["n_heads"] * (cfg.get("head_dim") or d // cfg["n_heads"])
    t, b0 = LLM_PREFIX, f"{LLM_PREFIX}.blocks.0"
    probes = [
        (f"{t}.ln_f.weight", 0, "d_model", d),
        (f"{t}.wte.embedding", 1, "d_model", d),
        (f"{t}.wte.embedding", 0, "embedding_size", cfg.get("embedding_size") or cfg.get("vocab_size")),
        (f"{b0}.attn.q_norm.weight", 0, "n_heads x head_dim", heads),
        (f"{b0}.mlp.gate.weight", 0, "moe_num_experts", cfg["moe_num_experts"]),
        (f"{VIT_PREFIX}.image_projector.w1.weight", 0, "mlp_hidden_size / 2 (or mlp_ratio x d_model / 2)",
         _expert_hidden(cfg)),
        (f"{VIT_PREFIX}.image_projector.w2.weight", 0, "d_model", d),
        # absent when quantised (lm_head.qweight): probes a checkpoint lacks are skipped
        ("lm_head.weight", 0, "embedding_size", cfg.get("embedding_size") or cfg.get("vocab_size")),
    ]
    vb = "vision_backbone."
    vit_probes = [
        (f"{_VIT}.class_embedding", 0, "image_emb_dim", v.get("image_emb_dim")),
        (f"{_VIT}.positional_embedding", 0, "image_num_pos", v.get("image_num_pos")),
        (f"{_VIT}.patch_embedding.weight", 1, "image_patch_size (patch x patch x 3 inputs)",
         None if v.get("image_patch_size") is None else 3 * v["image_patch_size"] ** 2),
        (f"{_VIT}.transformer.resblocks.0.feed_forward.w1.weight", 0, "image_mlp_dim", v.get("image_mlp_dim")),
        (f"{_VIT}.transformer.resblocks.0.attention.wq.weight", 0, "image_num_heads x image_head_dim",
         None if v.get("image_num_heads") is None or v.get("image_head_dim") is None
         else v["image_num_heads"] * v["image_head_dim"]),
    ]
    probes += [(k, dim, vb + f, val) for k, dim, f, val in vit_probes]
    if v.get("image_emb_dim") is not None:
        probes.append((f"{VIT_PREFIX}.pad_embed", 1, "len(vit_layers) x vision_backbone.image_emb_dim",
                       len(cfg.get("vit_layers", [-2, -9])) * v["image_emb_dim"]))
    return probes


def check_against_checkpoint(cfg: dict[str, Any], keys: list[str], shape_of: Callable[[str], tuple[int, ...]],
                             where: str | Path = "config.json", checkpoint: str | Path = "the checkpoint") -> None:
    """Compare config.json's sizes with the checkpoint's tensors (``keys`` and ``shape_of`` from
    headers). Call after ``check_values``. Probe tensors the checkpoint lacks are skipped: the
    full key/shape check that follows names those."""
    if not any(k.startswith(f"{LLM_PREFIX}.") for k in keys):
        # another model's weights beside a MolmoE config: say that, not that every size is off
        sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
        raise CheckpointError(
            f"{Path(where).parent / checkpoint}: holds none of MolmoE's tensors (no {LLM_PREFIX}.* keys; it has "
            f"{sample}{', ...' if len(keys) > 3 else ''}): another model's checkpoint? Use a MolmoE-1B release "
            "folder or its `molmoe-lite quantize` output")
    problems: list[str] = []
    have = set(keys)
    layers = {int(m.group(1)) for k in keys if (m := _BLOCK.match(k))}
    if len(layers) != cfg["n_layers"]:
        problems.append(f"n_layers={cfg['n_layers']} but {checkpoint} holds {len(layers)} decoder blocks"
                        + (f" ({LLM_PREFIX}.blocks.{min(layers)}..{max(layers)})" if layers else ""))
    vit_layers = {int(m.group(1)) for k in keys if (m := _RESBLOCK.match(k))}
    n_vit = cfg["vision_backbone"].get("image_num_layers")
    if n_vit is not None and len(vit_layers) != n_vit:
        problems.append(f"vision_backbone.image_num_layers={n_vit} but {checkpoint} holds {len(vit_layers)} ViT blocks")
    add = cfg.get("additional_vocab_size") or 0
    new_key = f"{LLM_PREFIX}.wte.new_embedding"
    held = shape_of(new_key)[0] if new_key in have else 0
    if add != held:
        problems.append(f"additional_vocab_size={add} but {checkpoint} holds {held} rows in {new_key}")

    reported: set[str] = set()
    for key, dim, field, value in _probes(cfg):
        if value is None or key not in have or field in reported:
            continue
        shape = tuple(shape_of(key))
        if len(shape) <= dim:
            continue  # a differently laid-out tensor: the full shape check names it
        if shape[dim] != value:
            problems.append(f"{field}={value} but {checkpoint} has {key} of shape {list(shape)} "
                            f"({shape[dim]} in dimension {dim})")
            reported.add(field)  # one problem per field: its first probe says it
    _raise(where, problems)


def check_quantization(cfg: dict[str, Any], where: str | Path = "config.json") -> None:
    """The numbers of a ``quantization_config`` block written by ``molmoe-lite quantize`` (another
    tool's block is refused by the loader, naming its ``quant_method``)."""
    q = cfg.get("quantization_config")
    if q is None:
        return
    if not isinstance(q, dict):
        _raise(where, [f"quantization_config={q!r} must be an object"])
    if q.get("quant_method") != "molmoe-lite":
        return
    problems = []
    if q.get("bits") not in (4, 8) or isinstance(q.get("bits"), bool):
        problems.append(f"quantization_config.bits={q.get('bits')!r} must be 4 or 8")
    g = q.get("group_size")
    if g is not None and (not _is_int(g) or g <= 0):
        problems.append(f"quantization_config.group_size={g!r} must be a positive integer or null")
    modules = q.get("modules", ["experts"])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        problems.append(f"quantization_config.modules={modules!r} must be a list of module group names")
    _raise(where, problems)


def check_config(cfg: dict[str, Any], reader, where: str | Path = "config.json") -> None:
    """``check_values`` then ``check_against_checkpoint`` on an open ``CheckpointReader``."""
    check_values(cfg, where)
    check_quantization(cfg, where)
    check_against_checkpoint(cfg, reader.keys(), reader.shape, where, reader.path.name)
