"""Throughput and latency of ``molmoe-lite serve`` under 1, 4, 8 and 16 concurrent clients.

Starts the server as a real process on a loopback port (``--model DIR``, or a tiny random
release written to a temporary folder), waits for ``/health``, sends one warm-up request,
then for each concurrency C runs C client threads, each sending ``--requests`` streaming
chat requests one after another (a different prompt and image each; greedy;
``--max-tokens`` new tokens at most). Per C, one flat JSON record is printed (and appended
to ``--out`` when given) as soon as it is measured:

  concurrency, requests, completion_tokens   what was asked and generated (usage counts)
  tokens_per_s          generated tokens of all requests / wall time of the whole round
  latency_p50_s, latency_p99_s   request sent -> last byte received, per request
  ttft_p50_s            request sent -> first text chunk, median
  speedup_vs_1          tokens_per_s over the C=1 round's

The target on a GPU (full-size int4 model): speedup_vs_1 >= 5 at 8 clients. On the CPU the
tiny model only shows that the path works; its numbers say little about a GPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

from molmoe_lite.testing import write_tiny_release
from molmoe_lite.testing.server_process import ServerProcess, image_data_url


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return float(np.percentile(ordered, q, method="higher")) if ordered else 0.0


def _request(client, model: str, i: int, max_tokens: int) -> dict:
    """One streaming request; its latency, time to first text, and generated tokens."""
    rng = np.random.RandomState(i)
    image = Image.fromarray((rng.rand(96 + 8 * (i % 5), 128, 3) * 255).astype(np.uint8))
    messages = [{"role": "user", "content": [
        {"type": "text", "text": f"Question {i}: describe what you see."},
        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
    ]}]
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return {"latency": latency, "ttft": first if first is not None else latency, "tokens": tokens}


def run_round(client, model: str, concurrency: int, requests: int, max_tokens: int, offset: int) -> dict:
    results: list[dict] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(c: int) -> None:
        for r in range(requests):
            try:
                out = _request(client, model, offset + c * requests + r, max_tokens)
            except BaseException as exc:  # reported after the round
                with lock:
                    errors.append(exc)
                return
            with lock:
                results.append(out)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed at concurrency {concurrency}: {errors[0]!r}")
    tokens = sum(r["tokens"] for r in results)
    latencies = [r["latency"] for r in results]
    return {
        "concurrency": concurrency, "requests": len(results), "max_tokens": max_tokens,
        "completion_tokens": tokens, "wall_s": round(wall, 4), "tokens_per_s": round(tokens / wall, 3),
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p99_s": round(_percentile(latencies, 99), 4),
        "ttft_p50_s": round(statistics.median(r["ttft"] for r in results), 4),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: a tiny random release, written once)")
    p.add_argument("--concurrency", default="1,4,8,16", help="comma-separated client counts (default %(default)s)")
    p.add_argument("--requests", type=int, default=2, help="requests per client per round (default %(default)s)")
    p.add_argument("--max-tokens", type=int, default=32, help="new tokens per request at most (default %(default)s)")
    p.add_argument("--max-context", type=int, default=2048, help="the server's --max-context (default %(default)s)")
    p.add_argument("--device", default=None, help="the server's --device (default: cpu for the tiny model, else its default)")
    p.add_argument("--dtype", default=None, help="the server's --dtype")
    p.add_argument("--out", type=Path, default=None, help="append the records to this JSON-lines file")
    args = p.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
        assert levels and all(c >= 1 for c in levels)
    except (ValueError, AssertionError):
        p.error(f"--concurrency must be positive integers separated by commas, got {args.concurrency!r}")

    import openai

    scratch = tempfile.TemporaryDirectory(prefix="bench-serve-")
    model_dir = args.model or write_tiny_release(Path(scratch.name) / "tiny", seed=0)
    extra = ["--model-name", "bench", "--max-batch", str(max(levels)), "--max-context", str(args.max_context),
             "--max-queue", str(max(levels) * 2)]
    device = args.device or ("cpu" if args.model is None else None)
    dtype = args.dtype or ("float32" if args.model is None else None)
    server = ServerProcess.start(model_dir, *extra, device=device, dtype=dtype, log_dir=scratch.name)
    try:
        server.wait_ready(600)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=600)
        _request(client, "bench", 10_000, args.max_tokens)  # warm-up
        base = None
        for k, c in enumerate(levels):
            rec = {"bench": "serve", "model": str(args.model or "tiny-random"), "device": device or "default",
                   **run_round(client, "bench", c, args.requests, args.max_tokens, offset=1000 * k)}
            base = base or (rec["tokens_per_s"] if c == 1 else None)
            rec["speedup_vs_1"] = round(rec["tokens_per_s"] / base, 3) if base else None
            line = json.dumps(rec)
            print(line, flush=True)
            if args.out is not None:
                with open(args.out, "a") as f:
                    f.write(line + "\n")
    finally:
        status = server.stop()
        scratch.cleanup()
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
