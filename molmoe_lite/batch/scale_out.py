"""Batch jobs on Ray Data: rows mapped in batches by actors that each hold one model.

Method: the rows still to do become a Ray dataset (``ray.data.from_items``);
``map_batches`` runs them through ``_Answerer`` actors, each of which loads the model
once (on the GPU Ray gives it, or on the CPUs it reserves), keeps one engine, and answers
a batch with the same code as a single-process run, returning each record as one JSON string. The driver
iterates the results as they come and writes them itself, so the output file, its
whole-line rule and the skipping of done ids are exactly those of a single-process run.

How many actors (``plan_workers``, from the live nodes' resources): one per GPU of the
cluster, or, without GPUs, one per ``CPUS_PER_WORKER`` CPUs (fewer on small nodes: an
actor must fit on one node); ``workers`` fixes the count (several actors share a GPU when
there are more workers than GPUs).
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


def plan_workers(nodes: list[dict[str, float]], workers: int | None, device: str | None) -> dict[str, Any]:
    """How many actors, and what each reserves, from the resources of the cluster's live nodes.

    Returns {"workers": n, "num_gpus": .., "num_cpus": ..}. With GPUs: one actor per GPU (or
    ``workers``; more workers than GPUs share them in equal slots, so every GPU holds a whole
    number). Without: each actor reserves ``CPUS_PER_WORKER`` CPUs, or all of the smallest
    node's if that has fewer, so an actor fits every node; as many as the nodes hold.
    """
    gpus = int(sum(n.get("GPU", 0) for n in nodes))
    if str(device or "").startswith("cuda") and not gpus:
        raise UsageError(f"device={device!r}, but the Ray cluster has no GPUs")
    if gpus and (device is None or str(device).startswith("cuda")):
        n = workers or gpus
        return {"workers": n, "num_gpus": 1.0 / math.ceil(n / gpus), "num_cpus": 1}
    cpus = [int(n.get("CPU", 0)) for n in nodes if n.get("CPU", 0) >= 1] or [1]
    per = min(CPUS_PER_WORKER, min(cpus))
    if workers is None:
        return {"workers": sum(c // per for c in cpus), "num_gpus": 0, "num_cpus": per}
    return {"workers": workers, "num_gpus": 0, "num_cpus": max(1, min(per, sum(cpus) // workers))}


class _Answerer:
    """A Ray Data actor: one model, loaded once; a batch of rows in, their records (JSON) out."""

    def __init__(self, model_path: str, load_kwargs: dict[str, Any], batch_size: int, max_new_tokens: int,
                 transparent: str, threads: int) -> None:
        import torch

        from molmoe_lite.api import load
        from molmoe_lite.batch.answer import EngineDecoder

        if threads:
            torch.set_num_threads(threads)
        self.decoder = EngineDecoder(load(model_path, **load_kwargs), batch_size, max_new_tokens)
        self.transparent = transparent

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from molmoe_lite.batch.answer import answer_rows

        rows = [Row(str(i), str(im), str(p), str(q))
                for i, im, p, q in zip(batch["id"], batch["image"], batch["path"], batch["prompt"])]
        records = answer_rows(self.decoder, rows, self.transparent)
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
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        plan = plan_workers(nodes, workers, load_kwargs.get("device"))
        ray.data.DataContext.get_current().enable_progress_bars = False  # ours is on the driver
        dataset = ray.data.from_items([asdict(r) for r in rows])
        answered = dataset.map_batches(
            _Answerer,
            batch_size=batch_size,
            compute=ray.data.ActorPoolStrategy(size=plan["workers"]),
            fn_constructor_kwargs=dict(model_path=model_path, load_kwargs=load_kwargs, batch_size=batch_size,
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
