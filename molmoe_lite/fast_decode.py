"""Decode steps with fixed shapes, replayed from a CUDA graph where that is possible.

After the prefill, every decode step of a batch has the same shapes: one token
embedding per row, a static KV cache of ``max_len`` slots, a key mask over those slots and the slot
index as a device tensor (``Transformer.decode_static``); attention reads a prefix of the
cache whose length is fixed per bucket of positions. On CUDA, with quantised
experts running the Triton kernels (no host syncs anywhere in the step), the step is
captured in a CUDA graph (once per bucket) after a warm-up that also compiles the
kernels, then replayed: one launch instead of hundreds per token. Anywhere else (CPU, dense experts
whose Python loop syncs with the host, or a capture that fails) the same step runs
eagerly, with one log line saying why.
"""

from __future__ import annotations

import logging

import torch
from molmoe_lite.errors import UsageError

log = logging.getLogger("molmoe_lite")


def graph_capturable(model) -> str | None:
    """None when the decode step can be captured in a CUDA graph, else the reason it cannot."""
    from molmoe_lite.kernels.fused_moe import kernels_available
    from molmoe_lite.quantized import QuantizedExperts

    if model.device.type != "cuda":
        return "not on a CUDA device"
    if not all(isinstance(b.mlp.experts, QuantizedExperts) for b in model.model.transformer.blocks):
        return "dense experts (their Python loop waits for the GPU); quantise them for graph decode"
    if not kernels_available(model.device):
        return "the Triton kernels are unavailable"
    return None


class StaticDecoder:
    """Runs decode steps of ``model`` into ``cache`` after a prefill of ``cache.length`` tokens.

    ``key_mask`` [B, max_len] marks the real prompt keys; each ``step(tokens)`` writes the
    next slot and returns logits [B, vocab] (a buffer reused by the next step).

    Attention reads only the filled part of the cache: exactly ``length + 1`` slots when
    eager; with graphs, the next multiple of ``bucket`` slots, one graph per bucket
    (a 1,200-token prompt + 200 new tokens needs two), so a captured step reads at most
    ``bucket - 1`` unfilled (masked) slots.
    """

    def __init__(self, model, cache, key_mask: torch.Tensor, use_graph: bool | None = None, bucket: int = 256):
        self.model = model
        self.cache = cache
        self.bucket = bucket
        dev = model.device
        self.mask = torch.zeros(cache.batch, cache.max_len, dtype=torch.bool, device=dev)
        self.mask[:, : key_mask.shape[1]] = key_mask
        self.pos = torch.full((1,), cache.length, dtype=torch.long, device=dev)
        d = model.config.d_model
        self.embeds = torch.zeros(cache.batch, 1, d, dtype=model.compute_dtype, device=dev)
        # with the token table on the model's device the lookup joins the captured step (its ids
        # come in through a static buffer); a table kept in CPU memory (`small`) stays outside
        self.tokens = torch.zeros(cache.batch, 1, dtype=torch.long, device=dev)
        self.embed_in_step = model.model.transformer.wte.embedding.device == dev
        reason = graph_capturable(model) if use_graph is not False else "disabled"
        self.use_graph = reason is None
        if reason is not None and use_graph is None and dev.type == "cuda":
            log.info("decode runs without a CUDA graph: %s", reason)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # kv_len -> graph, logits
        self._pool = None  # one memory pool shared by every bucket's graph

    def _run(self, kv_len: int) -> torch.Tensor:
        """The captured work: mark this slot real, run the step, project to logits."""
        self.mask.index_fill_(1, self.pos, True)
        transformer = self.model.model.transformer
        embeds = transformer.embed(self.tokens, check=False) if self.embed_in_step else self.embeds
        hidden = transformer.decode_static(embeds, self.mask, self.cache, self.pos, kv_len)
        return self.model.logits(hidden)[:, -1]  # [B, vocab]

    def _capture(self, kv_len: int) -> None:
        if not self.graphs:
            log.info("compiling kernels and capturing the decode step in a CUDA graph (first step only)")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # warm-up on the real inputs: writes the same slot the replay will, so it is harmless
            for _ in range(2):
                self._run(kv_len)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # safe to share: each step's logits are consumed before the next replay
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._run(kv_len)
        self.graphs[kv_len] = (graph, logits)

    @property
    def captured(self) -> bool:
        """Whether any decode step ran from a CUDA graph."""
        return bool(self.graphs)

    def _bucket_len(self) -> int:
        need = self.cache.length + 1
        return min(self.cache.max_len, -(-need // self.bucket) * self.bucket)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B] long); logits [B, vocab] for the next one."""
        if self.cache.length + 1 > self.cache.max_len:
            raise UsageError(f"KV cache full: {self.cache.length} of {self.cache.max_len} slots used")
        if self.embed_in_step:
            self.tokens.copy_(tokens.view(-1, 1))
        else:
            self.embeds.copy_(self.model.model.transformer.embed(tokens.view(-1, 1), check=False))
        kv_len = self._bucket_len() if self.use_graph else self.cache.length + 1
        if self.use_graph and kv_len not in self.graphs:
            try:
                self._capture(kv_len)
            except torch.cuda.OutOfMemoryError:
                raise  # not a capture problem: the caller reports what would fit
            except Exception as exc:  # capture is an optimisation: fall back, say so once
                log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(exc).__name__, exc)
                self.use_graph = False
                self.graphs.clear()
                torch.cuda.synchronize()
                kv_len = self.cache.length + 1
        if self.use_graph:
            graph, out = self.graphs[kv_len]
            graph.replay()
        else:
            out = self._run(kv_len)
        self.pos += 1
        self.cache.length += 1
        return out
