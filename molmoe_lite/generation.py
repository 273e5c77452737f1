"""Text generation for MolmoE: the release's ``generate_from_batch`` and a simple ``generate``.

Method: every call runs an ``Engine`` sized to it (one row per prompt, a KV cache of the
longest prompt + new tokens, or ``max_context``): each prompt of the batch (pads are -1, as
the processor's ``collate`` makes it) is prefilled alone into its own cache row, so each row
computes what it would alone, and the rows then decode together, one token per row per
step (``fast_decode``: fixed shapes, a CUDA graph where possible). Greedy by default;
temperature and nucleus (top-p) sampling on request (``molmoe_lite.sampling``), row ``b``
with its own generator seeded ``seed + b``. A row stops at EOS or at a stop string; finished
rows are filled with the pad id. Streaming decodes the new ids incrementally and holds back
text that ends in an incomplete UTF-8 character, so the pieces always join to exactly the
full decode.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from molmoe_lite.engine import Engine, GPUMemoryError, RequestHandle  # noqa: F401 (GPUMemoryError re-exported)
from molmoe_lite.errors import UsageError
from molmoe_lite.sampling import SamplingSettings, TextPieces, _sample  # noqa: F401 (re-exported)


@dataclass
class GenerationStats:
    """Timings of the last generation call (``model.last_stats``)."""

    prompt_tokens: int = 0
    batch: int = 1
    new_tokens: int = 0
    ttft_s: float = 0.0  # prompt in -> first new token out (processor time excluded)
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, per second of decoding (per sequence)."""
        steps = self.new_tokens - 1
        span = self.total_s - self.ttft_s
        return steps / span if steps > 0 and span > 0 else 0.0


def to_left_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each row's -1 pads to the left; image indices move with their tokens."""
    ids = batch["input_ids"]
    if ids.dim() == 1:
        batch = {k: (v[None] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        ids = batch["input_ids"]
    out = dict(batch)
    real = ids != -1
    length = ids.shape[1]
    shift = length - real.sum(1)  # [B] pads per row
    if not bool(shift.any()):
        return out
    new_ids = torch.full_like(ids, -1)
    for b in range(ids.shape[0]):
        row = ids[b][real[b]]  # real tokens in order (pads may only trail or lead)
        new_ids[b, length - row.numel() :] = row
    out["input_ids"] = new_ids
    idx = batch.get("image_input_idx")
    if idx is not None:
        # indices are positions in the right-padded row; valid tokens keep their relative order
        first_real = real.float().argmax(1)  # leading pads already present, if any
        delta = (shift - first_real).view(-1, *([1] * (idx.dim() - 1)))
        out["image_input_idx"] = torch.where(idx >= 0, idx + delta, idx)
    return out


def split_batch(batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The rows of a (collated, -1 padded) batch as separate prompts; unbatched input is one row."""
    if batch["input_ids"].dim() == 1:
        return [batch]
    return [{k: v[b] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            for b in range(batch["input_ids"].shape[0])]


def pad_id_of(settings: SamplingSettings, tok: Any, eos_ids: set[int]) -> int:
    """What finished rows yield: the settings' pad id, else the tokenizer's, else an EOS id, else 0."""
    if settings.pad_token_id is not None:
        return settings.pad_token_id
    pad = getattr(tok, "pad_token_id", None) if tok is not None else None
    if pad is not None:
        return pad
    return min(eos_ids) if eos_ids else 0


def row_settings(settings: SamplingSettings, row: int) -> SamplingSettings:
    """The settings of row ``row`` of a batch: its seed is ``settings.seed + row``, so rows
    sample differently (the same seed would give identical prompts identical samples) while
    a batch of one samples as a single call with that seed. No seed stays no seed."""
    if settings.seed is None or row == 0:
        return settings
    return dataclasses.replace(settings, seed=settings.seed + row)


class GenerationMixin:
    """``generate_from_batch``, ``stream_tokens`` and ``generate`` for ``MolmoE``."""

    def _context_for(self, longest: int, settings: SamplingSettings) -> int:
        """The KV slots a call needs (``settings.max_context`` when set), or a clear error."""
        max_ctx = self.config.max_sequence_length
        needed = longest + settings.max_new_tokens
        if needed > max_ctx:
            raise UsageError(
                f"the prompt is {longest} tokens and max_new_tokens is {settings.max_new_tokens}: "
                f"together more than the model's context of {max_ctx} tokens "
                "(use a shorter prompt, a smaller image, or fewer new tokens)"
            )
        if settings.max_context is not None and needed > settings.max_context:
            raise UsageError(
                f"the prompt is {longest} tokens and max_new_tokens is {settings.max_new_tokens}: "
                f"{needed} tokens do not fit max_context={settings.max_context}"
            )
        return settings.max_context or needed

    @torch.inference_mode()
    def stream_tokens(
        self, batch: dict[str, torch.Tensor], settings: SamplingSettings, tokenizer: Any = None
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row ([B] long) until all rows stop.

        Rows that already stopped yield the pad id. With a seed, row ``b`` samples with
        ``settings.seed + b`` (see ``row_settings``).
        """
        prompts = split_batch(batch)
        longest = max(int((p["input_ids"] != -1).sum()) for p in prompts)
        context = self._context_for(longest, settings)
        if settings.max_new_tokens == 0:
            return
        tok = tokenizer or getattr(self.processor, "tokenizer", None)
        if settings.stop_strings and tok is None:
            raise UsageError("stop_strings need a tokenizer (pass tokenizer=...)")
        engine = Engine(self, max_batch=len(prompts), max_context=context, max_queue=len(prompts), tokenizer=tok)
        handles = [engine.submit(p, row_settings(settings, b)) for b, p in enumerate(prompts)]
        stats = GenerationStats(prompt_tokens=longest, batch=len(prompts))
        self.last_stats = stats
        pad = pad_id_of(settings, tok, engine.eos_ids(settings))
        yield from self._lockstep(engine, handles, pad, stats)

    def _lockstep(self, engine: Engine, handles: list[RequestHandle], pad: int,
                  stats: GenerationStats) -> Iterator[torch.Tensor]:
        """One engine step per yield: every row's token of that step, the pad id for rows done."""
        start = time.perf_counter()
        for step in itertools.count():
            running = engine.step()
            for handle in handles:
                if handle.done:
                    handle.result()  # raises what stopped the row, if anything did
            tokens = [h.token_ids[step] if len(h.token_ids) > step else pad for h in handles]
            now = time.perf_counter() - start
            if step == 0:
                stats.ttft_s = now
            stats.new_tokens, stats.total_s = step + 1, now
            yield torch.tensor(tokens, device=self.device)
            if running == 0:
                return

    @torch.inference_mode()
    def generate_from_batch(
        self,
        batch: dict[str, torch.Tensor],
        generation_config: Any = None,
        *,
        tokenizer: Any = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop_strings: Any = None,
        seed: int | None = None,
        max_context: int | None = None,
        **_ignored: Any,
    ) -> torch.Tensor:
        """Prompt + new ids, [B, L + n] (n the longest row's new tokens; shorter rows padded).

        Mirrors the release: ``generate_from_batch(batch, GenerationConfig(max_new_tokens=200,
        stop_strings="<|endoftext|>"), tokenizer=processor.tokenizer)``. Unbatched
        processor output is accepted (a batch of one). With sampling and a ``seed``, row
        ``b`` samples with ``seed + b``, as its own generator: identical prompts give
        different samples, as a batched sampler's rows would, and row 0 is what
        ``generate(..., seed=seed)`` gives.
        """
        settings = SamplingSettings.merge(
            generation_config,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_strings=stop_strings,
            seed=seed,
            max_context=max_context,
        )
        ids = batch["input_ids"]
        prompt = ids[None] if ids.dim() == 1 else ids
        steps = list(self.stream_tokens(batch, settings, tokenizer))
        if not steps:
            return prompt.clone()
        new = torch.stack(steps, dim=1).to(prompt.device)
        return torch.cat([prompt, new], dim=1)

    def generate(
        self,
        images: Any,
        prompt: str,
        max_new_tokens: int = 200,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stream: bool = False,
        seed: int | None = None,
        transparent: str = "composite",
        max_context: int | None = None,
    ) -> str | Iterator[str]:
        """The answer to ``prompt`` about ``images`` (one image, a list, or None for text only).

        With ``stream=True`` an iterator of text pieces whose concatenation is the answer.
        """
        if self.processor is None:
            raise UsageError("this model has no processor attached; load it with molmoe_lite.load()")
        inputs = self.processor.process(images=images, text=prompt, transparent=transparent)
        settings = SamplingSettings.merge(
            None, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            max_context=max_context,
        )
        pieces = self._stream_text(inputs, settings)
        return pieces if stream else "".join(pieces)

    def _stream_text(self, inputs: dict[str, torch.Tensor], settings: SamplingSettings) -> Iterator[str]:
        tok = self.processor.tokenizer
        text = TextPieces(tok)
        for nxt in self.stream_tokens(inputs, settings, tok):
            token = int(nxt[0])
            if token == tok.eos_token_id:
                break
            if piece := text.push(token):
                yield piece
        if rest := text.close():
            yield rest
