"""Tiny random MolmoE checkpoints in the release's exact layout.

Real weights cannot be downloaded where this project is built and tested, so tests,
the offline demo and benchmarks make their own: a config.json with the release's
field names (small sizes, real image geometry: 336 px crops of 14 px patches), random
tensors under the release's key names (``quantize.layout``), written as the release
writes them (``pytorch_model.bin`` through ``torch.save``) or as safetensors. The
loading code that reads these is the code that reads real weights.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import torch

from molmoe_lite.quantize.layout import expected_shapes
from molmoe_lite.quantize.checkpoint import BIN_FILE
from molmoe_lite.quantize.writer import ShardedSafetensorsWriter

# The release's config.json with every size shrunk; fields the loader reads keep the
# release's names and (where they select behaviour) the release's values.
_TINY_CONFIG: dict[str, Any] = {
    "auto_map": {
        "AutoConfig": "config_molmoe.MolmoConfig",
        "AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM",
    },
    "architectures": ["OLMoForCausalLM"],
    "model_type": "molmo",
    "activation_type": "swiglu",
    "block_type": "moe",
    "layer_norm_type": "rms",
    "layer_norm_eps": 1e-5,
    "attention_layer_norm": True,
    "attention_layer_norm_with_affine": True,
    "layer_norm_with_affine": True,
    "bias_for_layer_norm": False,
    "include_bias": False,
    "qkv_bias": False,
    "clip_qkv": None,
    "rope": True,
    "rope_impl": "llama",
    "rope_full_precision": True,
    "rope_theta": 10000.0,
    "alibi": False,
    "weight_tying": False,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 4,
    "n_kv_heads": None,
    "head_dim": None,
    "mlp_ratio": 1,
    "mlp_hidden_size": None,
    "moe_num_experts": 8,
    "moe_top_k": 2,
    "moe_shared_expert": False,
    "embedding_size": 512,
    "additional_vocab_size": 16,
    "vocab_size": 480,
    "max_sequence_length": 4096,
    "max_position_embeddings": 32768,
    "pad_token_id": 1,
    "vit_layers": [-2, -4],
    "image_pooling_2d": "attention-meanq",
    "image_pooling_h": 2,
    "image_pooling_w": 2,
    "image_projector": "mlp",
    "image_padding_embed": "pad_and_partial_pad",
    "crop_mode": "overlap-and-resize-c2",
    "max_crops": 12,
    "overlap_margins": [4, 4],
    "use_col_tokens": True,
    "use_cls_feature": False,
    "float32_attention": True,
    "precision": "amp_bf16",
    "vision_backbone": {
        "image_model_type": "openai",
        "image_default_input_size": [336, 336],
        "image_emb_dim": 32,
        "image_head_dim": 16,
        "image_num_heads": 2,
        "image_num_key_value_heads": 2,
        "image_mlp_dim": 64,
        "image_mlp_activations": "quick_gelu",
        "image_num_layers": 4,
        "image_num_pos": 577,
        "image_patch_size": 14,
        "image_pos_patch_size": 14,
        "image_norm_eps": 1e-5,
    },
}


def tiny_config_dict(**overrides: Any) -> dict[str, Any]:
    """A release-style config.json dict with tiny sizes; keyword overrides replace top-level fields."""
    cfg = copy.deepcopy(_TINY_CONFIG)
    cfg.update(overrides)
    return cfg


def full_size_config_dict() -> dict[str, Any]:
    """The release's sizes (MolmoE-1B-0924) in the same config layout, for benchmarks at real shapes."""
    cfg = tiny_config_dict(
        d_model=2048,
        n_layers=16,
        n_heads=16,
        moe_num_experts=64,
        moe_top_k=8,
        embedding_size=50304,
        additional_vocab_size=128,
        vocab_size=50280,
        vit_layers=[-2, -9],
    )
    cfg["vision_backbone"].update(
        image_emb_dim=1024, image_head_dim=64, image_num_heads=16, image_num_key_value_heads=16,
        image_mlp_dim=4096, image_num_layers=23,
    )
    return cfg


def random_state_dict(
    cfg: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random tensors for every key of the release layout.

    Norm weights are near 1, biases and embeddings small, matrices scaled by
    1/sqrt(fan_in) so activations stay O(1) through the layers and the logits of a
    tiny model are neither flat nor saturated (tests compare them meaningfully).
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, shape in expected_shapes(cfg).items():
        if key.endswith(("norm.weight", "ln_f.weight", "pre_ln.weight")):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(("bias", "pad_embed", "class_embedding", "positional_embedding")):
            t = 0.1 * torch.randn(shape, generator=gen)
        elif key.endswith(("embedding", "new_embedding")):
            t = torch.randn(shape, generator=gen)
        else:  # a [out, in] matrix
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
        out[key] = t.to(dtype)
    return out


def write_config(cfg: dict[str, Any], folder: str | Path) -> Path:
    """Write ``config.json`` the way the release does (indented JSON)."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return path


def write_tiny_release(
    folder: str | Path,
    seed: int = 0,
    fmt: str = "bin",
    cfg: dict[str, Any] | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """A complete tiny release folder: config, random weights, tokenizer and processor files.

    ``fmt`` is "bin" (``pytorch_model.bin`` written with ``torch.save``, as the release
    is), "safetensors" or "sharded" (safetensors shards with an index).
    """
    from molmoe_lite.processor import PreprocessorConfig
    from molmoe_lite.testing.tiny_tokenizer import write_tiny_tokenizer

    folder = Path(folder)
    cfg = cfg or tiny_config_dict()
    write_config(cfg, folder)
    kwargs = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    save_release_checkpoint(random_state_dict(cfg, seed), folder, fmt, **kwargs)
    write_tiny_tokenizer(folder)
    PreprocessorConfig().save(folder)
    return folder


def save_release_checkpoint(
    state: Mapping[str, torch.Tensor],
    folder: str | Path,
    fmt: str = "bin",
    max_shard_bytes: int = 2 * 1024**3,
) -> list[Path]:
    """Write a state dict the way a release checkpoint comes .

    ``fmt``: ``"bin"`` -> ``pytorch_model.bin`` via ``torch.save`` (zip format, as the
    release); ``"safetensors"`` -> one ``model.safetensors``; ``"sharded"`` -> shards of
    at most ``max_shard_bytes`` plus ``model.safetensors.index.json``. Returns the files.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        path = folder / BIN_FILE
        torch.save(dict(state), path)
        return [path]
    if fmt == "safetensors":
        writer = ShardedSafetensorsWriter(folder, max_shard_bytes=sys.maxsize, single_file=True)
    elif fmt == "sharded":
        writer = ShardedSafetensorsWriter(folder, max_shard_bytes=max_shard_bytes)
    else:
        raise ValueError(f"fmt must be 'bin', 'safetensors' or 'sharded', got {fmt!r}")
    with writer:
        for key, tensor in state.items():
            writer.add(key, tensor)
        return writer.finish()
