"""Text generation for MolmoE: the release's ``generate_from_batch`` and a simple ``generate``.

Method: a batch (pads are -1, right-padded as the processor's ``collate`` makes it)
is first moved to left padding, row by row (image indices shifted with their
tokens), so every row's last prompt token sits in the last column; positions come
from the attention mask, so each row computes what it would alone. One prefill
fills a static KV cache sized to prompt + new tokens and yields logits at the last
position only; each decode step then feeds one token per row through
``fast_decode.StaticDecoder`` (fixed shapes; a CUDA graph where possible). Greedy by default;
temperature and nucleus (top-p) sampling on request. A row stops at EOS or at a stop
string; finished rows are filled with the pad id. Streaming decodes the new ids
incrementally and holds back text that ends in an incomplete UTF-8 character, so the
pieces always join to exactly the full decode.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from molmoe_lite.fast_decode import StaticDecoder
from molmoe_lite.errors import MolmoeLiteError, UsageError


class GPUMemoryError(MolmoeLiteError, MemoryError):
    """Generation ran out of GPU memory; the message names what would fit."""


def _out_of_memory(length: int, settings: "SamplingSettings", batch: int) -> GPUMemoryError:
    return GPUMemoryError(
        f"out of GPU memory for a {length}-token prompt with {settings.max_new_tokens} new tokens "
        f"(batch {batch}). Try the `small` preset (load(..., preset='small'), `--preset small`), "
        "fewer new tokens or a smaller image, or a smaller --max-context"
    )


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


@dataclass
class SamplingSettings:
    """What one generation call does, merged from a GenerationConfig and keyword arguments."""

    max_new_tokens: int = 200
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop_strings: tuple[str, ...] = ()
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    seed: int | None = None
    max_context: int | None = None  # KV-cache slots; None = prompt + max_new_tokens

    @classmethod
    def merge(cls, generation_config: Any = None, **overrides: Any) -> "SamplingSettings":
        s = cls()
        if generation_config is not None:
            get = (lambda k: generation_config.get(k)) if isinstance(generation_config, dict) else (
                lambda k: getattr(generation_config, k, None)
            )
            if get("max_new_tokens") is not None:
                s.max_new_tokens = int(get("max_new_tokens"))
            if get("do_sample"):
                s.temperature = float(get("temperature") or 1.0)
                s.top_p = float(get("top_p") or 1.0)
            stops = get("stop_strings")
            if stops:
                s.stop_strings = (stops,) if isinstance(stops, str) else tuple(stops)
            eos = get("eos_token_id")
            if eos is not None:
                s.eos_token_id = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else int(eos)
            if get("pad_token_id") is not None:
                s.pad_token_id = int(get("pad_token_id"))
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "stop_strings":
                value = (value,) if isinstance(value, str) else tuple(value)
            setattr(s, key, value)
        if s.max_new_tokens < 0:
            raise UsageError(f"max_new_tokens must be >= 0, got {s.max_new_tokens}")
        if s.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {s.temperature}")
        if not 0 < s.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {s.top_p}")
        return s


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


def _sample(logits: torch.Tensor, s: SamplingSettings, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits [B, V]."""
    if s.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= s.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def sample_rows(logits: torch.Tensor, settings: list[SamplingSettings],
                generators: list[torch.Generator | None]) -> list[int]:
    """One token per row from logits [n, V], each row with its own settings and generator, so a
    seeded row draws the same tokens whatever else is in the batch. One host sync."""
    tokens = logits.argmax(-1)
    for i, (s, gen) in enumerate(zip(settings, generators)):
        if s.temperature > 0:
            tokens[i] = _sample(logits[i : i + 1], s, gen)[0]
    return tokens.tolist()


def eos_ids_of(settings: SamplingSettings, tokenizer: Any) -> set[int]:
    """The ids that end a row: the settings' EOS id(s), else the tokenizer's."""
    eos = settings.eos_token_id
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    return set() if eos is None else set(eos) if isinstance(eos, tuple) else {eos}


def hits_stop(ids: list[int], stops: tuple[str, ...], tok: Any) -> bool:
    """Whether the text of ``ids`` ends with (contains, near its end) one of the stop strings."""
    if not stops:
        return False
    # byte-level BPE: a stop string of n UTF-8 bytes spans at most n tokens, plus one that
    # may carry bytes before it
    longest = max(len(s.encode("utf-8")) for s in stops)
    tail = tok.decode(ids[-(longest + 1) :], skip_special_tokens=False)
    return any(s in tail for s in stops)


def check_finite(logits: torch.Tensor, dtype: torch.dtype) -> None:
    """float16 can overflow on a prompt; say so rather than sample from NaNs."""
    if dtype == torch.float16 and not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            "float16 overflowed (non-finite logits after the prompt); load with dtype='bfloat16' "
            "if the GPU has it, else dtype='float32'"
        )


class TextPieces:
    """Generated ids in, text pieces out: the pieces always join to the text so far.

    Text that ends in an incomplete UTF-8 character is held back until its last byte
    arrives, and so is an ending that could be the start of a stop string; ``close``
    releases the rest, cut before the first stop string when the row ended on one.
    """

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.ids: list[int] = []
        self.shown = ""
        self.text = ""

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _held_back(self, text: str) -> int:
        """How many characters at the end of ``text`` could begin a stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stop_strings), default=0)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop_strings):
                return n
        return 0

    def _show(self, text: str) -> str:
        if not text.startswith(self.shown) or len(text) <= len(self.shown):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece

    def push(self, token: int) -> str:
        """Add one generated id; the text that can be shown now (maybe empty)."""
        if self.tokenizer is None:
            return ""
        self.ids.append(token)
        text = self._decode()
        if text.endswith("\ufffd"):
            return ""
        return self._show(text[: len(text) - self._held_back(text)])

    def close(self, stopped: bool = False) -> str:
        """The rest of the text; with ``stopped``, the text ends before its first stop string."""
        text = self._decode() if self.tokenizer is not None else ""
        if stopped:
            cuts = [text.find(s) for s in self.stop_strings if s in text]
            text = text[: min(cuts)] if cuts else text
        self.text = text
        if not text.startswith(self.shown):  # pragma: no cover - byte-level decoding is prefix-stable
            raise RuntimeError("streamed text diverged from the full decode")
        return self._show(text)


class GenerationMixin:
    """``generate_from_batch``, ``stream_tokens`` and ``generate`` for ``MolmoE``."""

    @torch.inference_mode()
    def stream_tokens(
        self, batch: dict[str, torch.Tensor], settings: SamplingSettings, tokenizer: Any = None
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every row ([B] long) until all rows stop.

        Rows that already stopped yield the pad id.
        """
        batch = to_left_padding(batch)
        ids = batch["input_ids"].to(self.device)
        bsz, length = ids.shape
        max_ctx = self.config.max_sequence_length
        if length + settings.max_new_tokens > max_ctx:
            raise UsageError(
                f"the prompt is {length} tokens and max_new_tokens is {settings.max_new_tokens}: "
                f"together more than the model's context of {max_ctx} tokens "
                "(use a shorter prompt, a smaller image, or fewer new tokens)"
            )
        needed = length + settings.max_new_tokens
        if settings.max_context is not None and needed > settings.max_context:
            raise UsageError(
                f"the prompt is {length} tokens and max_new_tokens is {settings.max_new_tokens}: "
                f"{needed} tokens do not fit max_context={settings.max_context}"
            )
        if settings.max_new_tokens == 0:
            return
        tok = tokenizer or getattr(self.processor, "tokenizer", None)
        eos = settings.eos_token_id
        if eos is None and tok is not None:
            eos = tok.eos_token_id
        eos_ids = set() if eos is None else set(eos) if isinstance(eos, tuple) else {eos}
        pad = settings.pad_token_id
        if pad is None:
            pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        if pad is None:
            pad = min(eos_ids) if eos_ids else 0
        if settings.stop_strings and tok is None:
            raise UsageError("stop_strings need a tokenizer (pass tokenizer=...)")
        gen = torch.Generator(device=self.device).manual_seed(settings.seed) if settings.seed is not None else None

        mask = ids != -1
        start = time.perf_counter()
        stats = GenerationStats(prompt_tokens=length, batch=bsz)
        self.last_stats = stats
        try:
            cache = self.new_cache(bsz, settings.max_context or needed)
            logits = self(
                ids,
                images=batch.get("images"),
                image_input_idx=batch.get("image_input_idx"),
                image_masks=batch.get("image_masks"),
                attention_mask=mask,
                cache=cache,
                logits_at="last",
            )[:, -1]
        except torch.cuda.OutOfMemoryError:
            raise _out_of_memory(length, settings, bsz) from None  # frees the cache with this frame
        if self.compute_dtype == torch.float16 and not bool(torch.isfinite(logits).all()):
            raise FloatingPointError(
                "float16 overflowed (non-finite logits after the prompt); load with dtype='bfloat16' "
                "if the GPU has it, else dtype='float32'"
            )
        decoder = StaticDecoder(self, cache, mask)
        finished = [False] * bsz
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)  # finished, on the device
        new_ids: list[list[int]] = [[] for _ in range(bsz)]
        for step in range(settings.max_new_tokens):
            nxt = _sample(logits, settings, gen)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            host = nxt.tolist()  # waits for the device: this token exists now
            now = time.perf_counter() - start
            if step == 0:
                stats.ttft_s = now
            stats.new_tokens, stats.total_s = step + 1, now
            yield nxt
            for b, t in enumerate(host):
                if finished[b]:
                    continue
                new_ids[b].append(t)
                if t in eos_ids or self._hits_stop(new_ids[b], settings.stop_strings, tok):
                    finished[b] = True
                    done = torch.tensor(finished, device=self.device)
            if all(finished) or step + 1 == settings.max_new_tokens:
                return
            try:
                logits = decoder.step(nxt)
            except torch.cuda.OutOfMemoryError:
                raise _out_of_memory(length, settings, bsz) from None

    @staticmethod
    def _hits_stop(ids: list[int], stops: tuple[str, ...], tok: Any) -> bool:
        if not stops:
            return False
        # byte-level BPE: a stop string of n UTF-8 bytes spans at most n tokens, plus one that
        # may carry bytes before it
        longest = max(len(s.encode("utf-8")) for s in stops)
        tail = tok.decode(ids[-(longest + 1) :], skip_special_tokens=False)
        return any(s in tail for s in stops)

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
        processor output is accepted (a batch of one).
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
        eos = tok.eos_token_id
        ids: list[int] = []
        shown = ""

        def decode(x: list[int]) -> str:
            return tok.decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=False)

        for nxt in self.stream_tokens(inputs, settings, tok):
            t = int(nxt[0])
            if t == eos:
                break
            ids.append(t)
            text = decode(ids)
            # hold back a trailing partial UTF-8 character until its last byte arrives
            if text.endswith("\ufffd") or not text.startswith(shown):
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
        text = decode(ids)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown) :]
        elif not text.startswith(shown):  # pragma: no cover - byte-level decoding is prefix-stable
            raise RuntimeError("streamed text diverged from the full decode")

