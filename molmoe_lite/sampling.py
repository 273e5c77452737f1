"""What a request does with the model's logits: its settings, sampling, stop strings, text.

``SamplingSettings`` gathers one request's choices (from a GenerationConfig and keyword
arguments). ``sample_rows`` picks one token per row, greedy or by temperature and nucleus
(top-p) sampling, each row with its own random generator so that a seeded request draws the
same tokens whatever else is decoded beside it. ``TextPieces`` turns ids into streamed text
and is the one judge of stop strings: a piece never ends inside a UTF-8 character or inside
what may become a stop string, the text ends before the first stop string (the engine ends
the row at the id that completes it: OpenAI's ``stop``), and the pieces join to exactly the
full decode so cut; each id costs the decode of a few ids, not of the whole row (the engine
streams every row every step). ``stop_token_ids`` covers stop strings that name a special
token, which shows no text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from molmoe_lite.errors import UsageError


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


def stop_token_ids(stops: tuple[str, ...], tokenizer: Any) -> set[int]:
    """The special tokens that the stop strings name (the release's ``stop_strings="<|endoftext|>"``).

    Such a token shows no text, so ``TextPieces`` never sees its name in the text: the
    engine ends a row at it as at an EOS id, with the answer's text unchanged.
    """
    if not stops or tokenizer is None:
        return set()
    added = tokenizer.get_added_vocab()
    return {added[s] for s in stops if s in added and tokenizer.decode([added[s]], skip_special_tokens=True) == ""}


def check_finite(logits: torch.Tensor, dtype: torch.dtype) -> None:
    """float16 can overflow on a prompt; say so rather than sample from NaNs."""
    if dtype == torch.float16 and not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            "float16 overflowed (non-finite logits after the prompt); load with dtype='bfloat16' "
            "if the GPU has it, else dtype='float32'"
        )


class TextPieces:
    """Generated ids in, text pieces out: the pieces always join to the text so far.

    This is where a stop string is found, for everyone: ``stopped`` turns true at the id
    whose text completes a stop string (even when that id also starts a character whose
    last byte has not come yet), and the engine ends the row right then. Text that ends in
    an incomplete UTF-8 character is held back until its last byte arrives, and so is an
    ending that could be the start of a stop string; the piece that finds a stop string
    ends just before it, and nothing after it is ever shown. ``close`` releases the rest
    (nothing, once stopped) and sets ``text``, the pieces joined.

    Incremental: each push decodes only a short window of ids, never the whole list. The
    ids before ``_read`` are already text (shown, or held back in ``_held``); the new ids
    are decoded together with the few ids before them, ``ids[_prefix:_read]``, so that
    byte-level merges and leading spaces come out as in the full decode, and the text they
    add is the difference of the two decodes. The window moves on once that text is
    complete (it does not end in U+FFFD), so a push decodes a few ids, not all of them.
    """

    def __init__(self, tokenizer: Any, stop_strings: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop_strings = stop_strings
        self.ids: list[int] = []
        self.text = ""  # the final text, set by close()
        self._shown: list[str] = []  # the pieces returned so far
        self._held = ""  # decoded, not shown: it may begin a stop string
        self._prefix = 0  # ids[_prefix:_read]: context decoded again before the new ids
        self._read = 0  # ids[:_read] are in the shown and held text
        self._before: str | None = ""  # the decode of ids[_prefix:_read]; None: not done yet
        self._stop_seen = False  # a whole stop string is in the text: show nothing more

    @property
    def stopped(self) -> bool:
        """Whether the text so far holds a stop string (the row's answer ends before it)."""
        return self._stop_seen

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _unread(self) -> tuple[str, bool]:
        """The text of ids[_read:], and whether it is complete (not ending inside a character)."""
        if self._before is None:  # the window moved: decode its context once
            self._before = self._decode(self.ids[self._prefix : self._read])
        new = self._decode(self.ids[self._prefix :])[len(self._before) :]
        return new, bool(new) and not new.endswith("\ufffd")

    def _held_back(self, text: str) -> int:
        """How many characters at the end of ``text`` could begin a stop string."""
        for n in range(min(len(text), max((len(s) for s in self.stop_strings), default=0)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop_strings):
                return n
        return 0

    def push(self, token: int) -> str:
        """Add one generated id; the text that can be shown now (maybe empty)."""
        if self.tokenizer is None or self._stop_seen:
            return ""
        self.ids.append(token)
        new, complete = self._unread()
        # Only the held text can hold a stop string or the start of one: the shown text
        # never ends with a stop string's beginning, so no stop string crosses into it.
        # The characters before an incomplete one are final, so a stop string among them
        # counts now, not one id later.
        held = self._held + new
        cuts = [held.find(s) for s in self.stop_strings if s in held]
        if cuts:
            self._stop_seen = True
            piece, self._held = held[: min(cuts)], ""
        elif not complete:
            return ""
        else:
            self._prefix, self._read, self._before = self._read, len(self.ids), None
            cut = len(held) - self._held_back(held)
            piece, self._held = held[:cut], held[cut:]
        if piece:
            self._shown.append(piece)
        return piece

    def close(self) -> str:
        """The rest of the text (none after a stop string); sets ``text``, all the pieces joined."""
        rest = ""
        if self.tokenizer is not None and not self._stop_seen:
            # what was held back as a possible stop string's start, and an incomplete character
            rest = self._held + self._unread()[0]
        if rest:
            self._shown.append(rest)
        self.text = "".join(self._shown)
        return rest
