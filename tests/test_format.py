"""Quantised format v1: packing, dequantisation, rounding quality, serialising, expert stacks.

Errors are relative Frobenius errors ||dequant(quant(W)) - W|| / ||W||. Tolerances:
packing and dequantisation are exact (integer codes; float32 math on float16 values);
rounding comparisons are strict inequalities between methods on the same seeded tensor.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from molmoe_lite.quantize.format import (
    FORMAT_VERSION,
    QuantFormatError,
    QuantizedWeight,
    dequantize,
    experts_prefix,
    pack_int4,
    quantize_layer_experts,
    quantize_weight,
    quantized_to_tensors,
    stack_layer_experts,
    tensors_to_quantized,
    unpack_int4,
)
from molmoe_lite.quantize.layout import expert_hidden_size, expert_key
from molmoe_lite.testing import random_state_dict, tiny_config_dict


def rel_err(a: torch.Tensor, w: torch.Tensor) -> float:
    return float((a.double() - w.double()).norm() / w.double().norm())


def student_t(shape, seed, dof=4.0, scale=0.02):
    gen = torch.Generator().manual_seed(seed)
    # Student-t = N(0,1) / sqrt(chi2(dof) / dof); chi2(dof) as a sum of dof squared normals.
    z = torch.randn(shape, generator=gen)
    chi2 = (torch.randn((int(dof), *shape), generator=gen) ** 2).sum(0)
    return scale * z / (chi2 / dof).sqrt()


def gaussian(shape, seed, scale=0.02):
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- packing


def test_format_version_is_1():
    assert FORMAT_VERSION == 1


def test_nibble_order_by_hand():
    # even k -> low nibble, odd k -> high nibble: [1, 2, 15, 0] -> bytes 0x21, 0x0F
    packed = pack_int4(torch.tensor([[1, 2, 15, 0]]))
    assert packed.dtype == torch.uint8
    assert packed.tolist() == [[0x21, 0x0F]]


@pytest.mark.parametrize(
    "shape",
    [(16,), (1, 2), (3, 5, 32), (2, 7, 130)],
    ids=["all-16-codes-1d", "one-pair", "stacked-experts", "odd-rows-K130"],
)
def test_pack_unpack_exact(shape):
    gen = torch.Generator().manual_seed(1)
    if shape == (16,):
        q = torch.arange(16)  # every code once
    else:
        q = torch.randint(0, 16, shape, generator=gen)
        q[..., 0] = 15  # the extremes sit in both nibble positions
        q[..., -1] = 0
    p = pack_int4(q)
    assert p.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(unpack_int4(p), q.to(torch.uint8))


def test_unpack_pack_exact_every_byte():
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


@pytest.mark.parametrize(
    "codes, match",
    [
        (torch.tensor([1, 2, 3]), "even"),
        (torch.tensor([0, 16]), r"\[0, 15\]"),
        (torch.tensor([-1, 3]), r"\[0, 15\]"),
        (torch.tensor([0.0, 1.0]), "integer"),
    ],
    ids=["odd-K", "code-16", "negative-code", "float-codes"],
)
def test_pack_rejects(codes, match):
    with pytest.raises(QuantFormatError, match=match):
        pack_int4(codes)


# ---------------------------------------------------------------------------- dequantisation


def _random_stored(bits, lead, n, k, g, seed):
    gen = torch.Generator().manual_seed(seed)
    scales = (torch.rand((*lead, n, k // g), generator=gen) * 0.01 + 1e-3).half()
    if bits == 4:
        codes = torch.randint(0, 16, (*lead, n, k), generator=gen)
        zeros = (torch.rand((*lead, n, k // g), generator=gen) * 15).half()
        return codes, QuantizedWeight(pack_int4(codes), scales, zeros, 4, g, (*lead, n, k))
    codes = torch.randint(-127, 128, (*lead, n, k), generator=gen)
    return codes, QuantizedWeight(codes.to(torch.int8), scales, None, 8, g, (*lead, n, k))


@pytest.mark.parametrize(
    "bits, lead, n, k, g",
    [(4, (), 3, 8, 4), (4, (2,), 2, 12, 6), (8, (), 3, 8, 8), (8, (2,), 2, 12, 4)],
    ids=["int4-2d", "int4-stacked-G6", "int8-per-channel", "int8-grouped-stacked"],
)
def test_dequantize_matches_per_element_reference(bits, lead, n, k, g):
    codes, qw = _random_stored(bits, lead, n, k, g, seed=2)
    got = dequantize(qw)
    flat_codes = codes.reshape(-1, n, k)
    flat_got = got.reshape(-1, n, k)
    flat_q = qw.qweight.reshape(-1, *qw.qweight.shape[-2:])
    flat_s = qw.scales.reshape(-1, n, k // g)
    flat_z = None if qw.zeros is None else qw.zeros.reshape(-1, n, k // g)
    for e in range(flat_got.shape[0]):
        for r in range(n):
            for c in range(k):
                s = float(flat_s[e, r, c // g])
                if bits == 4:
                    byte = int(flat_q[e, r, c // 2])
                    q = byte & 0xF if c % 2 == 0 else byte >> 4
                    assert q == int(flat_codes[e, r, c])
                    want = (q - float(flat_z[e, r, c // g])) * s
                else:
                    want = int(flat_q[e, r, c]) * s
                # float32 math on float16 inputs: one rounding of each op, so 1e-6 relative.
                assert abs(float(flat_got[e, r, c]) - want) <= 1e-6 * max(abs(want), 1e-6)
    assert qw.dequantize(torch.float16).dtype == torch.float16


# ---------------------------------------------------------------------------- quantise


@pytest.mark.parametrize("method", ["rtn", "refit"])
@pytest.mark.parametrize(
    "bits, shape, g, want_g",
    [
        (4, (64, 256), 64, 64),
        (4, (3, 16, 128), 32, 32),
        (4, (8, 32), 64, 32),  # K = 32 < G: capped (the tiny model's down_proj)
        (4, (4, 256), 128, 128),
        (8, (64, 256), None, 256),  # default int8: per output channel
        (8, (2, 8, 128), 64, 64),
    ],
    ids=["int4-g64", "int4-g32-stacked", "int4-K32-cap", "int4-g128", "int8-per-channel", "int8-g64"],
)
def test_quantize_shapes_dtypes_and_codes(bits, shape, g, want_g, method):
    w = gaussian(shape, seed=3)
    qw = quantize_weight(w, bits=bits, group_size=g, method=method)
    k = shape[-1]
    assert qw.group_size == want_g and qw.bits == bits and qw.shape == shape
    assert qw.scales.shape == (*shape[:-1], k // want_g) and qw.scales.dtype == torch.float16
    if bits == 4:
        assert qw.qweight.shape == (*shape[:-1], k // 2) and qw.qweight.dtype == torch.uint8
        assert qw.zeros.shape == qw.scales.shape and qw.zeros.dtype == torch.float16
        assert qw.bits_per_weight == pytest.approx(4 + 32 / want_g)
    else:
        assert qw.qweight.shape == shape and qw.qweight.dtype == torch.int8
        assert qw.zeros is None
        assert int(qw.qweight.min()) >= -127
        assert qw.bits_per_weight == pytest.approx(8 + 16 / want_g)
    # Loose sanity bound: int4 on Gaussian is ~9% (RTN), int8 ~1%.
    assert rel_err(qw.dequantize(), w) < (0.12 if bits == 4 else 0.012)


def test_int4_smaller_groups_smaller_error():
    w = gaussian((128, 1024), seed=4)
    errs = {g: rel_err(quantize_weight(w, 4, g).dequantize(), w) for g in (32, 64, 128)}
    print("int4 refit error by group size:", errs)
    assert errs[32] < errs[64] < errs[128]


def test_int8_per_channel_gaussian_within_1_percent():
    w = gaussian((256, 2048), seed=5)
    qw = quantize_weight(w, bits=8)
    err = rel_err(qw.dequantize(), w)
    print(f"int8 per-channel Gaussian: rel err {err:.5f}, {qw.bits_per_weight:.4f} bits/weight")
    assert err <= 0.01


def test_int4_refit_beats_rtn_gaussian_and_never_worse_per_group():
    w = gaussian((256, 2048), seed=6)
    rtn = quantize_weight(w, 4, 64, "rtn")
    refit = quantize_weight(w, 4, 64, "refit")
    e_rtn, e_refit = rel_err(rtn.dequantize(), w), rel_err(refit.dequantize(), w)
    print(f"int4-g64 Gaussian: RTN {e_rtn:.5f}, refit {e_refit:.5f}")
    assert e_refit < e_rtn
    group_err = lambda qw: ((qw.dequantize() - w).double() ** 2).reshape(-1, 64).sum(1)
    # Per-group choice uses sums in float64 of float32 products: allow 1e-5 relative slack.
    assert bool((group_err(refit) <= group_err(rtn) * (1 + 1e-5) + 1e-14).all())


def _nf4_error(w: torch.Tensor) -> tuple[float, float]:
    """bitsandbytes NF4, block size 64, on the CPU: (rel err, bits per weight)."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed, state = bnb_f.quantize_4bit(w, blocksize=64, quant_type="nf4")
        deq = bnb_f.dequantize_4bit(packed, state)
    bits = 8 * (packed.numel() * packed.element_size() + state.absmax.numel() * state.absmax.element_size())
    return rel_err(deq, w), bits / w.numel()


def test_int4_default_beats_nf4_and_rtn_on_student_t():
    w = student_t((1024, 2048), seed=7)
    e_nf4, bpw_nf4 = _nf4_error(w)
    rtn = quantize_weight(w, 4, 64, "rtn")
    ours = quantize_weight(w)  # the default: int4, G = 64, refit
    e_rtn, e_ours = rel_err(rtn.dequantize(), w), rel_err(ours.dequantize(), w)
    print(
        f"\nStudent-t(4) 1024x2048: NF4-b64 {e_nf4:.5f} ({bpw_nf4:.3f} b/w), "
        f"int4-g64 RTN {e_rtn:.5f} ({rtn.bits_per_weight:.3f} b/w), "
        f"int4-g64 refit {e_ours:.5f} ({ours.bits_per_weight:.3f} b/w)"
    )
    assert ours.group_size == 64 and ours.bits == 4
    assert ours.bits_per_weight <= bpw_nf4  # no more storage than NF4 for the win
    assert e_ours < e_nf4
    assert e_ours < e_rtn


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16-src", "bf16-src"])
def test_half_precision_sources(dtype):
    w = gaussian((32, 128), seed=8).to(dtype)
    qw = quantize_weight(w)
    assert rel_err(qw.dequantize(), w.float()) < 0.12


def test_constant_and_zero_groups_are_exact_enough():
    w = torch.zeros(4, 64)
    w[1] = 0.3
    w[2] = -0.02
    w[3, :32] = 1e-3  # with G = 32: one constant group, one zero group in the same row
    for bits in (4, 8):
        deq = quantize_weight(w, bits, 32).dequantize()
        # float16 storage of the step: 2^-11 relative at most.
        assert torch.allclose(deq, w, rtol=2**-10, atol=0), bits


def test_stacked_equals_per_slice():
    w = gaussian((3, 16, 128), seed=9)
    whole = quantize_weight(w)
    for e in range(3):
        one = quantize_weight(w[e])
        part = whole.index(e)
        assert part.shape == one.shape
        assert torch.equal(part.qweight, one.qweight)
        assert torch.equal(part.scales, one.scales)
        assert torch.equal(part.zeros, one.zeros)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("chunk", [64, 3 * 64, 1 << 22], ids=["one_group", "uneven_tail", "whole_weight"])
def test_chunk_size_does_not_change_the_result(monkeypatch, bits, chunk):
    """Groups are rounded independently, so the chunking (larger on CUDA) changes nothing."""
    import molmoe_lite.quantize.format as fmt

    w = gaussian((2, 24, 128), seed=4)
    want = quantize_weight(w, bits=bits, group_size=64)
    monkeypatch.setattr(fmt, "_CHUNK_ELEMS", chunk)
    got = quantize_weight(w, bits=bits, group_size=64)
    assert torch.equal(got.qweight, want.qweight) and torch.equal(got.scales, want.scales)
    assert (got.zeros is None and want.zeros is None) or torch.equal(got.zeros, want.zeros)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(group_size=48), "does not divide"),
        (dict(group_size=0), "positive int"),
        (dict(group_size=-64), "positive int"),
        (dict(group_size="64"), "positive int"),
        (dict(group_size=True), "positive int"),
        (dict(bits=3), "bits must be 4 or 8"),
        (dict(method="gptq"), "method"),
    ],
    ids=["G48-K128", "G0", "G-negative", "G-str", "G-bool", "bits3", "bad-method"],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(QuantFormatError, match=match):
        quantize_weight(gaussian((4, 128), seed=10), **kwargs)


def test_int4_odd_group_rejected():
    with pytest.raises(QuantFormatError, match="even group size"):
        quantize_weight(gaussian((4, 9), seed=10), 4, 64)  # capped to G = 9


@pytest.mark.parametrize(
    "w, match",
    [
        (torch.ones(4, 64, dtype=torch.int32), "floating-point"),
        (torch.ones(64), r"\[\.\.\., N, K\]"),
        (torch.ones(0, 64), r"\[\.\.\., N, K\]"),
        (torch.tensor([[float("nan")] + [0.0] * 63]), "NaN or infinite"),
        (torch.tensor([[float("inf")] + [0.0] * 63]), "NaN or infinite"),
        (torch.full((2, 64), 1e6), "float16 range"),
    ],
    ids=["int-tensor", "1-d", "empty", "nan", "inf", "beyond-fp16"],
)
def test_bad_weights_name_the_tensor(w, match):
    with pytest.raises(QuantFormatError, match=match) as info:
        quantize_weight(w, name="blocks.0.mlp.experts.3.up_proj.weight")
    assert "blocks.0.mlp.experts.3.up_proj.weight" in str(info.value)


# ---------------------------------------------------------------------------- serialising


@pytest.mark.parametrize("bits", [4, 8])
def test_tensors_round_trip(bits):
    qw = quantize_weight(gaussian((2, 8, 64), seed=11), bits, 32)
    tensors = quantized_to_tensors("p.w13", qw)
    assert set(tensors) == {"p.w13.qweight", "p.w13.scales"} | ({"p.w13.zeros"} if bits == 4 else set())
    back = tensors_to_quantized("p.w13", tensors, bits, 32)
    assert back.shape == qw.shape and back.group_size == 32
    assert torch.equal(back.dequantize(), qw.dequantize())
    inferred = tensors_to_quantized("p.w13", tensors, bits)  # group size from the scales
    assert inferred.group_size == 32


def test_tensors_to_quantized_errors():
    tensors = quantized_to_tensors("x", quantize_weight(gaussian((4, 64), seed=12), 4, 32))
    with pytest.raises(QuantFormatError, match="missing.*x.zeros"):
        tensors_to_quantized("x", {k: v for k, v in tensors.items() if k != "x.zeros"}, 4)
    with pytest.raises(QuantFormatError, match="x.qweight: expected torch.int8"):
        tensors_to_quantized("x", tensors, 8)
    with pytest.raises(QuantFormatError, match="group size 32, the config says 64"):
        tensors_to_quantized("x", tensors, 4, 64)
    with pytest.raises(QuantFormatError, match="x.scales: expected float16"):
        tensors_to_quantized("x", {**tensors, "x.scales": tensors["x.scales"].float()}, 4)
    with pytest.raises(QuantFormatError, match="x.zeros: shape"):
        tensors_to_quantized("x", {**tensors, "x.zeros": tensors["x.zeros"][:, :1]}, 4)


# ---------------------------------------------------------------------------- expert stacks


@pytest.fixture(scope="module")
def tiny_state():
    cfg = tiny_config_dict()
    return cfg, random_state_dict(cfg, seed=13)


def test_stack_layer_experts_layout(tiny_state):
    cfg, state = tiny_state
    n_exp, i_, h = cfg["moe_num_experts"], expert_hidden_size(cfg), cfg["d_model"]
    w13, w2 = stack_layer_experts(state.__getitem__, 1, n_exp)
    assert w13.shape == (n_exp, 2 * i_, h) and w2.shape == (n_exp, h, i_)
    for e in (0, n_exp - 1):
        assert torch.equal(w13[e, :i_], state[expert_key(1, e, "gate_proj")])
        assert torch.equal(w13[e, i_:], state[expert_key(1, e, "up_proj")])
        assert torch.equal(w2[e], state[expert_key(1, e, "down_proj")])


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_layer_experts_equals_quantized_stack(tiny_state, bits):
    cfg, state = tiny_state
    n_exp = cfg["moe_num_experts"]
    w13, w2 = stack_layer_experts(state.__getitem__, 0, n_exp)
    q13, q2 = quantize_layer_experts(state.__getitem__, 0, n_exp, bits)
    for got, w in ((q13, w13), (q2, w2)):
        want = quantize_weight(w, bits)
        assert got.shape == w.shape and got.group_size == want.group_size
        assert torch.equal(got.qweight, want.qweight)
        assert torch.equal(got.scales, want.scales)
        assert (got.zeros is None) == (bits == 8)
        if bits == 4:
            assert torch.equal(got.zeros, want.zeros)
    # down_proj has K = I = 32 in the tiny model: G = 64 is capped to 32.
    if bits == 4:
        assert q2.group_size == min(64, expert_hidden_size(cfg))
    keys = quantized_to_tensors(f"{experts_prefix(0)}.w13", q13)
    assert "model.transformer.blocks.0.mlp.experts.w13.qweight" in keys


def test_stack_layer_experts_shape_mismatch(tiny_state):
    cfg, state = tiny_state
    bad = dict(state)
    bad[expert_key(0, 2, "up_proj")] = bad[expert_key(0, 2, "up_proj")][:-1]
    with pytest.raises(QuantFormatError, match="expert 2"):
        stack_layer_experts(bad.__getitem__, 0, cfg["moe_num_experts"])
    with pytest.raises(QuantFormatError, match="expert 2"):
        quantize_layer_experts(bad.__getitem__, 0, cfg["moe_num_experts"])
