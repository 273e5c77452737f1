"""The engine: a request queue and a running batch of rows over one static KV cache.

Used by the server, by batch jobs and by ``model.generate_from_batch`` for several prompts.

Method: the KV cache [max_batch rows, max_context slots] is allocated once, at construction.
A request takes a free row; its prompt is prefilled alone into that row (slots 0..P-1, its
positions 0..P-1: nothing of another row is ever read), which gives its first token. Every
later scheduler step feeds the last token of every running row through one decode step of
all of them together, each row at its own position, and samples each row with its own
settings and its own random generator. A row that finishes (EOS, a stop string, its token
limit, a cancel) gives its row back at once; a queued request takes it at the next step,
while the others keep decoding. Each step gives every running row exactly one new token.
A stop string ends a row at the id that makes the row's ``TextPieces`` see it, so the ids
a row decodes and the text its caller is shown agree on where the answer ended.

``Engine.start()`` runs the steps in a daemon thread; ``Engine.step()`` runs one (tests).
Only the engine's thread touches the model; ``submit`` and the handles are thread-safe.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from molmoe_lite.errors import MolmoeLiteError, UsageError
from molmoe_lite.fast_decode import DecodeStep
from molmoe_lite.sampling import (SamplingSettings, TextPieces, check_finite, eos_ids_of, sample_rows,
                                  stop_token_ids)


class GPUMemoryError(MolmoeLiteError, MemoryError):
    """Generation ran out of GPU memory; the message names what would fit."""


class EngineFullError(MolmoeLiteError):
    """The engine's queue is full: try again later."""


class ContextLengthError(UsageError):
    """A request's prompt and new tokens do not fit the engine's context."""


@dataclass
class Completion:
    """What a request produced. ``token_ids`` are the generated ids (an ending EOS included);
    ``text`` their decode without special tokens, cut before a stop string that ended it."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


_END = object()  # the last item of a handle's piece queue


class RequestHandle:
    """One submitted request: stream its text, wait for its result, or cancel it."""

    def __init__(self, prompt_tokens: int) -> None:
        self.prompt_tokens = prompt_tokens
        self._pieces: queue.Queue = queue.Queue()
        self._done = threading.Event()
        self._cancelled = threading.Event()
        self._completion: Completion | None = None
        self._error: BaseException | None = None
        self.token_ids: list[int] = []  # the ids generated so far (the engine appends)

    def stream(self) -> Iterator[str]:
        """Text pieces as they are decoded (they join to ``result().text``); blocks between pieces."""
        while (piece := self._pieces.get()) is not _END:
            yield piece
        if self._error is not None:
            raise self._error

    def result(self, timeout: float | None = None) -> Completion:
        """The completion, once the request is done; raises what stopped it, if anything did."""
        if not self._done.wait(timeout):
            raise TimeoutError("the request is not done yet")
        if self._error is not None:
            raise self._error
        return self._completion

    def cancel(self) -> None:
        """Give the request's row back at the next step (the client is gone)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _piece(self, text: str) -> None:
        if text:
            self._pieces.put(text)

    def _finish(self, completion: Completion | None, error: BaseException | None = None) -> None:
        self._completion, self._error = completion, error
        self._pieces.put(_END)
        self._done.set()


@dataclass
class _Row:
    """A request's state in the engine: its inputs, settings, and what it has generated."""

    handle: RequestHandle
    inputs: dict[str, torch.Tensor]  # one prompt, unbatched, no padding
    settings: SamplingSettings
    end_ids: set[int]  # EOS ids, and the special tokens its stop strings name
    text: TextPieces
    generator: torch.Generator | None
    slot: int = -1  # the KV-cache row it occupies while running
    length: int = 0  # tokens in its cache row
    pending: int = -1  # the last generated token, not yet fed to the model

    @property
    def ids(self) -> list[int]:
        return self.handle.token_ids

    @property
    def prompt_tokens(self) -> int:
        return self.handle.prompt_tokens


def single_prompt(inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """One prompt's processor output, unbatched and without padding: leading or trailing -1
    ids removed (image indices shifted with their tokens), crops that are pure padding dropped."""
    out = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    ids = out["input_ids"]
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            raise UsageError(f"the engine takes one prompt per request, got a batch of {ids.shape[0]}")
        out = {k: v[0] for k, v in out.items()}
        ids = out["input_ids"]
    real = (ids != -1).nonzero().flatten()
    if real.numel() == 0:
        raise UsageError("the prompt has no tokens")
    first, last = int(real[0]), int(real[-1])
    if real.numel() != last - first + 1:
        raise UsageError("the prompt has padding (-1) between its tokens")
    out["input_ids"] = ids[first : last + 1]
    idx = out.get("image_input_idx")
    if idx is not None:
        if first:
            out["image_input_idx"] = torch.where(idx >= 0, idx - first, idx)
        crop_is_pad = (idx == -1).flatten(1).all(1)
        if "image_masks" in out:
            crop_is_pad &= (out["image_masks"] == -1).flatten(1).all(1)
        if bool(crop_is_pad.any()):
            out = {k: (v[~crop_is_pad] if k in ("images", "image_input_idx", "image_masks") else v)
                   for k, v in out.items()}
    return out


class Engine:
    """Continuous batching over a static KV cache of ``max_batch`` rows of ``max_context`` slots."""

    def __init__(self, model, max_batch: int = 8, max_context: int | None = None, max_queue: int = 64,
                 tokenizer: Any = None) -> None:
        if max_batch < 1 or max_queue < 0:
            raise UsageError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.model = model
        self.max_batch = max_batch
        self.max_context = int(max_context or model.config.max_sequence_length)
        self.max_queue = max_queue
        # decodes text, finds stop strings, knows EOS; default: the model's processor's
        self.tokenizer = tokenizer or getattr(getattr(model, "processor", None), "tokenizer", None)
        try:
            self.cache = model.new_cache(max_batch, self.max_context)
        except torch.cuda.OutOfMemoryError:
            raise GPUMemoryError(
                f"the KV cache for max_batch={max_batch} x max_context={self.max_context} does not fit in "
                "GPU memory; use a smaller max_batch or max_context"
            ) from None
        self.decoder = DecodeStep(model, self.cache)
        # a row holds one prompt and its answer, no padding: causality by slot is its whole mask
        self.decoder.key_mask.fill_(True)
        self.rows: list[_Row | None] = [None] * max_batch
        self._queue: deque[_Row] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- the public side --------------------------------------------------------------
    def submit(self, inputs: dict[str, Any], settings: SamplingSettings | None = None) -> RequestHandle:
        """Queue one prompt (a processor output); its handle streams the answer."""
        settings = settings or SamplingSettings()
        prompt = single_prompt(inputs)
        n = prompt["input_ids"].numel()
        if n + settings.max_new_tokens > self.max_context:
            raise ContextLengthError(
                f"the prompt is {n} tokens and max_new_tokens is {settings.max_new_tokens}: together more "
                f"than the engine's context of {self.max_context} tokens (use a shorter prompt, a smaller "
                "image, or fewer new tokens)"
            )
        if settings.stop_strings and self.tokenizer is None:
            raise UsageError("stop_strings need a tokenizer: the model has no processor attached")
        row = self._new_row(prompt, settings)
        with self._lock:
            if self._stopping:
                raise UsageError("the engine has been shut down")
            if len(self._queue) >= self.max_queue:
                raise EngineFullError(f"the engine's queue is full ({self.max_queue} requests waiting)")
            self._queue.append(row)
            self._lock.notify()
        return row.handle

    def start(self) -> "Engine":
        """Run the scheduler loop in a daemon thread."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="molmoe-lite-engine", daemon=True)
                self._thread.start()
        return self

    def shutdown(self) -> None:
        """Stop the loop; every request not done finishes as "cancelled"."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            waiting, self._queue = list(self._queue), deque()
        for row in waiting + [r for r in self.rows if r is not None]:
            self._end(row, "cancelled")

    def step(self) -> int:
        """One scheduler step: retire cancelled rows, admit and prefill joiners (their first token),
        one decode step for the rows that were running before. Returns the rows running now."""
        if self._thread is not None and threading.current_thread() is not self._thread:
            raise UsageError("the engine's loop is running; step() is for an engine not started")
        self._retire_cancelled()
        running = [r for r in self.rows if r is not None]
        self._admit()
        if running:
            self._decode(running)
        return self.running

    def eos_ids(self, settings: SamplingSettings) -> set[int]:
        """The ids that end a request with these settings."""
        return eos_ids_of(settings, self.tokenizer)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._queue)

    # ---- scheduling -----------------------------------------------------------------------
    def _new_row(self, prompt: dict[str, torch.Tensor], settings: SamplingSettings) -> _Row:
        device = self.model.device
        generator = None if settings.seed is None else torch.Generator(device=device).manual_seed(settings.seed)
        return _Row(
            handle=RequestHandle(prompt["input_ids"].numel()), inputs=prompt, settings=settings,
            end_ids=self.eos_ids(settings) | stop_token_ids(settings.stop_strings, self.tokenizer),
            text=TextPieces(self.tokenizer, settings.stop_strings), generator=generator,
        )

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._queue and not self.running:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as exc:  # a bug or a device failure: fail the rows, keep serving
                for row in [r for r in self.rows if r is not None]:
                    self._fail(row, exc)

    def _retire_cancelled(self) -> None:
        for row in [r for r in self.rows if r is not None and r.handle.cancelled]:
            self._end(row, "cancelled")
        with self._lock:
            gone = [r for r in self._queue if r.handle.cancelled]
            for row in gone:
                self._queue.remove(row)
        for row in gone:
            self._end(row, "cancelled")

    def _next_waiting(self) -> _Row | None:
        with self._lock:
            return self._queue.popleft() if self._queue else None

    def _admit(self) -> None:
        """Fill free rows from the queue: each joiner's prefill gives its first token."""
        while None in self.rows and (row := self._next_waiting()) is not None:
            if row.settings.max_new_tokens == 0:
                self._end(row, "length")
                continue
            row.slot = self.rows.index(None)  # the lowest free row keeps the running rows packed
            self.rows[row.slot] = row
            try:
                logits = self._prefill(row)
            except Exception as exc:  # this request's problem (its memory, its inputs): fail it alone
                self._fail(row, exc)
                continue
            self._emit([row], logits)

    # ---- the model --------------------------------------------------------------------
    @torch.inference_mode()
    def _prefill(self, row: _Row) -> torch.Tensor:
        """The row's prompt into its cache row; logits [1, vocab] for its first token."""
        inputs = row.inputs
        view = self.cache.rows(row.slot, row.slot + 1)
        try:
            logits = self.model(
                inputs["input_ids"][None], images=_batched(inputs.get("images")),
                image_input_idx=_batched(inputs.get("image_input_idx")),
                image_masks=_batched(inputs.get("image_masks")), cache=view, logits_at="last",
            )[:, -1]
        except torch.cuda.OutOfMemoryError:
            raise GPUMemoryError(
                f"out of GPU memory for the prefill of a {row.prompt_tokens}-token prompt. Try the `small` "
                "preset (load(..., preset='small'), `--preset small`), a smaller image or prompt, or a "
                "smaller max_batch or --max-context"
            ) from None
        check_finite(logits, self.model.compute_dtype)
        row.length = row.prompt_tokens
        return logits

    @torch.inference_mode()
    def _decode(self, rows: list[_Row]) -> None:
        """One decode step over cache rows [0, n): each row in ``rows`` feeds its pending token at
        its own slot and gets one new token. Other rows in that range ride along harmlessly: a row
        that joined this step computes its next slot (recomputed, identically, next step), a free
        row writes its slot 0 (rewritten by its next prefill)."""
        step = self.decoder
        occupied = [r for r in self.rows if r is not None]
        n = step.n_rows(max(r.slot for r in occupied) + 1)
        tokens = torch.zeros(n, dtype=torch.long)
        slots = torch.zeros(n, dtype=torch.long)
        for r in occupied:
            tokens[r.slot], slots[r.slot] = r.pending, r.length
        step.set_tokens(n, tokens.to(step.tokens.device))
        step.slots[:n].copy_(slots)
        try:
            logits = step.run(n, step.kv_len(max(r.length for r in occupied) + 1))
        except torch.cuda.OutOfMemoryError:
            raise GPUMemoryError(
                f"out of GPU memory for a decode step of {n} rows. Try the `small` preset, or a smaller "
                "max_batch or --max-context"
            ) from None
        for r in rows:
            r.length += 1
        self._emit(rows, logits[[r.slot for r in rows]])

    # ---- tokens out ---------------------------------------------------------------------
    def _emit(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Sample one token per row from logits [len(rows), vocab]; finish the rows that are done."""
        tokens = sample_rows(logits, [r.settings for r in rows], [r.generator for r in rows])
        for row, token in zip(rows, tokens):
            row.ids.append(token)
            row.pending = token
            if token in row.end_ids:
                self._end(row, "stop")
                continue
            row.handle._piece(row.text.push(token))
            if row.text.stopped:
                self._end(row, "stop")
            elif len(row.ids) >= row.settings.max_new_tokens:
                self._end(row, "length")

    def _release(self, row: _Row) -> None:
        if 0 <= row.slot < len(self.rows) and self.rows[row.slot] is row:
            self.rows[row.slot] = None

    def _end(self, row: _Row, reason: str) -> None:
        self._release(row)
        row.handle._piece(row.text.close())
        n = len(row.ids)
        row.handle._finish(Completion(row.text.text, list(row.ids), reason, row.prompt_tokens, n))

    def _fail(self, row: _Row, error: BaseException) -> None:
        self._release(row)
        row.handle._finish(None, error)


def _batched(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t[None]
