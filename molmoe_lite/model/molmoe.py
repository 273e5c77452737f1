"""The whole MolmoE model: vision backbone + OLMoE decoder + lm_head, in the release's key layout.

Forward pass: token ids are embedded (id -1, the batch pad, as id 0); when images are
given, the vision backbone turns each crop into pooled, projected features which are
*added* to the embeddings at ``image_input_idx`` (negative indices skipped); the decoder
runs with positions ``clamp(cumsum(mask) - 1, 0)`` so padding on either side works; the
lm_head is applied only where logits are needed. The module tree mirrors the release's
key names (``model.transformer...``, ``model.vision_backbone...``, ``lm_head``) so a
checkpoint loads with ``load_state_dict(assign=True)`` onto a model built on the meta
device, without a second copy. Generation lives in ``molmoe_lite.generation``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from molmoe_lite.config import MolmoeConfig
from molmoe_lite.generation import GenerationMixin
from molmoe_lite.model.decoder import KVCache, Transformer
from molmoe_lite.model.vision import VisionBackbone
from molmoe_lite.quantize.checkpoint import readers_kept_open
from molmoe_lite.errors import UsageError


class MolmoeBody(nn.Module):
    """``model.*`` of the release: the decoder (``transformer``) and the ``vision_backbone``."""

    def __init__(self, config: MolmoeConfig, dtype: torch.dtype):
        super().__init__()
        self.transformer = Transformer(config, dtype=dtype)
        self.vision_backbone = VisionBackbone(config, dtype=dtype)


class MolmoE(GenerationMixin, nn.Module):
    """MolmoE-1B (or any size its config.json describes) with the release's API.

    ``processor`` is attached by ``molmoe_lite.load``; ``dtype`` is the compute dtype.
    """

    def __init__(self, config: MolmoeConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.compute_dtype = dtype
        self.model = MolmoeBody(config, dtype)
        self.lm_head = nn.Linear(config.d_model, config.embedding_size, bias=False, dtype=dtype)
        self.processor = None

    @property
    def device(self) -> torch.device:
        return self.model.transformer.ln_f.weight.device

    def state_dict(self, *args, **kwargs):
        # experts loaded from a converted folder read their stored scales again from its files:
        # each file is opened once for the whole dict, and closed at the end (nothing kept)
        with readers_kept_open():
            return super().state_dict(*args, **kwargs)

    # ---- pieces of the forward pass ---------------------------------------------
    def embed(
        self,
        input_ids: torch.Tensor,  # [B, L]
        images: torch.Tensor | None = None,  # [B, n, 576, 588]
        image_input_idx: torch.Tensor | None = None,  # [B, n, 144]
        image_masks: torch.Tensor | None = None,  # [B, n, 576]
    ) -> torch.Tensor:  # [B, L, d]
        """Token embeddings with image features added at their ``<im_patch>`` positions."""
        x = self.model.transformer.embed(input_ids)
        if images is None:
            return x
        if image_input_idx is None:
            raise UsageError("images were given without image_input_idx (use the processor's output)")
        batch = input_ids.shape[0]
        feats = self.model.vision_backbone(images, image_masks)  # [B, n, P, d]
        feats = feats.reshape(batch, -1, feats.shape[-1]).to(x.dtype)  # [B, n*P, d]
        idx = image_input_idx.reshape(batch, -1)  # [B, n*P]
        if idx.shape[1] != feats.shape[1]:
            raise UsageError(
                f"image_input_idx has {idx.shape[1]} entries per row but the images give {feats.shape[1]} features"
            )
        x = x.clone()
        for b in range(batch):
            keep = idx[b] >= 0  # dropped overlap patches and batch padding are negative
            x[b].index_add_(0, idx[b][keep].long(), feats[b][keep])
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden.to(self.compute_dtype))

    def forward(
        self,
        input_ids: torch.Tensor,
        images: torch.Tensor | None = None,
        image_input_idx: torch.Tensor | None = None,
        image_masks: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        logits_at: Literal["all", "last"] = "all",
    ) -> torch.Tensor:
        """Logits [B, L, vocab] (or [B, 1, vocab] with ``logits_at="last"``).

        Unbatched inputs (input_ids of shape [L], images [n, 576, 588], ...) get a batch
        dimension of 1. ``attention_mask`` defaults to ``input_ids != -1``. With a cache,
        ``input_ids`` continue the cached sequence and ``attention_mask`` covers the
        whole sequence so far.
        """
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            images = None if images is None else images[None]
            image_input_idx = None if image_input_idx is None else image_input_idx[None]
            image_masks = None if image_masks is None else image_masks[None]
            attention_mask = None if attention_mask is None else attention_mask[None]
        device = self.device
        input_ids = input_ids.to(device)
        if attention_mask is None:
            if cache is not None and cache.length > 0:
                raise UsageError("continuing a cached sequence needs the attention_mask of the whole sequence")
            attention_mask = input_ids != -1
        attention_mask = attention_mask.to(device).bool()
        if images is not None:
            images = images.to(device)
            image_input_idx = image_input_idx.to(device)
            image_masks = None if image_masks is None else image_masks.to(device)
        x = self.embed(input_ids, images, image_input_idx, image_masks)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        hidden = self.model.transformer(x, positions, attention_mask, cache)
        if logits_at == "last":
            hidden = hidden[:, -1:]
        return self.logits(hidden)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty static KV cache for ``batch`` sequences of up to ``max_len`` tokens."""
        return self.model.transformer.new_cache(batch, max_len, self.device)
