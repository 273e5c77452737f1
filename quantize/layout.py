"""The release's tensor layout: every key name and shape, derived from config.json alone.

The converter and the loader both need to know which tensors a MolmoE checkpoint
must hold and what shape each has, without building a model. This module derives
them from the raw config dict (never the runtime's config class: ``quantize``
imports nothing from the runtime). Sizes follow the architecture doc's
"sizes as functions of config.json"; the release's numbers are one instance.
"""

from __future__ import annotations

from typing import Any

LLM_PREFIX = "model.transformer"
VIT_PREFIX = "model.vision_backbone"


def expert_hidden_size(cfg: dict[str, Any]) -> int:
    """Hidden size of one expert: ``mlp_hidden_size // 2`` when set, else ``mlp_ratio * d_model // 2``."""
    if cfg.get("mlp_hidden_size"):
        return int(cfg["mlp_hidden_size"]) // 2
    return int(cfg.get("mlp_ratio", 4) * int(cfg["d_model"])) // 2


def expert_key(layer: int, expert: int, proj: str) -> str:
    """Key of one expert matrix, ``proj`` in gate_proj/up_proj/down_proj."""
    return f"{LLM_PREFIX}.blocks.{layer}.mlp.experts.{expert}.{proj}.weight"


def expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of a release checkpoint, key -> shape, in the release's order."""
    d = int(cfg["d_model"])
    n_layers = int(cfg["n_layers"])
    n_exp = int(cfg["moe_num_experts"])
    h = expert_hidden_size(cfg)
    n_heads = int(cfg["n_heads"])
    head_dim = int(cfg.get("head_dim") or d // n_heads)
    n_kv = int(cfg.get("n_kv_heads") or n_heads)
    v = cfg["vision_backbone"]
    vd = int(v["image_emb_dim"])
    vh, vkv = int(v["image_num_heads"]), int(v.get("image_num_key_value_heads") or v["image_num_heads"])
    vhd = int(v["image_head_dim"])
    patch = int(v["image_patch_size"])
    feat = vd * len(cfg["vit_layers"])

    s: dict[str, tuple[int, ...]] = {}
    t = LLM_PREFIX
    s[f"{t}.wte.embedding"] = (int(cfg["embedding_size"]), d)
    if cfg.get("additional_vocab_size"):
        s[f"{t}.wte.new_embedding"] = (int(cfg["additional_vocab_size"]), d)
    for i in range(n_layers):
        b = f"{t}.blocks.{i}"
        s[f"{b}.attn.att_proj.weight"] = (n_heads * head_dim + 2 * n_kv * head_dim, d)
        s[f"{b}.attn.attn_out.weight"] = (d, n_heads * head_dim)
        s[f"{b}.attn.attn_norm.weight"] = (d,)
        s[f"{b}.attn.q_norm.weight"] = (n_heads * head_dim,)
        s[f"{b}.attn.k_norm.weight"] = (n_kv * head_dim,)
        s[f"{b}.mlp.ff_norm.weight"] = (d,)
        s[f"{b}.mlp.gate.weight"] = (n_exp, d)
        for e in range(n_exp):
            s[expert_key(i, e, "gate_proj")] = (h, d)
            s[expert_key(i, e, "up_proj")] = (h, d)
            s[expert_key(i, e, "down_proj")] = (d, h)
    s[f"{t}.ln_f.weight"] = (d,)

    vit = f"{VIT_PREFIX}.image_vit"
    s[f"{vit}.class_embedding"] = (vd,)
    s[f"{vit}.positional_embedding"] = (int(v["image_num_pos"]), vd)
    s[f"{vit}.patch_embedding.weight"] = (vd, patch * patch * 3)
    s[f"{vit}.pre_ln.weight"] = (vd,)
    s[f"{vit}.pre_ln.bias"] = (vd,)
    for n in range(int(v["image_num_layers"])):
        r = f"{vit}.transformer.resblocks.{n}"
        for w in ("wq", "wk", "wv"):
            out = (vh if w == "wq" else vkv) * vhd
            s[f"{r}.attention.{w}.weight"] = (out, vd)
            s[f"{r}.attention.{w}.bias"] = (out,)
        s[f"{r}.attention.wo.weight"] = (vd, vh * vhd)
        s[f"{r}.attention.wo.bias"] = (vd,)
        s[f"{r}.feed_forward.w1.weight"] = (int(v["image_mlp_dim"]), vd)
        s[f"{r}.feed_forward.w1.bias"] = (int(v["image_mlp_dim"]),)
        s[f"{r}.feed_forward.w2.weight"] = (vd, int(v["image_mlp_dim"]))
        s[f"{r}.feed_forward.w2.bias"] = (vd,)
        for ln in ("attention_norm", "ffn_norm"):
            s[f"{r}.{ln}.weight"] = (vd,)
            s[f"{r}.{ln}.bias"] = (vd,)
    pool = f"{VIT_PREFIX}.image_pooling_2d"
    for w in ("wq", "wk", "wv"):
        out = (vh if w == "wq" else vkv) * vhd
        s[f"{pool}.{w}.weight"] = (out, feat)
        s[f"{pool}.{w}.bias"] = (out,)
    s[f"{pool}.wo.weight"] = (vd, vh * vhd)
    s[f"{pool}.wo.bias"] = (vd,)
    proj = f"{VIT_PREFIX}.image_projector"
    s[f"{proj}.w1.weight"] = (h, vd)
    s[f"{proj}.w3.weight"] = (h, vd)
    s[f"{proj}.w2.weight"] = (d, h)
    s[f"{VIT_PREFIX}.pad_embed"] = (2, feat)
    s["lm_head.weight"] = (int(cfg["embedding_size"]), d)
    return s
