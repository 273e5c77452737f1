"""Decode steps with fixed shapes, replayed from a CUDA graph where that is possible.

A decode step feeds one token per row of a static KV cache through ``Transformer.run`` (the
one forward): each row writes its slot (``slots[b]``, its own length: rows may sit at
different lengths) and reads a prefix of the cache whose length is fixed per bucket of slots;
its position is its count of real keys (``key_mask``) so far. Every input lives in a static
buffer, so the step has no host sync. On CUDA, with quantised experts running the Triton
kernels, the step over the first ``n`` rows is captured in a CUDA graph once per (row bucket,
slot bucket) after a warm-up that also compiles the kernels, then replayed: one launch instead
of hundreds per token. Anywhere else (CPU, dense experts whose Python loop syncs with the
host, or a capture that fails) the same step runs eagerly, with one log line saying why.

``DecodeStep`` is the engine's; ``StaticDecoder`` drives it for rows that advance together.
"""

from __future__ import annotations

import logging

import torch
from molmoe_lite.errors import UsageError
from molmoe_lite.model.decoder import real_positions

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


def bucket(n: int, size: int, cap: int) -> int:
    """n rounded up to a multiple of ``size``, at most ``cap``."""
    return min(cap, -(-n // size) * size)


def row_bucket(n: int, cap: int) -> int:
    """n rounded up to a power of two, at most ``cap``: the batch sizes a graph is captured for."""
    return min(cap, 1 << max(0, n - 1).bit_length())


class DecodeStep:
    """One decode step over the first ``n`` rows of ``cache``, on static buffers.

    Before ``run(n, kv_len)``, set ``tokens[:n]`` (or ``embeds[:n]`` when the token table
    lives elsewhere, ``embed_in_step`` False), ``slots[:n]`` (the slot each row writes) and
    ``key_mask`` (True = a real key; the step marks each row's slot itself). ``run`` returns
    logits [n, vocab] (a buffer reused by the next step). With graphs, ``n`` and ``kv_len``
    should be bucket values: one graph per (n, kv_len) is captured.
    """

    def __init__(self, model, cache, use_graph: bool | None = None, slot_bucket: int = 256):
        self.model = model
        self.cache = cache
        self.slot_bucket = slot_bucket
        dev, rows = model.device, cache.batch
        self.key_mask = torch.zeros(rows, cache.max_len, dtype=torch.bool, device=dev)
        self.slots = torch.zeros(rows, dtype=torch.long, device=dev)
        self.embeds = torch.zeros(rows, 1, model.config.d_model, dtype=model.compute_dtype, device=dev)
        # with the token table on the model's device the lookup joins the captured step (its ids
        # come in through a static buffer); a table kept in CPU memory (`small`) stays outside
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=dev)
        self.embed_in_step = model.model.transformer.wte.embedding.device == dev
        reason = graph_capturable(model) if use_graph is not False else "disabled"
        self.use_graph = reason is None
        if reason is not None and use_graph is None and dev.type == "cuda":
            log.info("decode runs without a CUDA graph: %s", reason)
        # shapes from buckets (what graphs need); an eager step may use them too, to compare
        self.bucketed = self.use_graph
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None  # one memory pool shared by every graph

    @property
    def captured(self) -> bool:
        """Whether any decode step ran from a CUDA graph."""
        return bool(self.graphs)

    def set_tokens(self, n: int, tokens: torch.Tensor) -> None:
        """This step's tokens of the first n rows ([n] long)."""
        if self.embed_in_step:
            self.tokens[:n].copy_(tokens.view(-1, 1))
        else:
            self.embeds[:n].copy_(self.model.model.transformer.embed(tokens.view(-1, 1), check=False))

    def _step(self, n: int, kv_len: int) -> torch.Tensor:
        """The captured work: mark each row's slot real, run the step, project to logits."""
        transformer = self.model.model.transformer
        slots, key_mask = self.slots[:n], self.key_mask[:n]
        key_mask.scatter_(1, slots[:, None], True)
        embeds = transformer.embed(self.tokens[:n], check=False) if self.embed_in_step else self.embeds[:n]
        positions = real_positions(key_mask, slots, kv_len)  # [n, 1]
        hidden = transformer.run(embeds, positions, key_mask[:, :kv_len], self.cache.rows(0, n), slots)
        return self.model.logits(hidden)[:, -1]  # [n, vocab]

    def _capture(self, key: tuple[int, int]) -> None:
        if not self.graphs:
            log.info("compiling kernels and capturing the decode step in a CUDA graph (first step only)")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            # warm-up on the real inputs: writes the same slots the replay will, so it is harmless
            for _ in range(2):
                self._step(*key)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        # safe to share: each step's logits are consumed before the next replay; captured on the
        # warm-up's stream, where the kernels made what they keep (e.g. the down kernel's counters)
        with torch.cuda.graph(graph, pool=self._pool, stream=stream):
            logits = self._step(*key)
        self.graphs[key] = (graph, logits)

    def _graph_for(self, key: tuple[int, int]):
        """The captured graph for ``key``, capturing it first; None when capture is off or failed."""
        if self.use_graph and key not in self.graphs:
            try:
                self._capture(key)
            except torch.cuda.OutOfMemoryError:
                raise  # not a capture problem: the caller reports what would fit
            except Exception as exc:  # capture is an optimisation: fall back, say so once
                log.warning("CUDA graph capture failed (%s: %s); decoding eagerly", type(exc).__name__, exc)
                self.use_graph = False
                self.graphs.clear()
                torch.cuda.synchronize()
        return self.graphs.get(key) if self.use_graph else None

    def kv_len(self, longest: int) -> int:
        """Slots a step reads when the longest row writes slot ``longest - 1``: exactly that many
        when eager, the next bucket boundary with graphs (so one graph serves many steps)."""
        return bucket(longest, self.slot_bucket, self.cache.max_len) if self.bucketed else longest

    def n_rows(self, highest: int) -> int:
        """Rows a step runs when the highest busy row is ``highest - 1``: exactly that many when
        eager, the next power of two with graphs (one graph per batch-size bucket)."""
        return row_bucket(highest, self.cache.batch) if self.bucketed else highest

    @torch.inference_mode()
    def run(self, n: int, kv_len: int) -> torch.Tensor:
        """The step over the first n rows, reading kv_len slots; logits [n, vocab]."""
        key = (n, kv_len)
        captured = self._graph_for(key)
        if captured is None:
            return self._step(*key)
        graph, logits = captured
        graph.replay()
        return logits


class StaticDecoder(DecodeStep):
    """Decode steps for rows that advance together after a prefill of ``cache.length`` slots.

    ``key_mask`` [B, <= max_len] marks the real prompt keys (padding False); each
    ``step(tokens)`` writes the next slot of every row and returns logits [B, vocab] (a buffer
    reused by the next step). Attention reads exactly ``length + 1`` slots when eager; with
    graphs, the next multiple of ``bucket`` slots, one graph per bucket (a 1,200-token prompt +
    200 new tokens needs two), so a captured step reads at most ``bucket - 1`` unfilled
    (masked) slots.
    """

    def __init__(self, model, cache, key_mask: torch.Tensor, use_graph: bool | None = None, bucket: int = 256):
        super().__init__(model, cache, use_graph, slot_bucket=bucket)
        self.key_mask[:, : key_mask.shape[1]] = key_mask
        self.slots.fill_(cache.length)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row ([B] long); logits [B, vocab] for the next one."""
        if self.cache.length + 1 > self.cache.max_len:
            raise UsageError(f"KV cache full: {self.cache.length} of {self.cache.max_len} slots used")
        n = self.cache.batch
        self.set_tokens(n, tokens)
        logits = self.run(n, self.kv_len(self.cache.length + 1))
        self.slots += 1
        self.cache.length += 1
        return logits
