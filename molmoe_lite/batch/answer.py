"""Answering rows: images in, one record per row out.

Method: each row's image is opened (``images.load_image``: EXIF orientation, alpha,
bit depth) and turned into model inputs by the processor, a few rows ahead in a
background thread; a row whose image cannot be read becomes a record with its error.
The good rows are decoded greedily on the engine (``molmoe_lite.engine``: continuous
batching over one static KV cache; each row gets exactly what it would get alone), and
a row the engine refuses or fails (a prompt too long for the context, out of memory in
its prefill) becomes a record with that error while the others go on. Pointing answers
also get their points in pixels of the image as the model saw it.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from typing import Any

from molmoe_lite.batch.rows import Row
from molmoe_lite.errors import MolmoeLiteError, UsageError


@dataclass
class Prepared:
    """A row with its model inputs, or the reason it has none."""

    row: Row
    inputs: dict[str, Any] | None
    size: tuple[int, int] | None  # (width, height) of the image, upright
    seconds: float  # reading and preprocessing
    error: str | None = None


@dataclass
class Answer:
    text: str
    new_tokens: int  # generated for this row, the end-of-text token included when it came
    seconds: float  # from its submission to the engine to its last token


def prepare(processor: Any, row: Row, transparent: str = "composite") -> Prepared:
    """Read ``row``'s image and run the processor on it; a bad image becomes ``error``."""
    from molmoe_lite.images import load_image

    start = time.perf_counter()
    try:
        image = load_image(row.path, transparent)
        inputs = processor.process(images=image, text=row.prompt, transparent=transparent)
    except (MolmoeLiteError, OSError) as exc:
        return Prepared(row, None, None, time.perf_counter() - start, str(exc))
    return Prepared(row, inputs, image.size, time.perf_counter() - start)


def record(p: Prepared, answer: Answer | None = None, error: str | None = None) -> dict[str, Any]:
    """The output line of one row."""
    from molmoe_lite.points import parse_points

    error = error or p.error
    out: dict[str, Any] = {"id": p.row.id, "image": p.row.image, "prompt": p.row.prompt,
                           "answer": None, "points": None, "new_tokens": 0,
                           "seconds": round(p.seconds, 4), "error": error}
    if answer is not None and error is None:
        width, height = p.size
        out["answer"] = answer.text
        out["points"] = [{"x": round(pt.x, 1), "y": round(pt.y, 1), "label": pt.label}
                         for pt in parse_points(answer.text, width, height)]
        out["new_tokens"] = answer.new_tokens
        out["seconds"] = round(p.seconds + answer.seconds, 4)
    return out


class EngineDecoder:
    """Decodes prepared rows on one ``Engine`` (continuous batching); ``close`` when done.

    Up to ``max_batch`` rows decode together and as many wait in the engine's queue, so a
    row that finishes hands its place to the next at once. The engine's context is sized to
    the job (the longest prompt seen plus the new tokens, in steps of ``CONTEXT_STEP``) rather
    than the model's whole context, which keeps the KV cache small; a longer prompt later
    lets the rows in flight finish, then replaces the engine with a larger one.
    """

    CONTEXT_STEP = 256

    def __init__(self, model: Any, max_batch: int, max_new_tokens: int) -> None:
        from molmoe_lite.sampling import SamplingSettings

        if getattr(model, "processor", None) is None:
            raise UsageError("this model has no processor attached; load it with molmoe_lite.load()")
        self.model = model
        self.max_batch = max_batch
        self.settings = SamplingSettings.merge(None, max_new_tokens=max_new_tokens)
        self.limit = int(model.config.max_sequence_length)
        self.engine = None

    def _fits(self, tokens: int) -> bool:
        return self.engine is not None and (tokens <= self.engine.max_context or self.engine.max_context >= self.limit)

    def _grow(self, tokens: int) -> None:
        """An engine whose context holds ``tokens``; only while no row is in flight."""
        from molmoe_lite.engine import Engine

        step = self.CONTEXT_STEP
        context = min(self.limit, -(-tokens // step) * step)
        self.close()
        # at most 2 * max_batch in flight, all of which may still wait before the engine admits them
        self.engine = Engine(self.model, max_batch=self.max_batch, max_context=context,
                             max_queue=2 * self.max_batch).start()

    def answer(self, prepared: Iterable[Prepared]) -> Iterator[dict[str, Any]]:
        """Records of ``prepared`` as rows complete (bad rows at once), not in input order."""
        source = iter(prepared)
        inflight: deque[tuple[Prepared, Any, float]] = deque()
        held: Prepared | None = None  # a row waiting for a larger engine
        exhausted = False
        while True:
            while len(inflight) < 2 * self.max_batch and not exhausted:
                p, held = held or next(source, None), None
                if p is None:
                    exhausted = True
                    break
                if p.error is not None:
                    yield record(p)
                    continue
                tokens = p.inputs["input_ids"].numel() + self.settings.max_new_tokens
                if not self._fits(tokens):
                    if inflight:
                        held = p
                        break
                    self._grow(tokens)
                try:
                    inflight.append((p, self.engine.submit(p.inputs, self.settings), time.perf_counter()))
                except MolmoeLiteError as exc:  # too long for the model's context
                    yield record(p, error=str(exc))
            if not inflight:
                if exhausted and held is None:
                    return
                continue
            finished = [x for x in inflight if x[1].done]
            if not finished:
                _wait(inflight[0][1])
                continue
            for item in finished:
                inflight.remove(item)
                p, handle, submitted = item
                try:
                    c = handle.result()
                except MolmoeLiteError as exc:  # this row's own problem (its memory, its inputs)
                    yield record(p, error=str(exc))
                    continue
                yield record(p, Answer(c.text, c.completion_tokens, time.perf_counter() - submitted))

    def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None


def _wait(handle: Any, seconds: float = 0.01) -> None:
    """Until ``handle`` is done or ``seconds`` pass (then the other rows are looked at again)."""
    try:
        handle.result(timeout=seconds)
    except Exception:  # noqa: BLE001 - not done yet, or failed: its result says which, when collected
        pass


def prepared_ahead(processor: Any, rows: Iterable[Row], ahead: int,
                   transparent: str = "composite") -> Iterator[Prepared]:
    """``prepare`` for each row, in order, up to ``ahead`` rows ahead in a background thread
    (images are read while the engine decodes)."""
    rows = iter(rows)
    pool = ThreadPoolExecutor(1, thread_name_prefix="molmoe-lite-prepare")
    try:
        futures = deque(pool.submit(prepare, processor, r, transparent) for r in islice(rows, max(1, ahead)))
        while futures:
            p = futures.popleft().result()
            nxt = next(rows, None)
            if nxt is not None:
                futures.append(pool.submit(prepare, processor, nxt, transparent))
            yield p
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def answer_rows(decoder: EngineDecoder, rows: list[Row], transparent: str = "composite") -> list[dict[str, Any]]:
    """Records for ``rows``, in their order (a Ray Data actor's batch)."""
    prepared = [prepare(decoder.model.processor, r, transparent) for r in rows]
    by_id = {r["id"]: r for r in decoder.answer(prepared)}
    return [by_id[r.id] for r in rows]
