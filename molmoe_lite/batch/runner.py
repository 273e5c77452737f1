"""``run``: answer every row of an input, appending one record per row to a JSONL file.

Method: read the rows, open the output (its ids are already done and are skipped),
then answer the rest in one process (the engine decodes up to ``batch_size`` rows
together, a finished row's place going to the next at once, while a background thread
reads the next images) or on Ray Data actors (``scale_out``). Either way this process
writes the records, ``batch_size`` at a time as they complete, through ``ResultsFile``,
under a progress bar (images/s, time left), and ends with a summary: done, failed,
skipped as already done, images/s.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molmoe_lite.batch.answer import EngineDecoder, prepared_ahead
from molmoe_lite.batch.results import ResultsFile
from molmoe_lite.batch.rows import Row, read_rows
from molmoe_lite.errors import UsageError


@dataclass
class BatchSummary:
    """What a ``run`` did. ``seconds``: answering time (model loading in this process excluded)."""

    done: int
    failed: int
    skipped: int
    seconds: float
    out: str

    @property
    def images_per_s(self) -> float:
        n = self.done + self.failed
        return n / self.seconds if n and self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"{self.done} done, {self.failed} failed, {self.skipped} skipped as already done; "
                f"{self.images_per_s:.2f} images/s over {self.seconds:.1f} s -> {self.out}")


def run(
    model_or_path: Any,
    inputs: str | Path | Iterable[Mapping[str, Any]],
    out: str | Path,
    *,
    prompt: str | None = None,
    max_new_tokens: int = 200,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str | None = None,
    preset: str = "default",
    quantize: str | None = None,
    threads: int | None = None,
    transparent: str = "composite",
    ray_address: str | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> BatchSummary:
    """Answer every row of ``inputs`` (a folder of images, a .jsonl / .csv file of rows, or
    dicts with id, image and optional prompt) into ``out``, skipping the ids ``out`` holds.

    ``model_or_path``: a loaded model (``molmoe_lite.load``) or what ``load`` takes
    (``device``, ``dtype``, ``preset``, ``quantize`` and ``threads`` go to ``load``). ``prompt``: for
    rows without their own (default "Describe this image."). Greedy decoding of up to
    ``batch_size`` rows together; the output is written ``batch_size`` records at a time. ``ray_address``: run on Ray Data actors instead, one model each:
    ``"local"`` starts a Ray on this machine, anything else is the address of a running
    cluster (``"auto"``, ``"ray://host:10001"``); ``workers``: the number of actors
    (default: one per GPU, or CPU workers on a cluster without GPUs). ``progress``: a
    progress bar and the summary line on stderr.
    """
    if batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise UsageError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if workers is not None and workers < 1:
        raise UsageError(f"workers must be >= 1, got {workers}")
    if workers is not None and ray_address is None:
        raise UsageError("workers sets the number of Ray actors: it needs a Ray run (--ray / ray_address)")
    loaded = not isinstance(model_or_path, (str, Path))
    load_kwargs = dict(device=device, dtype=dtype, preset=preset, quantize=quantize, threads=threads)
    if loaded and (device, dtype, quantize, preset, threads) != (None, None, None, "default", None):
        raise UsageError("device, dtype, quantize, preset and threads apply to a model path; this model is already loaded")
    if loaded and ray_address is not None:
        raise UsageError("a Ray run loads the model in each worker: pass the model's path, not a loaded model")
    rows = read_rows(inputs, prompt)
    if isinstance(inputs, (str, Path)) and Path(out).resolve() == Path(inputs).resolve():
        # its rows' ids would read as done: nothing answered, everything "skipped"
        raise UsageError(f"{out}: the output is the input file; choose another output file")
    with ResultsFile(out) as results:
        pending = [r for r in rows if r.id not in results.done]
        skipped = len(rows) - len(pending)
        start = time.perf_counter()
        if not pending:
            batches: Iterator[list[dict[str, Any]]] = (b for b in ())
        elif ray_address is not None:
            from molmoe_lite.batch.scale_out import ray_batches

            batches = ray_batches(str(model_or_path), pending, load_kwargs, ray_address, workers,
                                  batch_size, max_new_tokens, transparent)
        else:
            model = model_or_path
            if not loaded:
                from molmoe_lite.api import load

                model = load(model_or_path, **load_kwargs)
            start = time.perf_counter()
            batches = local_batches(model, pending, batch_size, max_new_tokens, transparent)
        done, failed = _write_all(batches, results, len(pending), progress)
        summary = BatchSummary(done, failed, skipped, time.perf_counter() - start, str(results.path))
    if progress:
        print(f"[batch] {summary}", file=sys.stderr)
    return summary


def local_batches(model: Any, rows: list[Row], batch_size: int, max_new_tokens: int,
                  transparent: str = "composite") -> Iterator[list[dict[str, Any]]]:
    """Records of ``rows`` in lists of ``batch_size``, as they complete on the engine."""
    decoder = EngineDecoder(model, batch_size, max_new_tokens)
    try:
        chunk: list[dict[str, Any]] = []
        for rec in decoder.answer(prepared_ahead(model.processor, rows, batch_size, transparent)):
            chunk.append(rec)
            if len(chunk) == batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
    finally:
        decoder.close()


def _write_all(batches: Iterator[list[dict[str, Any]]], results: ResultsFile, total: int,
               progress: bool) -> tuple[int, int]:
    from tqdm import tqdm

    done = failed = 0
    with tqdm(total=total, unit="img", desc="batch", disable=not progress, file=sys.stderr,
              dynamic_ncols=True) as bar:
        try:
            for records in batches:
                results.append(records)
                bad = sum(r["error"] is not None for r in records)
                failed += bad
                done += len(records) - bad
                bar.update(len(records))
                if failed:
                    bar.set_postfix(failed=failed, refresh=False)
        finally:
            batches.close()  # a Ray run shuts its Ray down here, even on an error
    return done, failed
