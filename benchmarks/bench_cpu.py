"""CPU end-to-end benchmark on a full-size int4 MolmoE (not a CI test); prints one JSON line.

    python benchmarks/bench_cpu.py --workdir /folder/with/40GB     # builds the checkpoint once
    python benchmarks/bench_cpu.py --checkpoint ./molmoe-int4      # or uses one

1. Without ``--checkpoint``: writes, once, the synthetic full-size float32 release under
   ``--workdir/src`` (``bench_convert.py``'s writer: random weights, release layout, 29 GB) and
   converts it with ``molmoe-lite quantize --bits 4`` into ``--workdir/int4`` (kept and
   reused; ``--method rtn`` by default since rounding quality does not change speed). A tiny
   tokenizer and the release's preprocessor config are added so the processor works.
2. Measures, in this process, the machine's read bandwidth (sum over a 1 GiB float32 tensor,
   best of 5), before loading anything.
3. ``load(path, device="cpu")`` with the defaults (or ``--dtype``/``--threads``), then one
   640x480 image prompt, 64 new tokens at batch 1 (EOS disabled, greedy): time to first token
   and decode tokens/s from ``model.last_stats``.
4. Floor: the bytes one decode token must read, i.e. the chosen experts (8 of 64 per layer) in
   their packed form plus every non-expert weight a decode step uses (attention, router,
   norms, lm_head; not the ViT, and one row of the token table), divided by the bandwidth.
   Fraction = floor time / measured time per token.
5. Peak RSS is ``ru_maxrss`` (counts mapped weight files too), over the whole run.
6. Time to first token is compute-bound, so it gets a floor too: the multiply-adds of the
   prompt (ViT on every crop, pooling and projector, the decoder on every prompt token with
   its 8 chosen experts, lm_head once; ``prompt_flops``) over the machine's fastest float
   matmul rate (float32, or the compute dtype when faster), measured in this process (best of
   a few ViT-sized matmuls). No float prefill runs faster than that floor; only a faster
   number format (native bf16, int8) could. ``ttft_parts_s`` splits the measured time the same
   way as the work (vision backbone, experts, the rest of the decoder; ``PromptTimer``), and
   ``ttft_parts_floor_s`` gives each part's floor, so a gap can be placed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def best_seconds(work, repeats: int) -> float:
    """The shortest of ``repeats`` timed calls of ``work()``, after one untimed warm-up call."""
    work()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth_gbs(gib: int = 1, repeats: int = 5) -> float:
    t = torch.ones(gib * 2**28, dtype=torch.float32)
    best = best_seconds(t.sum, repeats)
    del t
    return gib * 2**30 / best / 1e9


def matmul_gflops(dtype: torch.dtype, rows: int = 2308, inner: int = 1024, cols: int = 4096,
                  repeats: int = 3) -> float:
    """The best rate of ``x @ w.T`` at ViT-like sizes (4 crops of 577 tokens, width 1024)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=gen).to(dtype)
    w = torch.randn(cols, inner, generator=gen).to(dtype)
    return 2 * rows * inner * cols / best_seconds(lambda: x @ w.T, repeats) / 1e9


def prompt_flops(cfg, n_crops: int, prompt_tokens: int) -> dict[str, float]:
    """Floating-point operations (2 per multiply-add) of one prompt's prefill, by part: the
    vision backbone, the decoder's experts, and the rest of the decoder (attention, router,
    lm_head once)."""
    v = cfg.vision
    tokens = 1 + v.grid[0] * v.grid[1]  # class token + patches per crop
    blocks = max(i % v.num_layers for i in cfg.vit_layers) + 1  # blocks after the last used are skipped
    kv = v.num_kv_heads * v.head_dim
    block = tokens * (2 * v.emb_dim * v.emb_dim + 2 * v.emb_dim * kv + 2 * v.emb_dim * v.mlp_dim)
    block += 2 * tokens * tokens * v.num_heads * v.head_dim  # scores and weighted sum
    vit = n_crops * (blocks * block + (tokens - 1) * v.patch_dim * v.emb_dim)
    pooled = n_crops * cfg.pooled_grid[0] * cfg.pooled_grid[1]
    feat, window = cfg.vit_feature_dim, cfg.image_pooling_h * cfg.image_pooling_w
    pool = pooled * (feat * v.emb_dim * (1 + 2 * window) + v.emb_dim * v.emb_dim)
    projector = pooled * (2 * v.emb_dim * cfg.expert_hidden + cfg.expert_hidden * cfg.d_model)
    d, t = cfg.d_model, prompt_tokens
    kv_d = cfg.n_kv_heads * cfg.head_dim
    attention = t * (d * (d + 2 * kv_d) + d * d) + t * t * cfg.n_heads * cfg.head_dim  # causal: half of 2 T^2
    experts = t * cfg.moe_top_k * 3 * d * cfg.expert_hidden
    router = t * d * cfg.moe_num_experts
    decoder_other = cfg.n_layers * (attention + router) + d * cfg.embedding_size
    macs = {"vision": vit + pool + projector, "experts": cfg.n_layers * experts, "decoder_other": decoder_other}
    return {part: 2.0 * n for part, n in macs.items()}


def build_checkpoint(workdir: Path, method: str) -> Path:
    from bench_convert import _MARKER, write_synthetic_release
    from _synthetic import tiny_processor

    from molmoe_lite.testing import full_size_config_dict

    src, out = workdir / "src", workdir / "int4"
    if not (out / "config.json").exists():
        cfg = full_size_config_dict()
        if not (src / _MARKER).exists():
            write_synthetic_release(src, cfg, pool_mb=1024)
        subprocess.run([sys.executable, "-m", "molmoe_lite.cli", "quantize", str(src), str(out), "--bits", "4",
                        "--method", method, "--force"], check=True)
    tiny_processor(out)
    return out


def decode_floor_bytes(model) -> tuple[int, int]:
    """(bytes of the chosen experts, bytes of the other weights) one decode token reads."""
    from molmoe_lite.quantized import QuantizedExperts

    experts = other = 0
    cfg = model.config
    for name, mod in model.named_modules():
        if isinstance(mod, QuantizedExperts):
            for w in (mod.w13, mod.w2):
                if w.cpu_weight is not None:
                    total = w.cpu_weight.read_nbytes  # not the kept fp16 copies
                else:
                    total = sum(t.numel() * t.element_size() for t in w.buffers())
                experts += total * cfg.moe_top_k // cfg.moe_num_experts
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".experts." in name or "vision_backbone" in name:
            continue
        if name.startswith("model.transformer.wte"):
            other += t.shape[-1] * t.element_size()  # one row
            continue
        other += t.numel() * t.element_size()
    return experts, other


class PromptTimer:
    """Seconds the prompt spends in the vision backbone and in the experts (forward hooks).

    Every vision backbone call belongs to the prompt. An experts call belongs to it when it
    routes more than one token: at batch 1 each decode step routes one. The rest of the time
    to first token is the decoder's other work (attention, router, norms, lm_head) and glue.
    """

    def __init__(self, model):
        self.seconds = {"vision": 0.0, "experts": 0.0}
        self.calls = {"vision": 0, "experts": 0}  # the calls timed
        self._started: dict[int, float] = {}
        self._handles = []
        for name, module in model.named_modules():
            part = "vision" if name.endswith("vision_backbone") else "experts" if name.endswith(".mlp.experts") else None
            if part is not None:
                self._handles.append(module.register_forward_pre_hook(self._start))
                self._handles.append(module.register_forward_hook(self._stop(part)))

    def _start(self, module, args) -> None:
        self._started[id(module)] = time.perf_counter()

    def _stop(self, part: str):
        def hook(module, args, output) -> None:
            start = self._started.pop(id(module))
            if part == "vision" or args[0].shape[0] > 1:
                self.seconds[part] += time.perf_counter() - start
                self.calls[part] += 1
        return hook

    def parts(self, ttft_s: float) -> dict[str, float]:
        """The time to first token split like ``prompt_flops``; removes the hooks."""
        for handle in self._handles:
            handle.remove()
        return {**self.seconds, "decoder_other": ttft_s - sum(self.seconds.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="an int4 checkpoint folder (skips the build)")
    ap.add_argument("--workdir", type=Path, default=None, help="where to build (and keep) the synthetic checkpoint")
    ap.add_argument("--method", default="rtn", help="rounding for the build (default %(default)s)")
    ap.add_argument("--dtype", default=None, help="override load()'s dtype")
    ap.add_argument("--threads", type=int, default=None, help="override load()'s threads")
    ap.add_argument("--preset", default="default", help="load()'s preset (default %(default)s)")
    ap.add_argument("--new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    if args.checkpoint is None and args.workdir is None:
        ap.error("give --checkpoint or --workdir")

    from PIL import Image

    from molmoe_lite import load

    path = args.checkpoint or build_checkpoint(args.workdir, args.method)
    load0 = os.getloadavg()
    bandwidth = read_bandwidth_gbs()
    t0 = time.perf_counter()
    model = load(path, device="cpu", dtype=args.dtype, threads=args.threads, preset=args.preset)
    load_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (480, 640, 3), generator=gen, dtype=torch.uint8).numpy()
    image = Image.fromarray(pixels)
    inputs = model.processor.process(images=[image], text="Describe this image.")
    batch = {k: v[None] for k, v in inputs.items()}
    timer = PromptTimer(model)
    model.generate_from_batch(batch, {"max_new_tokens": args.new_tokens, "eos_token_id": -1})
    stats = model.last_stats
    ttft_parts = timer.parts(stats.ttft_s)
    flops = prompt_flops(model.config, int(inputs["images"].shape[0]), stats.prompt_tokens)
    rates = {str(dt).replace("torch.", ""): matmul_gflops(dt) for dt in {torch.float32, model.compute_dtype}}
    rate = max(rates.values())
    floor_parts = {part: f / (rate * 1e9) for part, f in flops.items()}
    ttft_floor_s = sum(floor_parts.values())
    experts_b, other_b = decode_floor_bytes(model)
    floor_s = (experts_b + other_b) / (bandwidth * 1e9)
    per_token_s = 1.0 / stats.decode_tokens_per_s if stats.decode_tokens_per_s else float("inf")
    result = {
        "bench": "cpu",
        "checkpoint": str(path),
        "dtype": str(model.compute_dtype).replace("torch.", "") if hasattr(model, "compute_dtype") else args.dtype,
        "preset": args.preset,
        "threads": torch.get_num_threads(),
        "load_s": round(load_s, 1),
        "prompt_tokens": stats.prompt_tokens,
        "new_tokens": stats.new_tokens,
        "ttft_s": round(stats.ttft_s, 2),
        "prompt_tflop": {part: round(f / 1e12, 3) for part, f in flops.items()},
        "matmul_gflops": {dt: round(r, 1) for dt, r in rates.items()},
        "ttft_floor_s": round(ttft_floor_s, 2),
        "ttft_fraction_of_floor": round(ttft_floor_s / stats.ttft_s, 4),
        "ttft_parts_s": {part: round(t, 2) for part, t in ttft_parts.items()},
        "ttft_parts_floor_s": {part: round(t, 2) for part, t in floor_parts.items()},
        "decode_tokens_per_s": round(stats.decode_tokens_per_s, 3),
        "read_bandwidth_gbs": round(bandwidth, 2),
        "floor_bytes_per_token": {"experts": experts_b, "other": other_b},
        "floor_ms_per_token": round(floor_s * 1e3, 2),
        "fraction_of_floor": round(floor_s / per_token_s, 4),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3),
        "cpus": os.cpu_count(),
        "cpu": _cpu_name(),
        "loadavg_before": [round(x, 2) for x in load0],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "commit": _commit(),
    }
    print(json.dumps(result), flush=True)
    return 0


def _commit() -> str:
    """The repository's commit (``-dirty`` with uncommitted changes), or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
