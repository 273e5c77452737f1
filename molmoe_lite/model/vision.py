"""The MolmoE vision backbone: CLIP ViT -> 2x2 attention pooling -> MLP projector.

Each crop of the processor's output (P = 24 x 24 patches of 14 x 14 x 3 pixels) becomes
Gh x Gw = 12 x 12 vectors of the LLM's width, in five steps that follow the release:

1. ViT (CLIP ViT-L/14-336 cut to its first blocks, no final LayerNorm): a bias-free Linear
   over each flattened patch, the class embedding prepended, positional embeddings added,
   ``pre_ln``, then pre-LN residual blocks (attention, QuickGELU MLP). Every block output is kept.
2. Features: the block outputs named by ``vit_layers`` (negative = from the end, e.g. [-2, -9]
   -> blocks 21 then 14) concatenated along channels, class position dropped. A crop holding
   any exact -1.0 (the batch padding value) gets all its features zeroed; since nothing of it
   survives, the ViT is simply not run on such crops.
3. Padding embeddings: ``pad_embed[0]`` where a patch's mask is 0, ``pad_embed[1]`` where it is
   < 1 and != 0 (so the processor's -1 mask rows count as partial padding).
4. Pooling ("attention-meanq"): each 2 x 2 block of the patch grid (zero-padded at the bottom/
   right when the grid is odd) -> one vector, by multi-head attention over the block's 4
   vectors with their mean as the single query. Output row-major over the pooled grid.
5. Projector: ``w2(silu(w1 x) * w3 x)``.

Precision: the compute dtype (fp32, bf16 or fp16) is fixed at construction. LayerNorms and
attention (q, k, v, softmax, weighted sum) run in fp32 and cast back, as the release does with
``float32_attention``; the matmuls of the projections run in the compute dtype. The weights
may be stored narrower than that (``load()`` keeps a bf16 checkpoint's ViT in bf16 for an fp32
model on a CPU: half the memory, the same values): each block is then widened for its own
call only (``run_in_dtype``).

Shape legend: B batch, n crops per sample, N = B*n crops, P patches per crop (24*24),
F = patch inputs (14*14*3), D ViT width, C = D * len(vit_layers) pooled input width,
G = Gh*Gw pooled tokens per crop (12*12), d LLM width.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from molmoe_lite.config import ConfigError, MolmoeConfig, VisionConfig
from molmoe_lite.errors import MolmoeLiteError

# The processor pads batches (images and masks alike) with this exact value.
BATCH_PAD_VALUE = -1.0

# Each ViT block runs at most this many crops at a time, so its working memory (about 30 MB a
# crop in fp32, at the MLP) does not grow with the number of crops of a batch. Four crops are
# 2308 rows, already enough for full-speed matmuls (on a 2-core AVX-512 CPU: 233 GFLOP/s at
# 2308 rows against 229 at all 7 crops of a 640x480 image).
VIT_CROPS_PER_PASS = 4


class VisionInputError(MolmoeLiteError, ValueError):
    """Images or image masks whose shapes do not fit the vision backbone's config."""


def in_dtype(module: nn.Module, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """``module`` as a function whose floating-point parameters are cast to ``dtype``, once.

    The module itself when they already are. Otherwise the widened copies live as long as the
    returned function, so a model whose weights are stored narrower holds one module's wide
    copy at a time.
    """
    params = dict(module.named_parameters())
    if all(p.dtype == dtype or not p.is_floating_point() for p in params.values()):
        return module
    wide = {name: p.to(dtype) if p.is_floating_point() else p for name, p in params.items()}
    return lambda *args: torch.func.functional_call(module, wide, args)


def run_in_dtype(module: nn.Module, dtype: torch.dtype, *args: torch.Tensor) -> torch.Tensor:
    """``module(*args)`` with its floating-point parameters cast to ``dtype`` for this call only."""
    return in_dtype(module, dtype)(*args)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's GELU approximation ``x * sigmoid(1.702 x)`` (the release fixes it for the ViT).

    Computed as ``silu(1.702 x) / 1.702``, the same function: one fused kernel and two in-place
    scalings on one new tensor, where the plain form makes three (on a 2-core AVX-512 CPU,
    36 ms against 93 ms per call at four crops' MLP width, float32).
    """
    return F.silu(x * 1.702, inplace=True).div_(1.702)


class LayerNormFp32(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back: bf16/fp16 weights give fp32-quality statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Non-causal multi-head attention with biases, used by the ViT blocks and by the pooling.

    ``wq`` maps queries, ``wk``/``wv`` keys and values (``n_kv_heads`` heads, shared by groups of
    query heads), ``wo`` the merged heads. Scores, softmax and the weighted sum run in fp32.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if n_heads % n_kv_heads:
            raise ConfigError(f"image_num_heads={n_heads} is not a multiple of image_num_key_value_heads={n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(in_dim, n_heads * head_dim, dtype=dtype)
        self.wk = nn.Linear(in_dim, n_kv_heads * head_dim, dtype=dtype)
        self.wv = nn.Linear(in_dim, n_kv_heads * head_dim, dtype=dtype)
        self.wo = nn.Linear(n_heads * head_dim, out_dim, dtype=dtype)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:  # [N, L, n*hd] -> [N, H, L, hd] fp32
        heads = x.unflatten(-1, (n, self.head_dim)).transpose(1, 2).float()
        if n != self.n_heads:  # grouped keys/values: head h reads kv head h // (H / n)
            heads = heads.repeat_interleave(self.n_heads // n, dim=1)
        return heads

    def forward(self, x_q: torch.Tensor, x_kv: torch.Tensor) -> torch.Tensor:
        # x_q [N, Lq, in], x_kv [N, Lk, in] -> [N, Lq, out]
        q = self._heads(self.wq(x_q), self.n_heads)  # [N, H, Lq, hd]
        k = self._heads(self.wk(x_kv), self.n_kv_heads)  # [N, H, Lk, hd]
        v = self._heads(self.wv(x_kv), self.n_kv_heads)  # [N, H, Lk, hd]
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(hd); fp32 in, fp32 softmax
        out = out.transpose(1, 2).flatten(2).to(x_q.dtype)  # [N, Lq, H*hd]
        return self.wo(out)


class ViTMLP(nn.Module):
    """``w2(quick_gelu(w1 x))`` with biases."""

    def __init__(self, dim: int, hidden: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, dtype=dtype)
        self.w2 = nn.Linear(hidden, dim, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, L, D] -> [N, L, D]
        return self.w2(quick_gelu(self.w1(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: ``x += attn(attention_norm(x)); x += mlp(ffn_norm(x))``."""

    def __init__(self, v: VisionConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(v.emb_dim, v.emb_dim, v.num_heads, v.num_kv_heads, v.head_dim, dtype)
        self.feed_forward = ViTMLP(v.emb_dim, v.mlp_dim, dtype)
        self.attention_norm = LayerNormFp32(v.emb_dim, eps=v.norm_eps, dtype=dtype)
        self.ffn_norm = LayerNormFp32(v.emb_dim, eps=v.norm_eps, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 1+P, D] -> [N, 1+P, D]
        h = self.attention_norm(x)
        x = x + self.attention(h, h)
        return x + self.feed_forward(self.ffn_norm(x))


class BlockCollection(nn.Module):
    """Holds ``resblocks`` (the release's ``image_vit.transformer``)."""

    def __init__(self, v: VisionConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(v, dtype) for _ in range(v.num_layers))


class ViT(nn.Module):
    """The CLIP ViT: patches -> the output of every residual block (class position included)."""

    def __init__(self, v: VisionConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        gh, gw = v.grid
        if v.num_pos != 1 + gh * gw:
            raise ConfigError(
                f"vision_backbone.image_num_pos={v.num_pos} but a {v.input_size[0]}x{v.input_size[1]} crop has "
                f"1 + {gh}x{gw} positions; resizing positional embeddings is not implemented"
            )
        self.class_embedding = nn.Parameter(torch.zeros(v.emb_dim, dtype=dtype))  # [D]
        self.positional_embedding = nn.Parameter(torch.zeros(v.num_pos, v.emb_dim, dtype=dtype))  # [1+P, D]
        # Over patches flattened in (dh, dw, c) order: a CLIP conv weight [D, 3, p, p] maps here
        # by permute(0, 2, 3, 1).reshape(D, -1).
        self.patch_embedding = nn.Linear(v.patch_dim, v.emb_dim, bias=False, dtype=dtype)
        self.pre_ln = LayerNormFp32(v.emb_dim, eps=v.norm_eps, dtype=dtype)
        self.transformer = BlockCollection(v, dtype)
        self.compute_dtype = dtype or torch.get_default_dtype()

    def forward(self, patches: torch.Tensor, n_blocks: int | None = None,
                keep: tuple[int, ...] | None = None) -> list[torch.Tensor]:
        """patches [N, P, F] -> the outputs [N, 1+P, D] of the first ``n_blocks`` blocks (default all).

        ``keep``: only these blocks' outputs, in that order; the others are dropped as soon as
        the next block has run (the 22 blocks MolmoE runs on 13 crops would hold 0.31 GiB in
        bf16 at the peak of the prefill). Each block runs VIT_CROPS_PER_PASS crops at a time,
        its weights widened to the compute dtype once for all of them.
        """
        dtype = self.compute_dtype
        x = run_in_dtype(self.patch_embedding, dtype, patches.to(dtype))  # [N, P, D]
        cls = self.class_embedding.to(dtype).expand(x.shape[0], 1, -1)  # [N, 1, D]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(dtype)  # [N, 1+P, D]
        x = self.pre_ln(x)
        outputs = {}
        for i, block in enumerate(self.transformer.resblocks[:n_blocks]):
            run = in_dtype(block, dtype)
            x = torch.cat([run(crops) for crops in x.split(VIT_CROPS_PER_PASS)])
            if keep is None or i in keep:
                outputs[i] = x
        return list(outputs.values()) if keep is None else [outputs[i] for i in keep]


class ImageProjector(nn.Module):
    """SwiGLU MLP to the LLM's width: ``w2(silu(w1 x) * w3 x)``, no biases."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False, dtype=dtype)  # gate
        self.w2 = nn.Linear(hidden, out_dim, bias=False, dtype=dtype)  # down
        self.w3 = nn.Linear(in_dim, hidden, bias=False, dtype=dtype)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in] -> [..., out]
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class VisionBackbone(nn.Module):
    """``model.vision_backbone`` of the release: crops -> pooled, projected image features.

    Build it on the meta device and load the release's tensors (prefix stripped) with
    ``load_state_dict(..., assign=True)``. ``dtype`` is the compute dtype; weights loaded in a
    narrower dtype are widened module by module as they run.
    """

    def __init__(self, cfg: MolmoeConfig, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        v = cfg.vision
        self.cfg = cfg
        n_blocks = v.num_layers
        # vit_layers index the list of block outputs; 0-based block ids in the release's order.
        self.feature_blocks = tuple(i % n_blocks for i in cfg.vit_layers)
        self.image_vit = ViT(v, dtype)
        feat = cfg.vit_feature_dim  # C
        self.image_pooling_2d = MultiHeadAttention(feat, v.emb_dim, v.num_heads, v.num_kv_heads, v.head_dim, dtype)
        self.image_projector = ImageProjector(v.emb_dim, cfg.expert_hidden, cfg.d_model, dtype)
        self.pad_embed = nn.Parameter(torch.zeros(2, feat, dtype=dtype))  # [2, C]: full pad, partial pad

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (the ViT's, fixed at construction)."""
        return self.image_vit.compute_dtype

    # ---- the steps of the forward pass -------------------------------------------
    def crop_features(self, patches: torch.Tensor) -> torch.Tensor:
        """patches [N, P, F] -> concatenated ViT features [N, P, C] (class position dropped)."""
        # Blocks after the last one used would be computed for nothing.
        outputs = self.image_vit(patches, n_blocks=max(self.feature_blocks) + 1, keep=self.feature_blocks)
        return torch.cat(outputs, dim=-1)[:, 1:]

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, n, P, F] -> features [B, n, P, C]; crops with any exact -1.0 are all zeros."""
        B, n, P, Fdim = images.shape
        crops = images.reshape(B * n, P, Fdim)  # [N, P, F]
        real = (crops != BATCH_PAD_VALUE).flatten(1).all(dim=1)  # [N]
        if bool(real.all()):
            feats = self.crop_features(crops)
        else:
            feats = crops.new_zeros(B * n, P, self.cfg.vit_feature_dim, dtype=self.dtype)
            keep = real.nonzero()[:, 0]
            if keep.numel():
                feats[keep] = self.crop_features(crops[keep])
        return feats.reshape(B, n, P, feats.shape[-1])

    def add_pad_embed(self, feats: torch.Tensor, image_masks: torch.Tensor) -> torch.Tensor:
        """feats [B, n, P, C] + pad_embed by the fraction of real pixels per patch [B, n, P]."""
        m = image_masks.to(feats.device)[..., None]  # [B, n, P, 1]
        all_pad = (m == 0).float()
        partial_pad = ((m < 1) & (m != 0)).float()  # includes the -1 rows of the mask quirk
        pad = self.pad_embed.float()
        out = feats.float() + pad[0] * all_pad  # in fp32 like the release, then back
        out = out + pad[1] * partial_pad
        return out.to(feats.dtype)

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """feats [B, n, P, C] -> [B, n, G, D]: attention-meanq over each ph x pw block, row-major."""
        cfg = self.cfg
        B, n, P, C = feats.shape
        gh, gw = cfg.vision.grid
        ph, pw = cfg.image_pooling_h, cfg.image_pooling_w
        Gh, Gw = cfg.pooled_grid
        x = feats.reshape(B * n, gh, gw, C)
        x = F.pad(x, (0, 0, 0, Gw * pw - gw, 0, Gh * ph - gh))  # zeros bottom/right up to whole blocks
        # [N, Gh, ph, Gw, pw, C] -> [N*Gh*Gw, ph*pw, C]: one row per block, its vectors row-major
        x = x.reshape(B * n, Gh, ph, Gw, pw, C).permute(0, 1, 3, 2, 4, 5).reshape(B * n * Gh * Gw, ph * pw, C)
        query = x.mean(dim=1, keepdim=True)  # [N*G, 1, C]
        pooled = run_in_dtype(self.image_pooling_2d, self.dtype, query, x)  # [N*G, 1, D]
        return pooled.reshape(B, n, Gh * Gw, pooled.shape[-1])

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, n, P, F] (processor output, batch padding -1), image_masks [B, n, P] or None
        -> image features [B, n, G, d] in the compute dtype.

        ``image_masks=None`` means every patch is real: no padding embeddings are added.
        """
        self._check_inputs(images, image_masks)
        feats = self.encode(images)  # [B, n, P, C]
        if image_masks is not None:
            feats = self.add_pad_embed(feats, image_masks)
        return run_in_dtype(self.image_projector, self.dtype, self.pool(feats))  # [B, n, G, d]

    def _check_inputs(self, images: torch.Tensor, image_masks: torch.Tensor | None) -> None:
        v = self.cfg.vision
        P, Fdim = v.grid[0] * v.grid[1], v.patch_dim
        if images.dim() != 4 or tuple(images.shape[2:]) != (P, Fdim):
            raise VisionInputError(
                f"images must have shape [batch, crops, {P}, {Fdim}] (the processor's 'images', batched); "
                f"got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise VisionInputError(f"images must be a floating-point tensor, got {images.dtype}")
        if image_masks is not None and tuple(image_masks.shape) != tuple(images.shape[:3]):
            raise VisionInputError(
                f"image_masks must have shape {tuple(images.shape[:3])} to match images {tuple(images.shape)}; "
                f"got {tuple(image_masks.shape)}"
            )
