"""Prefill on the CPU: other ways to run its two big matmul parts, timed (not a CI test).

    python benchmarks/cpu_prefill_candidates.py            # MolmoE-1B's sizes
    python benchmarks/cpu_prefill_candidates.py --smoke    # tiny sizes: the checks, no timing worth keeping

Prints one JSON line per measurement (best of a few calls, with this process's threads):

- ``expert_rows``: one expert's gate+up weight [2I, H], int4 group 64, for a block of rows:
  torch's int4 kernel (what ``moe_experts_cpu`` runs, bfloat16 activations) against
  dequantising the weight to float32 and one float32 matmul. The dequantisation splits each
  byte's two codes into the even and the odd inputs (two contiguous halves, two matmuls), so
  no interleaving copy is made.
- ``expert_layer``: one MoE layer's experts for a prompt of T tokens routed top-k uniformly at
  random: ``moe_experts_cpu`` against the same grouping with every expert dequantised.
- ``vit_linear``: one ViT-sized linear (4 crops of 577 rows, 1024 -> 4096): float32 against
  int8 x int8 -> int32 (``torch._int_mm``, AVX512-VNNI where the CPU has it) with per-row
  activation and per-channel weight scales, whole (quantise, multiply, rescale) and the
  integer multiply alone, with its error against float32.

Every candidate is checked against a float32 reference of the same math before it is timed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cpu import best_seconds  # noqa: E402

from molmoe_lite.kernels.cpu_experts import CpuWeight, moe_experts_cpu  # noqa: E402
from molmoe_lite.quantize.format import QuantizedWeight  # noqa: E402

FULL = {"experts": 64, "hidden": 2048, "inter": 1024, "group": 64, "top_k": 8, "tokens": 750,
        "rows": (16, 32, 64, 96, 128, 256), "vit": (2308, 1024, 4096)}
SMOKE = {"experts": 4, "hidden": 64, "inter": 32, "group": 32, "top_k": 2, "tokens": 8,
         "rows": (3, 16), "vit": (16, 64, 128)}


def random_int4(gen: torch.Generator, e: int, n: int, k: int, g: int) -> QuantizedWeight:
    codes = torch.randint(0, 256, (e, n, k // 2), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(e, n, k // g, generator=gen) * 0.01 + 1e-3).half()
    zeros = (torch.rand(e, n, k // g, generator=gen) * 15).half()
    return QuantizedWeight(codes, scales, zeros, 4, g, (e, n, k))


def dequant_halves(qw: QuantizedWeight, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert e's weight in float32 as (even inputs [N, K/2], odd inputs [N, K/2])."""
    _, n, k = qw.shape
    groups = k // qw.group_size
    scale = qw.scales[e].float()[..., None]  # [N, groups, 1]
    offset = -qw.zeros[e].float()[..., None] * scale
    codes = qw.qweight[e].view(n, groups, qw.group_size // 2)  # byte j holds inputs 2j (low) and 2j+1 (high)
    return (torch.addcmul(offset, codes & 15, scale).view(n, k // 2),
            torch.addcmul(offset, codes >> 4, scale).view(n, k // 2))


def dequant_mm(x: torch.Tensor, qw: QuantizedWeight, e: int) -> torch.Tensor:
    even, odd = dequant_halves(qw, e)
    return torch.addmm(x[:, 0::2] @ even.T, x[:, 1::2], odd.T)


def experts_dequantised(hidden, weights, ids, w13: QuantizedWeight, w2: QuantizedWeight) -> torch.Tensor:
    """``moe_experts_cpu``'s grouping, each expert dequantised to float32."""
    t, k = ids.shape
    inter = w2.shape[2]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    tok = order // k
    xs = hidden[tok].float()
    rows = torch.full((t * k, hidden.shape[1]), float("nan"))
    start = 0
    for e, count in enumerate(counts):
        if count:
            sl = slice(start, start + count)
            gu = dequant_mm(xs[sl], w13, e)
            rows[sl] = dequant_mm(F.silu(gu[:, :inter]) * gu[:, inter:], w2, e)
            start += count
    rows *= weights.reshape(-1)[order].float()[:, None]
    return torch.zeros(t, hidden.shape[1]).index_add_(0, tok, rows)


def int8_linear(x: torch.Tensor, w_codes_t: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x float [M, K] @ (w_codes_t [K, N] int8 * w_scale [N]) + bias, activations int8 per row."""
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    x_codes = torch.round(x / x_scale).to(torch.int8)
    out = torch._int_mm(x_codes, w_codes_t).float()
    return out.mul_(x_scale).mul_(w_scale).add_(bias)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: run every check, keep no timing")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    size = SMOKE if args.smoke else FULL
    gen = torch.Generator().manual_seed(0)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "smoke": args.smoke}

    def emit(record: dict) -> None:
        print(json.dumps({**record, **machine}), flush=True)

    e, h, inter, g = size["experts"], size["hidden"], size["inter"], size["group"]
    w13, w2 = random_int4(gen, e, 2 * inter, h, g), random_int4(gen, e, h, inter, g)
    k13, k2 = CpuWeight(w13), CpuWeight(w2)

    for rows in size["rows"]:
        x = torch.randn(rows, h, generator=gen)
        err = relative_error(k13.mm(x, 0), dequant_mm(x, w13, 0))
        assert err < 1e-2, f"int4 kernel and dequantised matmul disagree at {rows} rows: {err}"
        flop = 2 * rows * 2 * inter * h
        kernel_s = best_seconds(lambda: k13.mm(x, 0), args.repeats)
        dequant_s = best_seconds(lambda: dequant_mm(x, w13, 0), args.repeats)
        emit({"measure": "expert_rows", "rows": rows, "kernel_gflops": round(flop / kernel_s / 1e9, 1),
              "dequant_matmul_gflops": round(flop / dequant_s / 1e9, 1)})

    t, top_k = size["tokens"], size["top_k"]
    hidden = torch.randn(t, h, generator=gen)
    weights, ids = torch.softmax(torch.randn(t, e, generator=gen), dim=-1).topk(top_k)
    err = relative_error(moe_experts_cpu(hidden, weights, ids, k13, k2), experts_dequantised(hidden, weights, ids, w13, w2))
    assert err < 1e-2, f"the two expert layers disagree: {err}"
    flop = 2 * t * top_k * 3 * h * inter
    kernel_s = best_seconds(lambda: moe_experts_cpu(hidden, weights, ids, k13, k2), args.repeats)
    dequant_s = best_seconds(lambda: experts_dequantised(hidden, weights, ids, w13, w2), args.repeats)
    emit({"measure": "expert_layer", "tokens": t, "top_k": top_k, "experts": e,
          "kernel_s": round(kernel_s, 3), "dequant_matmul_s": round(dequant_s, 3),
          "kernel_gflops": round(flop / kernel_s / 1e9, 1), "dequant_matmul_gflops": round(flop / dequant_s / 1e9, 1)})

    m, k, n = size["vit"]
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    bias = torch.randn(n, generator=gen)
    w_scale = w.abs().amax(dim=1) / 127
    w_codes_t = torch.round(w / w_scale[:, None]).to(torch.int8).T  # [K, N], column-major
    x_codes = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    reference = F.linear(x, w, bias)
    err = relative_error(int8_linear(x, w_codes_t, w_scale, bias), reference)
    assert err < 0.05, f"int8 linear off by {err}"
    flop = 2 * m * k * n
    float_s = best_seconds(lambda: F.linear(x, w, bias), args.repeats)
    int8_s = best_seconds(lambda: int8_linear(x, w_codes_t, w_scale, bias), args.repeats)
    int_mm_s = best_seconds(lambda: torch._int_mm(x_codes, w_codes_t), args.repeats)
    emit({"measure": "vit_linear", "shape": [m, k, n], "float32_gflops": round(flop / float_s / 1e9, 1),
          "int8_gops": round(flop / int8_s / 1e9, 1), "int_mm_alone_gops": round(flop / int_mm_s / 1e9, 1),
          "int8_relative_error": round(err, 5)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
