"""Expert kernels (decode GEMV path, prefill grouped path, fused_moe) against the fp32 reference.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set below before
anything imports triton); on a CUDA machine they compile for real and bf16 runs too.
Oracle: kernels/reference.py (x @ dequant(W) in fp32), itself checked against a plain dense
loop. Tolerance: norm-wise relative error, dtype -> bound in TOL. Interpreter cost is about
6 ms per program per K-step, so shapes are tiny; MolmoE shapes run in benchmarks/ on a GPU.
"""

import functools
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dataclasses import dataclass  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from molmoe_lite.kernels.fused_moe import fused_moe, kernels_available, quantized_linear  # noqa: E402
from molmoe_lite.kernels.checks import MoEInputError  # noqa: E402
from molmoe_lite.kernels.reference import moe_reference, route  # noqa: E402
from molmoe_lite.quantize.format import quantize_weight  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# norm-wise relative error bound of kernel vs reference on the same quantised weights
TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 2e-2}
DTYPES = [
    torch.float32,
    torch.float16,
    # a bf16 tl.dot returns garbage in Triton's interpreter, so bf16 is GPU-only
    pytest.param(torch.bfloat16, marks=[pytest.mark.cuda,
                                        pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 needs CUDA")]),
]
# Small tiles, so the tiny shapes still take several N-blocks and K-steps, and every way of
# applying scales runs: G = 32 < BLOCK_K (whole groups as a tile axis in the GEMV; per-element
# scales in the grouped kernels), G = 64/128 >= BLOCK_K (one scale per row and step), and
# per-channel int8 G = 96 ("odd_sizes": neither divides, per-element scales and a K tail).
SMALL = {
    "gate_up_decode": {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1},
    "down_decode": {"BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1},
    "gate_up_grouped": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1},
    "down_grouped": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 1},
    "decode_max_tokens": 8,
}

pytestmark = pytest.mark.skipif(not kernels_available(DEVICE), reason="triton unavailable")


@dataclass(frozen=True)
class Case:
    t: int  # tokens
    e: int  # experts
    h: int  # hidden
    i: int  # expert hidden
    top_k: int  # TOP_K, experts chosen per token
    g4: int  # int4 group size
    g8: int | None  # int8 group size (None: per output channel)
    routing: str = "random"  # random | one_expert | some_empty


CASES = {
    "T1": Case(1, 8, 64, 32, 2, 32, None),  # single decode token
    "T_lt_block": Case(5, 8, 64, 32, 2, 32, None),  # fewer pairs than one 16-row block
    "odd_sizes": Case(5, 6, 96, 64, 3, 32, None),  # E, TOP_K, T, H not powers of 2; int8 G = 96 has a K tail
    "top1": Case(6, 4, 64, 32, 1, 32, None),  # TOP_K = 1
    "topE": Case(3, 4, 64, 32, 4, 32, None),  # TOP_K = E: every expert for every token
    "one_expert": Case(24, 8, 64, 32, 1, 64, None, "one_expert"),  # all tokens to one expert: 2 blocks
    "some_empty": Case(10, 8, 64, 32, 2, 32, 32, "some_empty"),  # 5 of 8 experts get no token
    "g64": Case(4, 4, 128, 64, 2, 64, 64),
    "g128": Case(4, 4, 128, 128, 2, 128, 128),
}


def make_problem(case: Case, bits: int, dtype: torch.dtype, seed: int = 0):
    """Seeded x, router logits and quantised expert weights for ``case``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.t, case.h, generator=gen)
    logits = torch.randn(case.t, case.e, generator=gen)
    if case.routing == "one_expert":
        logits[:, 3] += 20.0
    elif case.routing == "some_empty":
        logits[:, [1, 4, 6]] += 20.0  # top-2 always among experts 1, 4, 6
    w13 = torch.randn(case.e, 2 * case.i, case.h, generator=gen) / case.h**0.5
    w2 = torch.randn(case.e, case.h, case.i, generator=gen) / case.i**0.5
    g = case.g4 if bits == 4 else case.g8
    q13 = quantize_weight(w13, bits=bits, group_size=g, method="rtn").to(DEVICE)
    q2 = quantize_weight(w2, bits=bits, group_size=g, method="rtn").to(DEVICE)
    return x.to(DEVICE, dtype), logits.to(DEVICE), q13, q2, (w13, w2)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
@pytest.mark.parametrize("path", ["decode", "prefill"])
def test_expert_kernels_match_reference(path, case, bits, dtype):
    from molmoe_lite.kernels import moe_gemv, moe_grouped, routing

    x, logits, w13, w2, _ = make_problem(case, bits, dtype)
    weights, ids = route(logits, case.top_k)
    if case.routing == "some_empty":
        assert len(torch.unique(ids)) == 3  # the edge case really has empty experts
    ref = moe_reference(x.float(), weights, ids, w13, w2)
    ids32 = ids.to(torch.int32)
    t, top_k = ids.shape
    # every intermediate and output buffer is NaN-poisoned: a skipped element shows up
    act = nan_like((t * top_k, case.i), dtype)
    out = nan_like((t, case.h), dtype)
    if path == "decode":
        moe_gemv.gate_up_gemv(x, ids32, w13, SMALL["gate_up_decode"], out=act)
        assert not act.isnan().any(), "gate_up_gemv left act elements unwritten"
        moe_gemv.down_gemv(act, weights, ids32, w2, dtype, SMALL["down_decode"], out=out)
    else:
        grouping = routing.group_by_expert(ids32, case.e, SMALL["gate_up_grouped"]["BLOCK_M"])
        moe_grouped.gate_up_grouped(x, grouping, top_k, w13, SMALL["gate_up_grouped"], out=act)
        assert not act.isnan().any(), "gate_up_grouped left act elements unwritten"
        work = nan_like((t * top_k, case.h), dtype)
        out = moe_grouped.down_grouped(act, weights, grouping, w2, dtype, SMALL["down_grouped"], workspace=work)
    assert out.dtype == dtype and out.shape == (t, case.h)
    assert not out.isnan().any(), f"{path}: output has NaN (unwritten elements)"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"{path} int{bits} {dtype}: relative error {err:.2e} > {TOL[dtype]:.0e}"


SPLIT_CASES = ["T1", "odd_sizes", "topE"]  # TOP_K = 2, 3, 4; top-1 never splits (expert_split caps at TOP_K)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("split", [2, 3], ids=["split2", "split3_uneven"])
@pytest.mark.parametrize("case_name", SPLIT_CASES)
def test_down_decode_split_over_experts(case_name, split, bits, dtype):
    """The down kernel with each token's experts split over programs (the last to arrive sums):
    same result as the reference, every output written, the arrival counters left at zero."""
    from molmoe_lite.kernels import moe_gemv

    case = CASES[case_name]
    x, logits, w13, w2, _ = make_problem(case, bits, dtype)
    weights, ids = route(logits, case.top_k)
    ref = moe_reference(x.float(), weights, ids, w13, w2)
    ids32 = ids.to(torch.int32)
    act = moe_gemv.gate_up_gemv(x, ids32, w13, SMALL["gate_up_decode"])
    out = nan_like((case.t, case.h), dtype)
    cfg = {**SMALL["down_decode"], "BLOCK_N": 16, "EXPERT_SPLIT": split}
    moe_gemv.down_gemv(act, weights, ids32, w2, dtype, cfg, out=out)
    assert not out.isnan().any(), "split down_gemv left outputs unwritten"
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"split {split}: relative error {err:.2e}"
    assert not any(c.any() for c in moe_gemv._ARRIVALS.values()), "arrival counters not reset"


@pytest.mark.parametrize("name,top_k,programs,sms,pinned,want", [
    ("off_cuda", 8, 256, None, None, 1),
    ("h100_T1", 8, 512, 132, None, 4),  # 512 programs -> 2048 >= 8 per SM
    ("laptop_T1", 8, 256, 24, None, 1),  # already 10 programs per SM
    ("capped_at_top_k", 2, 16, 132, None, 2),
    ("pinned", 8, 512, 132, 8, 8),
    ("pinned_above_k", 2, 512, 132, 8, 2),
])
def test_expert_split_rule(name, top_k, programs, sms, pinned, want):
    from molmoe_lite.kernels.moe_gemv import expert_split

    cfg = {} if pinned is None else {"EXPERT_SPLIT": pinned}
    assert expert_split(cfg, top_k, programs, sms) == want


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("t", [1, 12], ids=["decode_T1", "prefill_T12"])
def test_fused_moe_end_to_end(t, bits, dtype):
    # default launch tables, decode/prefill chosen by T (decode_max_tokens = 8), kernel routing
    case = Case(t, 8, 64, 32, 2, 32, None)
    x, logits, w13, w2, _ = make_problem(case, bits, dtype, seed=1)
    ref = moe_reference(x.float(), *route(logits, 2), w13, w2)
    out = fused_moe(x, logits, w13, w2, top_k=2)
    assert out.shape == x.shape and out.dtype == dtype
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"fused_moe T={t}: relative error {err:.2e}"
    # the CPU fallback agrees with the MoE written out token by token (not with moe_reference,
    # which the fallback itself is built on)
    fallback = fused_moe(x, logits, w13, w2, top_k=2, use_kernels=False)
    assert rel_err(fallback, moe_by_hand(x, logits, w13, w2, top_k=2)) <= TOL[dtype]


def moe_by_hand(x, logits, w13, w2, top_k):
    """sum over the top_k experts (softmax in fp32, ties to the lower id) of
    p_e * down_e(silu(gate_e x) * up_e x), one token at a time, dequantised weights."""
    g13, g2 = w13.dequantize().float().cpu(), w2.dequantize().float().cpu()
    inter = g2.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        p = torch.softmax(logits[t].float().cpu(), -1).tolist()
        chosen = sorted(range(len(p)), key=lambda e: (-p[e], e))[:top_k]
        xt = x[t].float().cpu()
        for e in chosen:
            h = F.silu(g13[e, :inter] @ xt) * (g13[e, inter:] @ xt)
            out[t] += p[e] * (g2[e] @ h)
    return out.to(x.device)


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("t", [3, 20], ids=["decode", "prefill"])
def test_quantized_linear(t, bits):
    # one expert, top-1, weight 1: a plain quantised linear layer through the down kernels
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(t, 96, generator=gen).to(DEVICE)
    w = torch.randn(40, 96, generator=gen) / 96**0.5
    qw = quantize_weight(w, bits=bits, group_size=32, method="rtn").to(DEVICE)
    ref = x @ qw.dequantize().to(DEVICE).t()
    out = quantized_linear(x, qw)
    assert out.shape == (t, 40)
    assert rel_err(out, ref) <= TOL[torch.float32]


@functools.lru_cache(maxsize=2)
def _molmoe_weights(bits):
    """One MolmoE MoE layer (E=64, H=2048, I=1024) quantised on the GPU (RTN: the kernels are under test)."""
    gen = torch.Generator(device=DEVICE).manual_seed(bits)
    w13 = torch.randn(64, 2048, 2048, device=DEVICE, generator=gen) / 2048**0.5
    w2 = torch.randn(64, 2048, 1024, device=DEVICE, generator=gen) / 1024**0.5
    g = 64 if bits == 4 else None
    return (quantize_weight(w13, bits=bits, group_size=g, method="rtn"),
            quantize_weight(w2, bits=bits, group_size=g, method="rtn"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="MolmoE-size shapes need a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("t", [1, 5, 300], ids=["T1", "T5", "T300"])
def test_molmoe_shapes_on_gpu(t, bits, dtype):
    # the real layer: 64 experts, top-8, H=2048, I=1024, compiled with the device's shipped config
    w13, w2 = _molmoe_weights(bits)
    gen = torch.Generator(device=DEVICE).manual_seed(t)
    x = torch.randn(t, 2048, device=DEVICE, generator=gen).to(dtype)
    logits = torch.randn(t, 64, device=DEVICE, generator=gen)
    ref = moe_reference(x.float(), *route(logits, 8), w13, w2)
    out = fused_moe(x, logits, w13, w2, top_k=8)
    err = rel_err(out, ref)
    assert err <= TOL[dtype], f"T={t} int{bits} {dtype}: relative error {err:.2e}"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: ordering across SMs")
@pytest.mark.parametrize("split", [4, 8])
def test_split_down_decode_is_deterministic_on_gpu(split):
    """Split programs meet through an atomic counter: 20 calls must give identical bits, and the
    right ones (a missed acquire/release would read stale partials now and then)."""
    from molmoe_lite.kernels import moe_gemv

    w13, w2 = _molmoe_weights(4)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    x = torch.randn(1, 2048, device=DEVICE, generator=gen).to(torch.bfloat16)
    weights, ids = route(torch.randn(1, 64, device=DEVICE, generator=gen), 8)
    ids32 = ids.to(torch.int32)
    act = moe_gemv.gate_up_gemv(x, ids32, w13)
    cfg = {**moe_gemv.get_config(DEVICE)["down_decode"], "EXPERT_SPLIT": split}
    outs = [moe_gemv.down_gemv(act, weights, ids32, w2, torch.bfloat16, cfg) for _ in range(20)]
    assert all(torch.equal(o, outs[0]) for o in outs)
    ref = moe_reference(x.float(), weights, ids, w13, w2)
    assert rel_err(outs[0], ref) <= TOL[torch.bfloat16]


def test_reference_matches_dense_loop():
    # the oracle itself, against the plainest possible per-token, per-choice loop
    case = Case(5, 6, 64, 32, 3, 32, None)
    x, logits, w13, w2, _ = make_problem(case, 4, torch.float32, seed=3)
    weights, ids = route(logits, case.top_k, renormalize=True)
    d13, d2 = w13.dequantize().to(DEVICE), w2.dequantize().to(DEVICE)
    expect = torch.zeros(case.t, case.h, device=DEVICE)
    for t in range(case.t):
        for j in range(case.top_k):
            e = int(ids[t, j])
            gate, up = d13[e, : case.i] @ x[t], d13[e, case.i :] @ x[t]
            expect[t] += weights[t, j] * (d2[e] @ (F.silu(gate) * up))
    got = moe_reference(x, weights, ids, w13, w2)
    assert rel_err(got, expect) <= 1e-5


@pytest.mark.parametrize("bits,bound", [(4, 0.15), (8, 0.02)], ids=["int4", "int8"])
def test_quantised_close_to_float(bits, bound):
    # loose, bounded: quantisation error of the whole MoE output vs float weights
    case = Case(16, 8, 128, 64, 2, 64, None)
    x, logits, w13, w2, (f13, f2) = make_problem(case, bits, torch.float32, seed=4)
    weights, ids = route(logits, case.top_k)
    out = fused_moe(x, logits, w13, w2, top_k=case.top_k)
    f13, f2 = f13.to(DEVICE), f2.to(DEVICE)
    dense = torch.zeros_like(x)
    for j in range(case.top_k):
        e = ids[:, j]
        gu = torch.einsum("th,tnh->tn", x, f13[e])
        act = F.silu(gu[:, : case.i]) * gu[:, case.i :]
        dense += weights[:, j, None] * torch.einsum("ti,thi->th", act, f2[e])
    err = rel_err(out, dense)
    assert err <= bound, f"int{bits}: MoE output error vs float weights {err:.3f} > {bound}"


def test_bad_inputs_raise_clear_errors():
    case = Case(2, 4, 64, 32, 2, 32, None)
    x, logits, w13, w2, _ = make_problem(case, 4, torch.float32)
    with pytest.raises(MoEInputError, match="top_k"):
        fused_moe(x, logits, w13, w2, top_k=5)
    with pytest.raises(MoEInputError, match=r"\[T, E\]"):
        fused_moe(x, logits[:1], w13, w2, top_k=2)
    with pytest.raises(MoEInputError, match="w2 must be"):
        fused_moe(x, logits, w13, w13, top_k=2)
