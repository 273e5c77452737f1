"""The fused RMSNorm kernels (plain, add + norm, + RoPE, + RoPE into the cache) against the torch code it replaces (molmoe_lite.model.layers).

On CPU the kernel runs under Triton's interpreter (fp32 and fp16); bf16 runs on CUDA only.
The kernel sums in another order than torch, so outputs agree to a rounding: relative error
<= 1e-6 in fp32, and within about one unit in the last place of the output dtype elsewhere
(bounded norm-wise, which also shows every element of the fresh output was written).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from molmoe_lite.kernels.availability import kernels_available  # noqa: E402
from molmoe_lite.model.layers import RMSNorm, apply_rope, rope_cos_sin  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not kernels_available(DEVICE), reason="triton unavailable")
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=[pytest.mark.cuda, pytest.mark.skipif(
              not torch.cuda.is_available(), reason="bf16 casts are checked on CUDA")])]
# (rows shape, width): one decode row, a prefill block, a width that is not a power of two
SHAPES = {"decode_row": ((1, 1), 64), "prefill": ((2, 5), 64), "odd_width": ((3,), 96)}


def rel_err(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def make_norm(width, weight_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(width, 1e-5, weight_dtype).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(width, generator=g))
    return norm


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("residual", [True, False], ids=["fp32_residual_in", "compute_dtype_in"])
def test_rms_norm_matches_torch(shape, dtype, residual):
    lead, width = shape
    x = torch.randn(*lead, width, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    x = x if residual else x.to(dtype)  # attn/ff norms see the fp32 residual, QK-norms the compute dtype
    norm = make_norm(width, torch.float32)
    with torch.no_grad():
        norm.use_kernels = False  # the torch code (on a GPU the default would be the kernel too)
        ref = norm(x, dtype)
        norm.use_kernels = True
        got = norm(x, dtype)
    assert got.dtype == dtype and got.shape == x.shape and not got.isnan().any()
    assert rel_err(got, ref) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_residual_add_and_norm_match_torch(shape, dtype):
    """x (fp32 residual) + delta (a block's output, compute dtype), then the norm: the sum is
    one rounding either way, so it must be identical; the norm agrees to a rounding."""
    lead, width = shape
    g = torch.Generator().manual_seed(4)
    x = torch.randn(*lead, width, generator=g).to(DEVICE)
    delta = torch.randn(*lead, width, generator=g).to(DEVICE, dtype)
    norm = make_norm(width, torch.float32, seed=5)
    with torch.no_grad():
        norm.use_kernels = False
        ref_sum, ref = norm.add_forward(x, delta, dtype)
        norm.use_kernels = True
        got_sum, got = norm.add_forward(x, delta, dtype)
        first_sum, first = norm.add_forward(x, None, dtype)  # the first block: nothing pending
    assert got_sum.dtype == torch.float32 and torch.equal(got_sum, ref_sum)
    assert got.dtype == dtype and rel_err(got, ref) <= TOL[dtype]
    assert first_sum is x and torch.equal(first, norm(x, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("heads", [1, 4], ids=["one_head", "four_heads"])
@pytest.mark.parametrize("length", [1, 6], ids=["decode", "prefill"])
def test_rms_norm_with_rope_matches_torch(heads, length, dtype):
    D = 16
    x = torch.randn(2, length, heads * D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    positions = torch.tensor([[3 + i for i in range(length)], [40 + 7 * i for i in range(length)]], device=DEVICE)
    cos, sin = rope_cos_sin(positions, D, 10000.0)
    norm = make_norm(heads * D, torch.float32, seed=3)
    with torch.no_grad():
        norm.use_kernels = False
        ref = apply_rope(norm(x, dtype).view(2, length, heads, D).transpose(1, 2), cos, sin)
        norm.use_kernels = True
        got = norm.rope(x, cos, sin, heads, dtype)
    assert got.shape == (2, heads, length, D) and got.dtype == dtype
    assert rel_err(got, ref) <= TOL[dtype]


@pytest.fixture
def kernel_model(tiny_model, tiny_release):
    """The tiny model where the kernels run: the shared CPU one under the interpreter, a CUDA
    copy on a GPU machine (compiled kernels take no CPU tensors)."""
    if DEVICE.type == "cpu":
        return tiny_model
    from molmoe_lite import load

    return load(tiny_release, device=DEVICE, dtype="float32")


def test_decoder_through_the_fused_norms(kernel_model):
    """Every RMSNorm of the tiny model fused: the same logits as the torch path."""
    from molmoe_lite.model.layers import RMSNorm as Norm

    tiny_model = kernel_model
    ids = torch.tensor([[5, 9, 3, 7, 1]], device=DEVICE)
    norms = [m for m in tiny_model.modules() if isinstance(m, Norm)]
    with torch.no_grad():
        try:
            for m in norms:
                m.use_kernels = False
            ref = tiny_model(ids)
            for m in norms:
                m.use_kernels = True
            got = tiny_model(ids)
        finally:
            for m in norms:
                m.use_kernels = None
    assert rel_err(got, ref) <= 1e-5


def test_static_decode_through_the_fused_kernels(kernel_model, monkeypatch):
    """Decode steps with the fused norms, keys and values written to their cache slot by the
    k-norm kernel: the same logits and cache contents as the torch path."""
    import molmoe_lite.kernels.norms as norms_module
    from molmoe_lite.fast_decode import StaticDecoder
    from molmoe_lite.model.layers import RMSNorm as Norm

    tiny_model = kernel_model
    calls = []
    to_cache = norms_module.rms_norm_rope_to_cache
    monkeypatch.setattr(norms_module, "rms_norm_rope_to_cache", lambda *a: calls.append(1) or to_cache(*a))
    ids, extra = torch.tensor([[5, 9, 3, 7, 1]], device=DEVICE), [11, 4, 8]
    norms = [m for m in tiny_model.modules() if isinstance(m, Norm)]

    def decode(fused: bool):
        for m in norms:
            m.use_kernels = fused
        cache = tiny_model.new_cache(1, 12)
        tiny_model(ids, attention_mask=ids != -1, cache=cache, logits_at="last")
        dec = StaticDecoder(tiny_model, cache, ids != -1)
        logits = torch.stack([dec.step(torch.tensor([t], device=DEVICE)).clone()[0] for t in extra])
        return logits, cache.k.clone(), cache.v.clone()

    try:
        with torch.no_grad():
            ref, got = decode(False), decode(True)
    finally:
        for m in norms:
            m.use_kernels = None
    assert len(calls) == len(extra) * tiny_model.config.n_layers
    assert rel_err(got[0], ref[0]) <= 1e-5
    # keys and values of every layer and step (they differ by the roundings upstream)
    assert rel_err(got[1], ref[1]) <= 1e-6 and rel_err(got[2], ref[2]) <= 1e-6


@pytest.mark.parametrize("with_new", [True, False], ids=["two_tables", "one_table"])
def test_embedding_kernel_matches_torch(with_new):
    """Ids from both tables, -1 padding, a batch of rows: the same rows, exactly."""
    from molmoe_lite.model.decoder import Embedding

    emb = Embedding(50, 6 if with_new else 0, 40, torch.float32).to(DEVICE)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in emb.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    ids = torch.tensor([[0, 49, -1, 3], [7, 50, 55, -1]] if with_new else [[0, 49, -1, 3], [7, 1, 2, -1]],
                       device=DEVICE)
    with torch.no_grad():
        emb.use_kernels = False
        ref = emb(ids)
        emb.use_kernels = True
        got = emb(ids)
    assert got.shape == ref.shape and torch.equal(got, ref)
