"""pytest-benchmark suite: one MolmoE MoE layer (E=64, top-8, H=2048, I=1024) per provider and T.

Providers: ``int4`` / ``int8`` (our fused_moe: routing + 2 expert launches; group 64 / per
channel), ``bf16_loop`` (the release's way: a torch loop over the experts that got tokens),
``bf16_grouped_mm`` (torch._grouped_mm on expert-sorted rows, where torch has it) and
``nf4_loop`` (bitsandbytes NF4, blocksize 64, the same per-expert loop). The baselines get
their routing (and, for grouped_mm, the sort) computed outside the timed step, while ours
include routing, grouping and the top-k reduction: the comparison is biased against us.

Order: T = 1 and T = 1024 of every provider first (what the kernel targets compare), then
the other T, so a run cut short still has the targets' measurements.

Correctness first: every int4/int8 test checks fused_moe's output against the same MoE on
the dequantised (dense, float32) weights, on the CPU and on the GPU. Only a missing baseline
skips (no torch._grouped_mm, no working bitsandbytes, checked once); a fault in our kernels,
or a pass of them that a CUDA graph cannot capture, fails the test.

Method: weights for 16 layers are resident and every timed pass runs the layer once per
weight set, so that they exceed the L2 cache; time per layer from CUDA events (median of
rounds). Our kernels and torch._grouped_mm never sync with the host, so a pass is captured in
a CUDA graph and replayed (``gpu_check.time_us``); the per-expert loops sync (unique,
nonzero) and run eagerly, as the release runs them. ``timing`` in each record says which.
Bytes read = weights (+ scales/zeros) of the experts that got tokens plus activations in and
out; GB/s and the fraction of the measured device copy bandwidth (copy counted as read +
written) go to ``extra_info``, and a fraction above 1 fails the run. Each test also prints
one ``MOE_BENCH {json}`` line and, when MOLMOE_BENCH_RESULTS names a file, appends that
record to it (JSON lines: provider, bits, T, us, gbps, bw_fraction, device).

On CPU (no CUDA) the suite is a smoke and correctness test: tiny shapes, our kernels under
the interpreter, ``pytest benchmarks/test_bench_moe.py``.
"""

import functools
import json
import os

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from molmoe_lite.kernels.fused_moe import fused_moe  # noqa: E402
from molmoe_lite.kernels.reference import route  # noqa: E402
from _synthetic import nf4_unavailable, random_expert_stack  # noqa: E402  (benchmarks/ is on sys.path under pytest)

DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    E, K, H, I = 64, 8, 2048, 1024  # MolmoE-1B's MoE layer
    TOKENS = [1, 2, 4, 8, 16, 64, 256, 1024, 4096]
    TARGET_TOKENS = (1, 1024)
    LAYERS, ROUNDS = 16, 10
    DTYPE = torch.bfloat16
else:
    E, K, H, I = 8, 2, 64, 32
    TOKENS = [1, 12]
    TARGET_TOKENS = (1,)
    LAYERS, ROUNDS = 1, 1
    DTYPE = torch.float32  # the interpreter's bf16 tl.dot is wrong
# the kernel targets need int4 and the bf16 providers: they go first within each phase
PROVIDERS = ["int4", "bf16_grouped_mm", "bf16_loop", "int8", "nf4_loop"]
OURS = {"int4", "int8"}
CAPTURABLE = OURS | {"bf16_grouped_mm"}  # no host syncs: timed by CUDA-graph replay
# norm-wise relative error of fused_moe against the dense float32 MoE on the same weights
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}
CASES = ([(p, t) for p in PROVIDERS for t in TOKENS if t in TARGET_TOKENS]
         + [(p, t) for p in PROVIDERS for t in TOKENS if t not in TARGET_TOKENS])


class Layers:
    """LAYERS weight sets of one provider, resident on the device."""

    def __init__(self, provider: str):
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        self.provider = provider
        self.sets = []
        for _ in range(LAYERS):
            if provider in OURS:
                bits = 4 if provider == "int4" else 8
                group = 64 if bits == 4 else None  # int8: per channel
                self.sets.append((random_expert_stack(bits, E, 2 * I, H, DEVICE, gen, group),
                                  random_expert_stack(bits, E, H, I, DEVICE, gen, group)))
            else:
                w13 = (torch.randn(E, 2 * I, H, device=DEVICE, generator=gen) * H**-0.5).to(DTYPE)
                w2 = (torch.randn(E, H, I, device=DEVICE, generator=gen) * I**-0.5).to(DTYPE)
                if provider == "nf4_loop":
                    self.sets.append(self._nf4(w13, w2))
                    del w13, w2
                else:
                    self.sets.append((w13, w2))

    @staticmethod
    def _nf4(w13, w2):
        import bitsandbytes.functional as bnbf

        def q(w):
            return [bnbf.quantize_4bit(w[e].contiguous(), blocksize=64, quant_type="nf4") for e in range(E)]

        return q(w13), q(w2)

    def expert_bytes(self) -> int:
        """Bytes of one expert's w13 + w2 as this provider stores them."""
        if self.provider in OURS:
            return sum(qw.nbytes for qw in self.sets[0]) // E
        if self.provider == "nf4_loop":
            # packed nibbles + one fp32 absmax per 64 weights (bnb's default state, no double quant)
            return 3 * H * I // 2 + 3 * H * I // 64 * 4
        return 3 * H * I * torch.finfo(DTYPE).bits // 8


def _loop(x, weights, ids, expert_fn):
    """The release's MoE: loop over experts that got tokens, index_add the weighted outputs."""
    out = torch.zeros_like(x)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        y = expert_fn(e, x[tok])
        out.index_add_(0, tok, y * weights[tok, slot, None].to(x.dtype))
    return out


def _dense_expert(w, e, xe):
    """One expert of float weights w = (w13 [E, 2I, H], w2 [E, H, I]): SwiGLU then down."""
    gu = xe @ w[0][e].t()
    return (F.silu(gu[:, :I]) * gu[:, I:]) @ w[1][e].t()


def _make_step(provider: str, x: torch.Tensor, logits: torch.Tensor):
    if provider in OURS:
        return lambda w: fused_moe(x, logits, w[0], w[1], top_k=K)
    weights, ids = route(logits, K)
    if provider == "bf16_loop":
        return lambda w: _loop(x, weights, ids, lambda e, xe: _dense_expert(w, e, xe))
    if provider == "nf4_loop":
        import bitsandbytes as bnb

        def expert(w, e, xe):
            (q13, s13), (q2, s2) = w[0][e], w[1][e]
            gu = bnb.matmul_4bit(xe, q13.t(), quant_state=s13)
            return bnb.matmul_4bit(F.silu(gu[:, :I]) * gu[:, I:], q2.t(), quant_state=s2)

        return lambda w: _loop(x, weights, ids, lambda e, xe: expert(w, e, xe))
    # bf16_grouped_mm: rows sorted by expert, one grouped GEMM each for gate|up and down
    flat = ids.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    offs = torch.cumsum(torch.bincount(flat, minlength=E), 0).to(torch.int32)
    tok = order // K
    wflat = weights.reshape(-1)[order, None].to(x.dtype)

    def step(w):
        xs = x[tok]
        gu = torch._grouped_mm(xs, w[0].transpose(1, 2), offs=offs)
        y = torch._grouped_mm(F.silu(gu[:, :I]) * gu[:, I:], w[1].transpose(1, 2), offs=offs)
        return torch.zeros_like(x).index_add_(0, tok, y * wflat)

    return step


def _check_against_dense(out: torch.Tensor, x: torch.Tensor, logits: torch.Tensor, w) -> None:
    """fused_moe's output against the release's loop on the dequantised weights in float32."""
    dense = (w[0].dequantize(), w[1].dequantize())
    weights, ids = route(logits, K)
    ref = _loop(x.float(), weights, ids, lambda e, xe: _dense_expert(dense, e, xe))
    assert torch.isfinite(out).all(), "fused_moe wrote non-finite values"
    err = float((out.float() - ref).norm() / ref.norm())
    assert err <= TOL[DTYPE], f"fused_moe vs the dense reference: relative error {err:.2e} > {TOL[DTYPE]:.0e}"


@functools.cache
def missing_baseline(provider: str) -> str | None:
    """Why a baseline provider cannot run here, or None; checked once per provider, so a
    baseline that is missing skips every T for one reason instead of failing at each."""
    if provider == "bf16_grouped_mm":
        if not (CUDA and hasattr(torch, "_grouped_mm")):
            return "torch._grouped_mm needs CUDA and a torch that has it"
        try:  # an architecture or dtype this torch's grouped GEMM does not support
            a = torch.zeros(16, 64, device=DEVICE, dtype=DTYPE)
            torch._grouped_mm(a, torch.zeros(2, 64, 16, device=DEVICE, dtype=DTYPE),
                              offs=torch.tensor([8, 16], device=DEVICE, dtype=torch.int32))
            torch.cuda.synchronize()
        except (RuntimeError, NotImplementedError) as exc:
            return f"torch._grouped_mm unavailable here: {exc}"[:200]
    if provider == "nf4_loop":
        if not CUDA:
            return "the bitsandbytes NF4 baseline is GPU-only here"
        return nf4_unavailable(DEVICE, DTYPE)
    return None


@pytest.fixture(scope="module")
def copy_gbps():  # gpu_check is importable: pytest puts benchmarks/ on sys.path
    """Device copy bandwidth (read + written), the ceiling for bw_fraction."""
    if not CUDA:
        return None
    from gpu_check import measure_copy

    return measure_copy()["copy_gbps"]


_LAYER_CACHE: dict[str, Layers] = {}


def _layers(provider: str) -> Layers:
    if provider not in _LAYER_CACHE:
        _LAYER_CACHE.clear()  # one provider's 16 layers resident at a time
        if CUDA:
            torch.cuda.empty_cache()
        _LAYER_CACHE[provider] = Layers(provider)
    return _LAYER_CACHE[provider]


@pytest.mark.parametrize(("provider", "t"), CASES, ids=[f"{p}-T{t}" for p, t in CASES])
def test_moe_layer(benchmark, provider, t, copy_gbps):
    reason = None if provider in OURS else missing_baseline(provider)
    if reason:
        pytest.skip(reason)
    layers = _layers(provider)
    gen = torch.Generator(device=DEVICE).manual_seed(t)
    x = torch.randn(t, H, device=DEVICE, generator=gen).to(DTYPE)
    logits = torch.randn(t, E, device=DEVICE, generator=gen)
    step = _make_step(provider, x, logits)
    out = step(layers.sets[0])
    if provider in OURS:
        _check_against_dense(out, x, logits, layers.sets[0])

    def one_pass():
        for w in layers.sets:
            step(w)

    if CUDA:
        from gpu_check import time_us

        us_pass, timing, run = time_us(one_pass, ROUNDS, graph=provider in CAPTURABLE)
        if provider in OURS:
            assert timing == "graph", f"{provider}: a pass of our kernels must be capturable: {timing}"
        us = us_pass / LAYERS
        benchmark.pedantic(lambda: (run(), torch.cuda.synchronize()), rounds=3, iterations=1)
    else:
        benchmark(one_pass)
        us, timing = None, "interpreter"

    n_used = len(torch.unique(route(logits, K)[1]))
    bytes_read = n_used * layers.expert_bytes() + 2 * t * H * x.element_size()
    rec = {"provider": provider, "bits": {"int4": 4, "int8": 8, "nf4_loop": 4}.get(provider, torch.finfo(DTYPE).bits),
           "T": t, "timing": timing,
           "us": us, "bytes": bytes_read, "experts_used": n_used,
           "gbps": bytes_read / (us * 1e-6) / 1e9 if us else None,
           "device": torch.cuda.get_device_name() if CUDA else "cpu (interpreter smoke test)"}
    rec["bw_fraction"] = rec["gbps"] / copy_gbps if (us and copy_gbps) else None
    rec["copy_gbps"] = copy_gbps
    benchmark.extra_info.update(rec)
    print("MOE_BENCH " + json.dumps(rec))
    path = os.environ.get("MOLMOE_BENCH_RESULTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    if rec["bw_fraction"] is not None:
        assert rec["bw_fraction"] <= 1.0, f"{provider} T={t}: {rec['bw_fraction']:.2f} of copy bandwidth is impossible"
