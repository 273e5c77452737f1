"""End-to-end MolmoE benchmark at the release's sizes with random weights (no checkpoint needed).

Providers (``--providers``, comma-separated; all by default):

  release_bf16_loop  dense bf16 model, the release's way: Python loop over the experts that
                     got tokens, eager decode with a growing KV cache, RMSNorm as torch ops
  ours_bf16          the same dense weights through our generation path (StaticDecoder:
                     static KV cache, fixed shapes; no CUDA graph with dense experts)
  int8, int4         experts quantised on the GPU with ``molmoe_lite.patch(model, bits=...)``,
                     decode through StaticDecoder with the step captured in a CUDA graph
  int4_small         int4 experts plus the ``small`` preset (``molmoe_lite.api.apply_small_preset``):
                     att_proj/attn_out/lm_head int4, the ViT's linears int8, token embeddings
                     in CPU memory
  nf4_dense          bitsandbytes NF4 (blocksize 64) on the dense reference's expert and
                     attention linears, release-style eager decode and torch RMSNorm; skipped
                     without bitsandbytes

Per provider: time to first token for one 1920x1080 image (processor + ViT + prefill of
~1,200 tokens + the first token on the host; median of ``--ttft-repeats`` after a warm-up),
then decode at each batch size for ``--steps`` steps after ``--warmup-steps`` (random token
ids are fed, so the rows route like distinct prompts would and nothing stops at EOS; the
batch-1 prompt's KV cache is copied into every row). Records (one JSON line per provider x
batch, appended to OUT/e2e.jsonl as soon as measured and printed):

  ttft_s               batch-1 time to first token (the same value on every batch's record)
  us                   microseconds per decode step (one new token for each of ``batch`` rows)
  decode_tokens_per_s  batch * steps / decode time (all rows together)
  peak_gib             torch.cuda.max_memory_reserved since the model was ready (not counting
                       its construction/quantisation), up to the end of that batch's decode
  bytes_per_step       the bandwidth floor's bytes: weights one step reads (decoder attention,
                       norms, router, ln_f, lm_head, the embedding rows, and per layer
                       min(E, top_k * batch) experts: exact at batch 1, an upper bound on the
                       union at batch > 1 -- about 26.5 of 64 are expected for 4 random rows)
                       plus the KV cache read at the mean context of the timed steps
  gbps, bw_fraction    bytes_per_step / step time, and that over the measured device copy
                       bandwidth (OUT/bandwidth.json from gpu_check, else measured here);
                       ``floor_fraction`` = ideal time / measured time = the same number

Memory checks (``--memory-check``, on by default; they run first): the default int4 preset
within 6 GiB and ``small`` within 4.5 GiB, for one 640x480 image and a KV cache for 512 new
tokens. The model is built directly quantised (no dense copy, as a quantised checkpoint
loads), the allocator is capped with ``torch.cuda.set_per_process_memory_fraction`` at the
budget minus the CUDA context this process already holds (a card's budget includes its
context), prefill and a few captured decode steps run, and ``fits`` is true when nothing ran
out of memory and the peak reserved memory plus the context (measured again at the end:
kernels loaded meanwhile count) is within the budget. Records carry ``memory_check: true``.

Quantisation (``--method``): round-to-nearest by default, for every provider: decode speed
and memory do not depend on the rounding, and RTN keeps the quantising out of the time
budget. ``--method refit`` times the default load path's rounding instead (``quantize_s``).

Time budget: ``--time-budget`` seconds for everything; when it runs out, the provider or
memory check under way is stopped (SIGALRM) and recorded as stopped, and the rest get skip
records. Without CUDA the script prints a skip record and exits 0; ``--smoke`` runs every
step on the CPU with the tiny test config instead (a logic check; numbers meaningless).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _synthetic, gpu_check beside this file

from _synthetic import (  # noqa: E402
    build_model,
    decode_weight_bytes,
    gpu_bytes,
    kv_bytes_per_token,
    make_config,
    nf4_linears,
    nf4_unavailable,
    tiny_processor,
)

PROVIDERS = ("release_bf16_loop", "ours_bf16", "int8", "int4", "int4_small", "nf4_dense")
# run order: dense pair first (one model shared), then the targets, so a cut-short run still
# has the comparisons that matter
RUN_ORDER = ("ours_bf16", "release_bf16_loop", "int4", "int4_small", "int8", "nf4_dense")
BITS = {"release_bf16_loop": 16, "ours_bf16": 16, "int8": 8, "int4": 4, "int4_small": 4, "nf4_dense": 4}
STATIC_DECODE = {"ours_bf16", "int8", "int4", "int4_small"}  # the rest decode the release's way
DENSE_PAIR = ("ours_bf16", "release_bf16_loop")  # the same dense model, built once for both
MEMORY_BUDGET_GIB = {"int4": 6.0, "int4_small": 4.5}
PROMPT = "Describe this image."
IMAGE_SIZE = (1920, 1080)
MEMORY_CHECK_IMAGE_SIZE = (640, 480)
MEMORY_CHECK_NEW_TOKENS = 512
GIB = 2**30


class Skip(Exception):
    """A provider that cannot run here (the reason is recorded)."""


class OutOfTime(BaseException):
    """The time budget ran out. A BaseException, so that no ``except Exception`` on the way
    (ours, or a library's) swallows it."""


@contextlib.contextmanager
def time_budget(seconds: float):
    """Raise OutOfTime in the main thread once ``seconds`` have passed (SIGALRM), wherever it is."""
    def expire(signum, frame):
        raise OutOfTime

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------
def _cuda() -> bool:
    return torch.cuda.is_available()


def _sync() -> None:
    if _cuda():
        torch.cuda.synchronize()


def _free() -> None:
    gc.collect()
    if _cuda():
        torch.cuda.empty_cache()


def _device_name(smoke: bool) -> str:
    if _cuda() and not smoke:
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, smoke test, tiny config)"


def _peak_gib() -> float | None:
    return torch.cuda.max_memory_reserved() / GIB if _cuda() else None


def _reset_peak() -> None:
    if _cuda():
        torch.cuda.reset_peak_memory_stats()


class Recorder:
    """Appends each record to OUT/e2e.jsonl at once (a run cut short keeps what it measured)."""

    def __init__(self, out: Path, device: str):
        self.path = out / "e2e.jsonl"
        self.device = device

    def emit(self, rec: dict) -> dict:
        rec = {**rec, "device": self.device}
        line = json.dumps(rec)
        with open(self.path, "a") as f:
            f.write(line + "\n")
        print(line, flush=True)
        return rec


def copy_gbps(out: Path, device: str) -> float | None:
    """Device copy bandwidth (GB/s, read + written): gpu_check's bandwidth.json, else measured."""
    if not _cuda():
        return None
    path = out / "bandwidth.json"
    try:
        rec = json.loads(path.read_text())
        if rec.get("device") == device and rec.get("copy_gbps"):
            return float(rec["copy_gbps"])
    except (OSError, ValueError):
        pass
    from gpu_check import measure_copy

    gbps = measure_copy()["copy_gbps"]
    _free()
    return gbps


# ---------------------------------------------------------------------------------------
# models per provider
# ---------------------------------------------------------------------------------------
def prepare(provider: str, model, args) -> dict:
    """Turn the dense model into ``provider``'s, in place; what was done, for the record."""
    from molmoe_lite import patch
    from molmoe_lite.model.layers import RMSNorm

    info: dict = {}
    # the release's RMSNorm is torch ops; every other provider gets the fused norm kernels on CUDA
    release = provider in ("release_bf16_loop", "nf4_dense")
    for mod in model.modules():
        if isinstance(mod, RMSNorm):
            mod.use_kernels = False if release else None
    info["fused_norms"] = not release
    if provider in ("int8", "int4", "int4_small"):
        method = args.method
        t0 = time.perf_counter()
        patch(model, bits=BITS[provider], method=method)
        _sync()
        info.update(quantize_method=method, quantize_s=round(time.perf_counter() - t0, 3))
    if provider == "int4_small":
        from molmoe_lite.api import apply_small_preset

        apply_small_preset(model, method)
        info["small_preset"] = "molmoe_lite.api.apply_small_preset"
    if provider == "nf4_dense":
        why = nf4_unavailable(model.device, model.compute_dtype)
        if why:
            raise Skip(why)
        nf4_linears(model, ("attention", "experts"))
        info["nf4"] = "bitsandbytes Linear4bit nf4, blocksize 64, no double quant; experts + attention"
    return info


# ---------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------
@torch.inference_mode()
def prefill(model, proc, image, new_tokens: int):
    """Processor + ViT + prefill + first token on the host: (seconds, batch, cache)."""
    t0 = time.perf_counter()
    inputs = proc.process(images=image, text=PROMPT)
    batch = {k: v[None].to(model.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    cache = model.new_cache(1, batch["input_ids"].shape[1] + new_tokens)
    logits = model(**batch, cache=cache, logits_at="last")
    int(logits[0, -1].argmax())  # the first token exists on the host
    return time.perf_counter() - t0, batch, cache


def measure_ttft(model, proc, image, new_tokens: int, repeats: int):
    """Median time to first token after one warm-up (kernel compilation, allocator)."""
    prefill(model, proc, image, new_tokens)
    times, batch, cache = [], None, None
    for _ in range(max(1, repeats)):
        batch = cache = None  # drop the previous cache before allocating the next
        dt, batch, cache = prefill(model, proc, image, new_tokens)
        times.append(dt)
    return statistics.median(times), batch, cache


def _batch_cache(model, cache1, prompt_len: int, rows: int):
    """A cache of ``rows`` copies of the batch-1 prompt's cache (slots past the prompt unused)."""
    cache1.length = prompt_len
    if rows == 1:
        return cache1
    cache = model.new_cache(rows, cache1.max_len)
    cache.k.copy_(cache1.k.expand(-1, rows, -1, -1, -1))
    cache.v.copy_(cache1.v.expand(-1, rows, -1, -1, -1))
    cache.length = prompt_len
    return cache


@torch.inference_mode()
def measure_decode(model, batch, cache1, rows: int, static: bool, steps: int, warmup: int, seed: int) -> dict:
    """Seconds for ``steps`` decode steps of ``rows`` sequences after ``warmup`` untimed ones."""
    from molmoe_lite.fast_decode import StaticDecoder

    prompt_mask = batch["input_ids"] != -1  # [1, L]
    prompt_len = prompt_mask.shape[1]
    cache = _batch_cache(model, cache1, prompt_len, rows)
    dev = model.device
    gen = torch.Generator(device=dev).manual_seed(seed + rows)
    table = torch.randint(0, model.config.vocab_size, (warmup + steps, rows), device=dev, generator=gen)
    mask = prompt_mask.expand(rows, -1)
    graph = False
    if static:
        decoder = StaticDecoder(model, cache, mask)

        def step(i):
            decoder.step(table[i])
    else:
        def step(i):
            nonlocal mask
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            model(table[i][:, None], attention_mask=mask, cache=cache, logits_at="last")

    for i in range(warmup):
        step(i)
    _sync()
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    _sync()
    seconds = time.perf_counter() - t0
    if static:
        graph = decoder.captured
    return {"seconds": seconds, "graph": graph, "mean_context": prompt_len + warmup + (steps + 1) / 2}


def decode_record(provider: str, model, rows: int, dec: dict, steps: int, gbps_copy: float | None) -> dict:
    """Speed and bandwidth-floor fields of one provider x batch record."""
    weight_bytes, n_exp = decode_weight_bytes(model, rows)
    kv_bytes = int(rows * dec["mean_context"] * kv_bytes_per_token(model))
    step_s = dec["seconds"] / steps
    total = weight_bytes + kv_bytes
    gbps = total / step_s / 1e9
    frac = gbps / gbps_copy if gbps_copy else None
    return {
        "provider": provider,
        "bits": BITS[provider],
        "batch": rows,
        "decode_tokens_per_s": rows * steps / dec["seconds"],
        "tokens_per_s_per_sequence": steps / dec["seconds"],
        "us": step_s * 1e6,
        "gbps": gbps,
        "bw_fraction": frac,
        "floor_fraction": frac,
        "ideal_us": total / (gbps_copy * 1e9) * 1e6 if gbps_copy else None,
        "bytes_per_step": total,
        "weight_bytes_per_step": weight_bytes,
        "kv_bytes_per_step": kv_bytes,
        "experts_per_layer_assumed": n_exp,
        "copy_gbps": gbps_copy,
        "steps": steps,
        "decode_path": ("static, CUDA graph" if dec["graph"] else "static, eager") if provider in STATIC_DECODE
        else "release-style eager loop",
    }


def run_provider(provider: str, model, proc, image, args, rec: Recorder, gbps_copy) -> None:
    """Prepare ``provider`` from the dense ``model`` (in place) and record every batch size."""
    t0 = time.perf_counter()
    info = prepare(provider, model, args)
    _free()
    info["prepare_s"] = round(time.perf_counter() - t0, 3)
    on_gpu = _cuda() and not args.smoke
    info["weights_gib"] = gpu_bytes(model) / GIB if on_gpu else None
    _reset_peak()
    new_tokens = args.warmup_steps + args.steps
    ttft, batch, cache1 = measure_ttft(model, proc, image, new_tokens, args.ttft_repeats)
    common = {"ttft_s": ttft, "prompt_tokens": int(batch["input_ids"].shape[1]),
              "crops": int(batch["images"].shape[1]) if "images" in batch else 0, **info}
    for rows in args.batches:
        dec = measure_decode(model, batch, cache1, rows, provider in STATIC_DECODE, args.steps,
                             args.warmup_steps, args.seed)
        r = decode_record(provider, model, rows, dec, args.steps, gbps_copy)
        rec.emit({**r, "peak_gib": _peak_gib() if on_gpu else None, **common, "date": time.strftime("%Y-%m-%d")})


def _context_bytes() -> int:
    """GPU memory this process holds outside the caching allocator: CUDA context, loaded kernels..."""
    free, total = torch.cuda.mem_get_info()
    return (total - free) - torch.cuda.memory_reserved()


@torch.inference_mode()
def memory_check(provider: str, cfg, proc, rec: Recorder) -> None:
    """Build ``provider``'s preset directly quantised under a capped allocator; record whether it fits."""
    from molmoe_lite.demo import demo_image
    from molmoe_lite.fast_decode import StaticDecoder

    budget = MEMORY_BUDGET_GIB[provider]
    _free()
    context = _context_bytes()
    total = torch.cuda.mem_get_info()[1]
    limit = budget * GIB - context
    small = provider == "int4_small"
    r = {"provider": provider, "bits": 4, "batch": 1, "memory_check": True, "budget_gib": budget,
         "preset": "small" if small else "default", "cuda_context_gib": context / GIB,
         "allocator_limit_gib": limit / GIB, "image_size": list(MEMORY_CHECK_IMAGE_SIZE),
         "new_tokens_budgeted": MEMORY_CHECK_NEW_TOKENS}
    if limit <= 0:
        rec.emit({**r, "fits": False, "error": "the CUDA context alone exceeds the budget"})
        return
    model = batch = cache = decoder = None
    error = None
    torch.cuda.set_per_process_memory_fraction(limit / total)
    _reset_peak()
    try:
        # what load() builds: quantised modules from the start (small's linears quantised on read)
        model = build_model(cfg, "cuda", torch.bfloat16, quantized=("experts",), bits=4, group_size=64, small=small)
        r["weights_gib"] = gpu_bytes(model) / GIB
        image = demo_image(*MEMORY_CHECK_IMAGE_SIZE)
        ttft, batch, cache = prefill(model, proc, image, MEMORY_CHECK_NEW_TOKENS)
        decoder = StaticDecoder(model, cache, batch["input_ids"] != -1)
        tok = torch.zeros(1, dtype=torch.long, device=model.device)
        for _ in range(8):  # the first step captures the graph
            decoder.step(tok)
        torch.cuda.synchronize()
        r.update(ttft_s=ttft, graph=decoder.captured, prompt_tokens=int(batch["input_ids"].shape[1]))
    except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    finally:
        model = batch = cache = decoder = None
        _free()
        torch.cuda.set_per_process_memory_fraction(1.0)
    peak = torch.cuda.max_memory_reserved() / GIB
    context_after = _context_bytes() / GIB  # kernels and libraries loaded during the check count too
    used = peak + max(context / GIB, context_after)
    if error is None and used > budget:
        error = f"peak {peak:.2f} GiB + CUDA context {context_after:.2f} GiB exceeds {budget} GiB"
    fits = error is None
    key = "fits_6gb" if budget == 6.0 else "fits_4_5gb"
    rec.emit({**r, "peak_gib": peak, "cuda_context_after_gib": context_after, "peak_plus_context_gib": used,
              "fits": fits, key: fits, "error": error, "date": time.strftime("%Y-%m-%d")})


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------
def _parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"),
                    help="results folder: e2e.jsonl is appended to, bandwidth.json read if present")
    ap.add_argument("--providers", default=",".join(PROVIDERS),
                    help=f"comma-separated subset of {', '.join(PROVIDERS)} (default: all)")
    ap.add_argument("--batches", default="1,4", help="decode batch sizes (default 1,4)")
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size (default 32)")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed decode steps first (graph capture)")
    ap.add_argument("--ttft-repeats", type=int, default=3, help="timed prefills after a warm-up (median)")
    ap.add_argument("--method", choices=["rtn", "refit"], default="rtn",
                    help="rounding of every quantised provider (default rtn; refit: the default load path's)")
    ap.add_argument("--memory-check", action=argparse.BooleanOptionalAction, default=True,
                    help="check int4 within 6 GiB and int4_small within 4.5 GiB (default on)")
    ap.add_argument("--time-budget", type=float, default=170.0,
                    help="seconds for the whole run (default 170): then the job under way is stopped "
                         "and the rest are skipped, each with a record")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true",
                    help="run on the CPU with the tiny test config (checks the script, not speed)")
    args = ap.parse_args(argv)
    names = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = [p for p in names if p not in PROVIDERS]
    if unknown:
        ap.error(f"unknown providers {unknown}; choose from {', '.join(PROVIDERS)}")
    args.providers = [p for p in RUN_ORDER if p in names]
    try:
        args.batches = sorted({int(b) for b in args.batches.split(",") if b.strip()})
    except ValueError:
        ap.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if not args.batches or min(args.batches) < 1 or args.steps < 1 or args.warmup_steps < 0:
        ap.error("--batches must be >= 1, --steps >= 1, --warmup-steps >= 0")
    return args


def _job_fields(job: tuple[str, str]) -> dict:
    """The fields that say which job a skip or error record is about."""
    kind, provider = job
    if kind == "memory-check":
        return {"provider": provider, "memory_check": True}
    return {"provider": provider, "bits": BITS[provider]}


def main(argv=None) -> int:
    args = _parse(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(args.out, _device_name(args.smoke))
    if not _cuda() and not args.smoke:
        rec.emit({"provider": "all", "skipped": "no CUDA device (use --smoke for a CPU logic check)"})
        return 0
    from molmoe_lite.demo import demo_image

    start = time.perf_counter()
    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    cfg = make_config("tiny" if smoke else "full")
    image = demo_image(*IMAGE_SIZE)
    # the memory checks first: two of the targets, each on a model smaller than the dense one
    jobs = [("memory-check", p) for p in args.providers if p in MEMORY_BUDGET_GIB and args.memory_check and not smoke]
    jobs += [("decode", p) for p in args.providers]
    done = 0
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with time_budget(args.time_budget):
                gbps_copy = None if smoke else copy_gbps(args.out, rec.device)
                proc = tiny_processor(tmp)
                dense = None  # shared by consecutive providers that leave it unchanged
                for job in jobs:
                    kind, provider = job
                    try:
                        if kind == "memory-check":
                            memory_check(provider, cfg, proc, rec)
                        else:
                            model = dense if dense is not None else build_model(cfg, device, dtype, seed=args.seed)
                            dense = None
                            run_provider(provider, model, proc, image, args, rec, gbps_copy)
                            later = [p for k, p in jobs[done + 1:] if k == "decode"]
                            if provider in DENSE_PAIR and later and later[0] in DENSE_PAIR:
                                dense = model
                    except Skip as exc:
                        rec.emit({**_job_fields(job), "skipped": str(exc)})
                    except Exception as exc:  # one provider failing must not lose the others
                        traceback.print_exc()
                        rec.emit({**_job_fields(job), "error": f"{type(exc).__name__}: {exc}"[:500]})
                    finally:
                        model = None
                        _free()
                    done += 1
        except (OutOfTime, KeyboardInterrupt) as exc:
            why = (f"time budget of {args.time_budget:.0f} s ran out" if isinstance(exc, OutOfTime)
                   else "interrupted (the stage's time limit)")
            elapsed = time.perf_counter() - start
            for i, job in enumerate(jobs[done:]):
                state = "stopped" if i == 0 else "not started"
                rec.emit({**_job_fields(job), "skipped": f"{state}: {why} after {elapsed:.0f} s"})
    print(f"bench_e2e: {time.perf_counter() - start:.0f} s, records in {rec.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
