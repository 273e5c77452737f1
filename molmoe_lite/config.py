"""MolmoE configuration read straight from the release's ``config.json``.

The release ships remote code for its config class; we never run it. Instead the
field names of ``config.json`` are read directly into two frozen dataclasses
(``MolmoeConfig`` for the language model, ``VisionConfig`` for the ViT). Every
size the model uses is derived here from those fields, so the release's numbers
are just one instance and the tests' tiny models go through the same code.
Fields whose values select behaviour this implementation does not have are
checked up front and give a ``ConfigError`` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molmoe_lite.quantize.checkpoint import open_checkpoint, read_json_object
from molmoe_lite.quantize.config_check import ConfigError, check_config, check_values
from molmoe_lite.quantize.layout import expert_hidden_size

__all__ = ["ConfigError", "MolmoeConfig", "VisionConfig", "read_config_json"]


# field -> the only value(s) this implementation supports (release values listed first).
_SUPPORTED = {
    "block_type": ("moe",),
    "layer_norm_type": ("rms",),
    "activation_type": ("swiglu",),
    "attention_layer_norm": (True,),
    "attention_layer_norm_with_affine": (True, None),
    "layer_norm_with_affine": (True, None),
    "bias_for_layer_norm": (False, None),
    "qkv_bias": (False, None),
    "include_bias": (False, None),
    "rope": (True,),
    "rope_impl": ("llama", None),
    "alibi": (False, None),
    "clip_qkv": (None,),
    "weight_tying": (False,),
    "moe_shared_expert": (False, None),
    "norm_after": (False, None),
    "attn_logit_softcapping": (None,),
    "final_logit_softcapping": (None,),
    "scale_logits": (False, None),
    "image_pooling_2d": ("attention-meanq",),
    "image_projector": ("mlp",),
    "image_padding_embed": ("pad_and_partial_pad",),
    "crop_mode": ("overlap-and-resize-c2",),
    "use_cls_feature": (False, None),
    "multi_query_attention": (None, False),
}


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP ViT of the vision backbone (``config.json["vision_backbone"]``)."""

    emb_dim: int = 1024
    num_heads: int = 16
    num_kv_heads: int = 16
    head_dim: int = 64
    mlp_dim: int = 4096
    num_layers: int = 23
    num_pos: int = 577
    patch_size: int = 14
    input_size: tuple[int, int] = (336, 336)
    norm_eps: float = 1e-5

    @property
    def patch_dim(self) -> int:
        """Inputs per patch: patch x patch x 3 channels (588 in the release)."""
        return self.patch_size * self.patch_size * 3

    @property
    def grid(self) -> tuple[int, int]:
        """Patches per crop along (height, width): 24 x 24 in the release."""
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "VisionConfig":
        if d.get("image_model_type", "openai") != "openai":
            raise ConfigError(
                f"vision_backbone.image_model_type={d.get('image_model_type')!r} is not supported "
                "(only the CLIP 'openai' ViT is implemented)"
            )
        return cls(
            emb_dim=int(d.get("image_emb_dim", 1024)),
            num_heads=int(d.get("image_num_heads", 16)),
            num_kv_heads=int(d.get("image_num_key_value_heads") or d.get("image_num_heads", 16)),
            head_dim=int(d.get("image_head_dim", 64)),
            mlp_dim=int(d.get("image_mlp_dim", 4096)),
            num_layers=int(d.get("image_num_layers", 23)),
            num_pos=int(d.get("image_num_pos", 577)),
            patch_size=int(d.get("image_patch_size", 14)),
            input_size=tuple(int(x) for x in d.get("image_default_input_size", (336, 336))),
            norm_eps=float(d.get("image_norm_eps", 1e-5)),
        )


@dataclass(frozen=True)
class MolmoeConfig:
    """The language model, connector and preprocessing settings of a MolmoE checkpoint."""

    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    n_kv_heads: int = 16
    head_dim: int = 128
    expert_hidden: int = 1024
    moe_num_experts: int = 64
    moe_top_k: int = 8
    embedding_size: int = 50304
    additional_vocab_size: int = 128
    vocab_size: int = 50280
    max_sequence_length: int = 4096
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-5
    vit_layers: tuple[int, ...] = (-2, -9)
    image_pooling_h: int = 2
    image_pooling_w: int = 2
    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)
    use_col_tokens: bool = True
    pad_token_id: int = 1
    vision: VisionConfig = field(default_factory=VisionConfig)
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    # ---- derived sizes -------------------------------------------------------------
    @property
    def total_vocab(self) -> int:
        """Rows of the embedding: ``embedding`` plus ``new_embedding`` (50304 + 128)."""
        return self.embedding_size + self.additional_vocab_size

    @property
    def vit_feature_dim(self) -> int:
        """Channels of the concatenated ViT layers fed to pooling (2048 in the release)."""
        return self.vision.emb_dim * len(self.vit_layers)

    @property
    def pooled_grid(self) -> tuple[int, int]:
        """Pooled tokens per crop along (h, w): 12 x 12 in the release."""
        gh, gw = self.vision.grid
        return (gh + self.image_pooling_h - 1) // self.image_pooling_h, (
            gw + self.image_pooling_w - 1
        ) // self.image_pooling_w

    # ---- construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str | Path = "config.json") -> "MolmoeConfig":
        """Build from the release's config.json fields; unsupported values or sizes out of range
        raise ConfigError (``where`` names the file in the message)."""
        if d.get("model_type") != "molmo":
            raise ConfigError(
                f"{where}: model_type is {d.get('model_type')!r}, expected 'molmo' (a MolmoE checkpoint)"
            )
        for name in ("d_model", "n_layers", "n_heads", "moe_num_experts", "moe_top_k", "vision_backbone"):
            if name not in d or d[name] is None:
                raise ConfigError(f"{where}: config field {name!r} is missing (needed for a MolmoE-style model)")
        for name, allowed in _SUPPORTED.items():
            if name in d and d[name] not in allowed:
                raise ConfigError(
                    f"{where}: config field {name}={d[name]!r} is not supported by molmoe-lite "
                    f"(supported: {', '.join(repr(a) for a in allowed if a is not None)})"
                )
        check_values(d, where)  # signs, ranges and divisibility, before any size is derived
        d_model = int(d["d_model"])
        n_heads = int(d["n_heads"])
        n_kv_heads = int(d.get("n_kv_heads") or n_heads)
        head_dim = int(d.get("head_dim") or d_model // n_heads)
        hidden = expert_hidden_size(d)
        top_k, n_exp = int(d["moe_top_k"]), int(d["moe_num_experts"])
        vit_layers = tuple(int(i) for i in d.get("vit_layers", (-2, -9)))
        vision = VisionConfig.from_dict(d["vision_backbone"] or {})
        return cls(
            d_model=d_model,
            n_layers=int(d["n_layers"]),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            expert_hidden=hidden,
            moe_num_experts=n_exp,
            moe_top_k=top_k,
            embedding_size=int(d.get("embedding_size") or d.get("vocab_size")),
            additional_vocab_size=int(d.get("additional_vocab_size") or 0),
            vocab_size=int(d.get("vocab_size", d.get("embedding_size"))),
            max_sequence_length=int(d.get("max_sequence_length", 4096)),
            rope_theta=float(d.get("rope_theta", 10000.0)),
            layer_norm_eps=float(d.get("layer_norm_eps", 1e-5)),
            vit_layers=vit_layers,
            image_pooling_h=int(d.get("image_pooling_h", 2)),
            image_pooling_w=int(d.get("image_pooling_w", 2)),
            max_crops=int(d.get("max_crops", 12)),
            overlap_margins=tuple(int(x) for x in d.get("overlap_margins", (4, 4))),
            use_col_tokens=bool(d.get("use_col_tokens", True)),
            pad_token_id=int(d.get("pad_token_id", 1) if d.get("pad_token_id") is not None else 1),
            vision=vision,
            raw=dict(d),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "MolmoeConfig":
        """Read ``config.json`` from a folder (or the file itself)."""
        return cls.from_dict(read_config_json(path), _config_file(path))

    @classmethod
    def from_checkpoint(cls, folder: str | Path) -> "MolmoeConfig":
        """``from_pretrained``, with every size also checked against the checkpoint in ``folder``
        (tensor headers only, no data read), so that nothing is built from a wrong size."""
        d = read_config_json(folder)
        where = _config_file(folder)
        config = cls.from_dict(d, where)
        with open_checkpoint(folder, shared_mmap=True) as reader:  # headers only; never written
            check_config(d, reader, where)
        return config


def _config_file(path: str | Path) -> Path:
    path = Path(path)
    return path / "config.json" if path.is_dir() else path


def read_config_json(path: str | Path) -> dict[str, Any]:
    """Load a config.json (folder or file) as a dict, with errors that name the file."""
    file = _config_file(path)
    if not file.exists():
        raise ConfigError(f"{file}: no config.json here (is this a MolmoE checkpoint folder?)")
    return read_json_object(file, ConfigError)
