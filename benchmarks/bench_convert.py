"""Benchmark the converter on a synthetic full-size MolmoE-1B checkpoint (not a CI test).

    python benchmarks/bench_convert.py --workdir /some/folder/with/40GB [--bits 4] [--keep]

1. Writes, once, a release-shaped folder under ``--workdir/src``: the release's sizes
   (``molmoe_lite.testing.full_size_config_dict``), random float32 weights, saved the way the
   release is, as one ``pytorch_model.bin`` through ``torch.save`` (about 29 GB).
   ``torch.save`` needs the whole dict at once, so the tensors are windows of a
   memory-mapped pool file of random floats (``--pool-mb``, default 1 GiB, at pseudo-random
   offsets): each is its own storage, so the pickle holds 29 GB of distinct records, while
   the process only maps file pages (page cache) instead of holding 29 GB of anonymous memory.
   Expert matrices therefore repeat pool contents; rounding cost does not depend on that.
2. Times ``convert()`` on it with a thread sampling ``RssAnon`` from /proc/self/status
   every 50 ms (anonymous memory only: the mapped source's pages are the page cache's).
3. Prints one JSON line: seconds, source MB/s, peak RssAnon, output size, errors, machine.
4. Deletes the synthetic files unless ``--keep`` (a kept source is reused by later runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from molmoe_lite.quantize.convert import convert
from molmoe_lite.quantize.layout import expected_shapes
from molmoe_lite.testing import full_size_config_dict, write_config

_MARKER = ".complete"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class RssSampler(threading.Thread):
    """Peak of RssAnon / RssFile (kB) sampled every ``interval`` seconds."""

    def __init__(self, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.peak_anon = self.peak_file = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak_anon = max(self.peak_anon, _status_kb("RssAnon"))
            self.peak_file = max(self.peak_file, _status_kb("RssFile"))
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def write_synthetic_release(folder: Path, cfg: dict, pool_mb: int, seed: int = 0) -> float:
    """Write config.json + pytorch_model.bin (float32, release layout) into ``folder``; returns seconds."""
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    write_config(cfg, folder)
    pool_path = folder / "pool.f32"
    n_pool = pool_mb * 1024**2 // 4
    gen = torch.Generator().manual_seed(seed)
    with open(pool_path, "wb") as f:  # the pool in 64 MB pieces, so generation is bounded too
        step = 16 * 1024**2
        for i in range(0, n_pool, step):
            f.write(torch.randn(min(step, n_pool - i), generator=gen).numpy().tobytes())
    shapes = expected_shapes(cfg)
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in shapes.items():
        n = int(np.prod(shape))
        if n > n_pool:
            raise SystemExit(f"--pool-mb {pool_mb} is too small for {key} {shape}")
        off = int(rng.integers(0, n_pool - n + 1))
        # mode "c": a private (copy-on-write) file mapping; reading it makes no anonymous pages.
        arr = np.memmap(pool_path, dtype=np.float32, mode="c", offset=4 * off, shape=tuple(shape))
        state[key] = torch.from_numpy(arr)
    torch.save(state, folder / "pytorch_model.bin")
    del state
    pool_path.unlink()
    (folder / _MARKER).write_text("ok\n")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, required=True, help="folder for the synthetic source and the output")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--method", default="refit")
    ap.add_argument("--pool-mb", type=int, default=1024)
    ap.add_argument("--n-layers", type=int, default=None, help="fewer decoder layers (a quick dry run)")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic source (and reuse it next time)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)

    cfg = full_size_config_dict()
    if args.n_layers:
        cfg["n_layers"] = args.n_layers
    src, out = args.workdir / "src", args.workdir / "out"
    gen_seconds = None
    if not (src / _MARKER).exists() or json.loads((src / "config.json").read_text()) != cfg:
        shutil.rmtree(src, ignore_errors=True)
        gen_seconds = write_synthetic_release(src, cfg, args.pool_mb)
    load0 = os.getloadavg()

    sampler = RssSampler()
    base_anon = _status_kb("RssAnon")
    sampler.start()
    try:
        summary = convert(src, out, bits=args.bits, group_size=args.group_size, method=args.method,
                          force=True, progress=args.progress)
    finally:
        sampler.stop()
    result = {
        "bench": "convert",
        "bits": args.bits,
        "group_size": summary.group_size,
        "method": args.method,
        "n_layers": cfg["n_layers"],
        "seconds": round(summary.seconds, 1),
        "source_gb": round(summary.source_bytes / 1e9, 3),
        "source_mb_per_s": round(summary.source_bytes / 1e6 / summary.seconds, 1),
        "peak_rss_anon_mb": round(sampler.peak_anon / 1024, 1),
        "rss_anon_before_mb": round(base_anon / 1024, 1),
        "peak_rss_file_mb": round(sampler.peak_file / 1024, 1),
        "output_gb": round(summary.output_bytes / 1e9, 3),
        "rel_errors": {k: round(v, 5) for k, v in summary.rel_errors.items()},
        "generate_seconds": None if gen_seconds is None else round(gen_seconds, 1),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
    }
    print(json.dumps(result), flush=True)
    shutil.rmtree(out, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(src, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
