"""Batch jobs on Ray Data: rows mapped in batches by actors that each hold one model.

Method: the rows still to do become a Ray dataset (``ray.data.from_items``);
``map_batches`` runs them through ``_Answerer`` actors, each of which loads the model
once (on the GPU Ray gives it, or on the CPUs it reserves) and answers a batch with the
same code as a single-process run, returning each record as one JSON string. The driver
iterates the results as they come and writes them itself, so the output file, its
whole-line rule and the skipping of done ids are exactly those of a single-process run.

How many actors: one per GPU of the cluster, or, without GPUs, one per
``CPUS_PER_WORKER`` CPUs, each reserving an equal share of them; the pool then grows
from one actor up to that count as Ray Data sees fit. An explicit ``workers`` is a pool
of exactly that size (several actors share a GPU when there are more workers than GPUs).
``address="local"`` starts a Ray on this machine and shuts it down at the end; any other
address joins that cluster (every node must see the model folder and the images at the
same paths, and have molmoe-lite installed). A Ray this process already initialised is
used as it is, and left running.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from molmoe_lite.batch.rows import Row
from molmoe_lite.errors import UsageError

CPUS_PER_WORKER = 8  # without GPUs: one model per this many CPUs (its matmuls use them all)


def plan_workers(resources: dict[str, float], workers: int | None, device: str | None) -> dict[str, Any]:
    """Actor count and per-actor resources from ``ray.cluster_resources()``.

    Returns {"min": .., "max": .., "num_gpus": .., "num_cpus": ..}.
    """
    gpus = int(resources.get("GPU", 0))
    cpus = max(1, int(resources.get("CPU", 1)))
    use_gpus = gpus > 0 and (device is None or str(device).startswith("cuda"))
    if str(device or "").startswith("cuda") and not gpus:
        raise UsageError(f"device={device!r}, but the Ray cluster has no GPUs")
    if use_gpus:
        n = workers or gpus
        # more actors than GPUs: each gets an equal slot, so every node fits a whole number
        share = 1.0 / math.ceil(n / gpus)
        return {"min": n if workers else 1, "max": n, "num_gpus": share, "num_cpus": 1}
    n = workers or max(1, cpus // CPUS_PER_WORKER)
    return {"min": n if workers else 1, "max": n, "num_gpus": 0, "num_cpus": max(1, cpus // n)}


class _Answerer:
    """A Ray Data actor: one model, loaded once; a batch of rows in, their records (JSON) out."""

    def __init__(self, model_path: str, load_kwargs: dict[str, Any], max_new_tokens: int,
                 transparent: str, threads: int) -> None:
        import torch

        from molmoe_lite.api import load

        if threads:
            torch.set_num_threads(threads)
        self.model = load(model_path, **load_kwargs)
        self.max_new_tokens = max_new_tokens
        self.transparent = transparent

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from molmoe_lite.batch.answer import answer_rows

        rows = [Row(str(i), str(im), str(p), str(q))
                for i, im, p, q in zip(batch["id"], batch["image"], batch["path"], batch["prompt"])]
        records = answer_rows(self.model, rows, self.max_new_tokens, self.transparent)
        return {"record": np.array([json.dumps(r, ensure_ascii=False) for r in records])}


def ray_batches(model_path: str, rows: list[Row], load_kwargs: dict[str, Any], address: str,
                workers: int | None, batch_size: int, max_new_tokens: int,
                transparent: str = "composite") -> Iterator[list[dict[str, Any]]]:
    """Records of ``rows`` answered on Ray Data actors, one list per batch as it arrives."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError("--ray needs Ray Data: pip install 'molmoe-lite[ray]'") from None
    started = not ray.is_initialized()
    if started:
        extra = {"include_dashboard": False} if address == "local" else {}
        ray.init(address=address, logging_level=logging.WARNING, **extra)
    try:
        plan = plan_workers(ray.cluster_resources(), workers, load_kwargs.get("device"))
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours is on the driver
        dataset = ray.data.from_items([asdict(r) for r in rows])
        answered = dataset.map_batches(
            _Answerer,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(min_size=plan["min"], max_size=plan["max"]),
            fn_constructor_kwargs=dict(model_path=model_path, load_kwargs=load_kwargs,
                                       max_new_tokens=max_new_tokens, transparent=transparent,
                                       threads=0 if plan["num_gpus"] else plan["num_cpus"]),
            num_cpus=plan["num_cpus"],
            num_gpus=plan["num_gpus"],
        )
        for batch in answered.iter_batches(batch_size=None, batch_format="numpy"):
            yield [json.loads(str(line)) for line in batch["record"]]
    finally:
        if started:
            ray.shutdown()
