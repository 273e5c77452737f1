"""The CPU expert kernels (kernels/cpu_experts.py) against the fp32 reference.

Oracle: kernels/reference.py's moe_reference (x @ dequant(W) in fp32 on the same quantised
weights). The CPU kernels take bfloat16 activations, scales and zero points (their only
vectorised path) with fp32 accumulation, so they are held to the bfloat16 bound the Triton
kernel tests use (2e-2, norm-wise relative); int8 rows whose length is not a multiple of 16
run in float32 and are held to the float32 bound (1e-3).
"""

import pytest
import torch

from molmoe_lite.kernels.cpu_experts import CpuWeight, cpu_layout_nbytes, int4_slots, moe_experts_cpu
from molmoe_lite.kernels.reference import MoEInputError, moe_reference, route
from molmoe_lite.quantize.format import quantize_weight

TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2}


# (T, E, H, I, top-k, int4 group, int8 group (None: per output channel))
CASES = {
    "T1": (1, 8, 64, 32, 2, 32, None),  # one decode token
    "T_gt1": (24, 8, 128, 64, 2, 64, None),  # a prompt: several tokens per expert
    "odd_sizes": (5, 6, 104, 64, 3, 104, None),  # E, K, T, H odd; H = 104 rows (padded to 112); G = K = 104 padded to 128
    "group_not_a_kernel_size": (3, 5, 96, 48, 2, 48, 48),  # int4 G = 48: padded to 64 per group
    "group_split": (4, 4, 192, 96, 2, 96, 96),  # int4 G = 96 -> kernel groups of 32; int8 groups of 96
    "int8_k_not_16": (3, 4, 72, 36, 2, 36, None),  # int8 rows of 72 / 36 inputs: the float32 path
    "tiny_groups": (7, 4, 40, 24, 2, 8, 8),  # G = 8 (int4 padded x4; int8 float32, one call per group)
    "some_empty": (10, 8, 64, 32, 2, 32, 32),  # 5 of 8 experts get no token
    "topE": (3, 4, 64, 32, 4, 32, None),  # every expert for every token
    "bf16_hidden": (6, 4, 64, 32, 2, 64, None),  # hidden states already bf16 (the bf16 model)
}


def make_problem(name: str, bits: int, seed: int = 0):
    t, e, h, i, k, g4, g8 = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=gen)
    logits = torch.randn(t, e, generator=gen)
    if name == "some_empty":
        logits[:, [1, 4, 6]] += 20.0
    w13 = torch.randn(e, 2 * i, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, i, generator=gen) / i**0.5
    g = g4 if bits == 4 else g8
    q13 = quantize_weight(w13, bits=bits, group_size=g, method="rtn")
    q2 = quantize_weight(w2, bits=bits, group_size=g, method="rtn")
    weights, ids = route(logits, k)
    if name == "bf16_hidden":
        x = x.bfloat16()
    return x, weights, ids, q13, q2


def rel_err(out, ref):
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("name", CASES)
def test_cpu_experts_match_reference(name, bits):
    x, weights, ids, q13, q2 = make_problem(name, bits)
    if name == "some_empty":
        assert len(torch.unique(ids)) == 3  # the edge case really has idle experts
    ref = moe_reference(x.float(), weights, ids, q13, q2)
    c13, c2 = CpuWeight(q13), CpuWeight(q2)
    out = moe_experts_cpu(x, weights, ids, c13, c2)
    assert out.dtype == x.dtype and out.shape == ref.shape
    assert not out.isnan().any(), "a (token, expert) pair was left unwritten"
    worst = max(TOL[c13.act_dtype], TOL[c2.act_dtype])
    if x.dtype == torch.bfloat16:
        worst = TOL[torch.bfloat16]
    err = rel_err(out, ref)
    assert err <= worst, f"int{bits} {name}: relative error {err:.2e} > {worst:.0e}"


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("name", ["odd_sizes", "group_not_a_kernel_size", "group_split", "tiny_groups"])
def test_repacked_weights_give_back_the_stored_format(name, bits):
    """to_quantized (what state_dict() shows): the stored format exactly."""
    _, _, _, q13, _ = make_problem(name, bits)
    back = CpuWeight(q13).to_quantized()
    assert back.shape == q13.shape and back.group_size == q13.group_size
    assert back.qweight.dtype == q13.qweight.dtype and torch.equal(back.qweight, q13.qweight)
    assert torch.equal(back.scales, q13.scales)
    assert (back.zeros is None) == (q13.zeros is None)
    if bits == 4:
        assert torch.equal(back.zeros, q13.zeros)


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_scales_read_again_instead_of_kept(bits):
    """With ``reread_stored`` the stored scales are not held, and to_quantized reads them
    again; scales that no longer fit the weight are an error, not a wrong weight."""
    _, _, _, q13, _ = make_problem("odd_sizes", bits)
    reads = []

    def reread():
        reads.append(1)
        return q13.scales.clone(), None if q13.zeros is None else q13.zeros.clone()

    c13 = CpuWeight(q13, reread_stored=reread)
    assert set(c13.tensors()) == set(c13.kernel_tensors()) and not reads
    back = c13.to_quantized()
    assert reads == [1] and torch.equal(back.qweight, q13.qweight) and torch.equal(back.scales, q13.scales)
    if bits == 4:
        assert torch.equal(back.zeros, q13.zeros)
    wrong = CpuWeight(q13, reread_stored=lambda: (q13.scales[:, :-1], q13.zeros))
    with pytest.raises(MoEInputError, match="checkpoint changed"):
        wrong.to_quantized()


@pytest.mark.parametrize("keeps_stored", [True, False], ids=["stored-kept", "stored-reread"])
@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("name", ["odd_sizes", "group_not_a_kernel_size", "group_split", "int8_k_not_16",
                                  "tiny_groups"])
def test_layout_bytes_without_building(name, bits, keeps_stored):
    """cpu_layout_nbytes (what weights_plan counts) is the bytes a built CpuWeight holds,
    padding included."""
    _, _, _, q13, q2 = make_problem(name, bits)
    for qw in (q13, q2):
        built = CpuWeight(qw, reread_stored=None if keeps_stored else lambda: (qw.scales, qw.zeros))
        assert cpu_layout_nbytes(qw.shape, bits, qw.group_size, keeps_stored) == built.nbytes


@pytest.mark.parametrize("n,k", [(16, 32), (80, 64), (128, 96)])
def test_learned_int4_layout_inverts_the_packer(n, k):
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    nibbles = torch.stack((packed & 15, packed >> 4), -1).flatten()
    back = torch.empty(n * k, dtype=torch.uint8)
    back[int4_slots(n, k)] = nibbles
    assert torch.equal(back.view(n, k).to(torch.int32), codes)


def test_expert_ids_out_of_range_are_refused():
    x, weights, ids, q13, q2 = make_problem("T1", 4)
    with pytest.raises(MoEInputError, match="expert ids"):
        moe_experts_cpu(x, weights, ids + 100, CpuWeight(q13), CpuWeight(q2))


# (rows, out features, in features, bias, int4 group, int8 group)
LINEAR_CASES = {
    "decode_row": (1, 96, 64, False, 32, None),
    "kernel_rows_odd": (5, 104, 104, True, 104, None),  # N not a multiple of 16, G = K padded to 128
    "kernel_rows_at_limit": (32, 64, 96, False, 48, 48),  # the last row count the kernel takes; odd G
    "prompt_rows": (40, 64, 64, True, 64, None),  # one row past the limit: dequantise + float matmul
}


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
@pytest.mark.parametrize("name", LINEAR_CASES)
def test_quantized_linear_on_the_cpu(name, bits):
    """A QuantizedLinear on the CPU: up to CPU_KERNEL_MAX_ROWS rows through the CPU kernels (bf16
    bound), more rows through x @ dequant(W) (float32, tight); both against the reference."""
    from molmoe_lite.kernels.reference import dequantize
    from molmoe_lite.quantized import CPU_KERNEL_MAX_ROWS, QuantizedLinear

    rows, n, k, bias, g4, g8 = LINEAR_CASES[name]
    gen = torch.Generator().manual_seed(3)
    linear = torch.nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(n, k, generator=gen) / k**0.5)
        if bias:
            linear.bias.copy_(torch.randn(n, generator=gen))
    lin = QuantizedLinear.from_linear(linear, bits, g4 if bits == 4 else g8, method="rtn")
    x = torch.randn(2, rows, k, generator=gen)[:1]  # batch and sequence dims, as the model calls it
    ref = x.reshape(-1, k) @ dequantize(lin.weight()).float().T
    ref = (ref if not bias else ref + lin.bias).view(1, rows, n)
    with torch.no_grad():
        out = lin(x)
    kernel = rows <= CPU_KERNEL_MAX_ROWS
    assert (lin.cpu_weight is not None) == kernel  # built only by a call the kernel takes
    assert out.shape == ref.shape and out.dtype == x.dtype
    tol = TOL[lin.cpu_weight.act_dtype] if kernel else 1e-5
    assert rel_err(out, ref) <= tol, f"{name} int{bits}: {rel_err(out, ref):.2e} > {tol:.0e}"
    if kernel:  # the stored tensors stay, exactly: the state dict and longer calls still read them
        assert lin.qweight is not None and torch.equal(lin.cpu_weight.to_quantized().qweight[0], lin.qweight)
