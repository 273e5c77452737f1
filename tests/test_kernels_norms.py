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


# slot of each row in a cache of MAX_LEN slots, and each row's rotary position (padding puts a
# row's position below its slot)
MAX_LEN = 8
SLOTS = {
    "rows_at_different_slots": ([0, 5, 2], [0, 3, 2]),
    "first_and_last_slot": ([MAX_LEN - 1, 0], [MAX_LEN - 1, 0]),
    "rows_sharing_a_slot": ([4, 4, 4], [4, 1, 3]),
    "one_row_at_the_last_slot": ([MAX_LEN - 1], [5]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("slots,positions", SLOTS.values(), ids=SLOTS.keys())
def test_rope_to_cache_writes_each_row_at_its_own_slot(slots, positions, dtype):
    """One decode step's keys (normed, rotated at the row's own position) and values into a
    NaN-poisoned cache by the fused kernel, against the torch path (norm, RoPE, index writes):
    each row's slot holds its keys and values, every other slot stays untouched."""
    from molmoe_lite.model.decoder import KVCache

    B, H, D = len(slots), 2, 16
    g = torch.Generator().manual_seed(7)
    k = torch.randn(B, 1, H * D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, 1, H * D, generator=g).to(DEVICE, dtype)
    cos, sin = rope_cos_sin(torch.tensor(positions, device=DEVICE)[:, None], D, 10000.0)  # [B, 1, D]
    slot_ids = torch.tensor(slots, device=DEVICE)
    norm = make_norm(H * D, torch.float32, seed=8)
    caches = {}
    for fused in (False, True):
        cache = KVCache(n_layers=1, batch=B, n_heads=H, max_len=MAX_LEN, head_dim=D, dtype=dtype, device=DEVICE)
        cache.k.fill_(float("nan"))
        cache.v.fill_(float("nan"))
        norm.use_kernels = fused
        with torch.no_grad():
            if fused:
                assert norm.rope_to_cache(k, v, cos, sin, cache.k[0], cache.v[0], slot_ids)
            else:
                assert not norm.rope_to_cache(k, v, cos, sin, cache.k[0], cache.v[0], slot_ids)
                keys = norm.rope(k, cos, sin, H, dtype)  # [B, H, 1, D]
                cache.write(0, keys, v.view(B, 1, H, D).transpose(1, 2), slot_ids)
        caches[fused] = cache
    ref, got = caches[False], caches[True]
    written = torch.zeros(B, MAX_LEN, dtype=torch.bool, device=DEVICE)
    written[torch.arange(B, device=DEVICE), slot_ids] = True
    for name in ("k", "v"):
        touched = ~getattr(got, name)[0].isnan().permute(0, 2, 1, 3).all(-1).all(-1)  # [B, MAX_LEN]
        assert torch.equal(touched, written), f"{name}: slots written other than each row's own"
    for b, slot in enumerate(slots):
        assert rel_err(got.k[0, b, :, slot], ref.k[0, b, :, slot]) <= TOL[dtype], f"row {b} keys"
        assert torch.equal(got.v[0, b, :, slot], ref.v[0, b, :, slot]), f"row {b} values"


def test_rope_to_cache_wants_one_slot_per_row():
    """A single slot for a batch of rows is refused (the kernel reads one slot per row)."""
    from molmoe_lite.kernels.norms import rms_norm_rope_to_cache

    B, H, D = 2, 1, 16
    k = v = torch.zeros(B, 1, H * D, device=DEVICE)
    cos = sin = torch.zeros(B, 1, D, device=DEVICE)
    cache = torch.zeros(B, H, 4, D, device=DEVICE)
    with pytest.raises(ValueError, match="one slot per row"):
        rms_norm_rope_to_cache(k, v, torch.ones(H * D, device=DEVICE), 1e-5, cos, sin, cache, cache.clone(),
                               torch.zeros(1, dtype=torch.long, device=DEVICE))


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


def test_batched_decode_step_with_rows_at_different_slots_through_the_fused_kernels(kernel_model, monkeypatch):
    """The engine's decode step (``DecodeStep``) over rows prefilled to different lengths, one with
    a padded key (its position below its slot): with the fused norms, each layer's keys and values
    are written by the one fused launch at each row's own slot, and the logits and cache equal the
    torch path's."""
    import molmoe_lite.kernels.norms as norms_module
    from molmoe_lite.fast_decode import DecodeStep
    from molmoe_lite.model.layers import RMSNorm as Norm

    tiny_model = kernel_model
    calls = []
    to_cache = norms_module.rms_norm_rope_to_cache
    monkeypatch.setattr(norms_module, "rms_norm_rope_to_cache", lambda *a: calls.append(1) or to_cache(*a))
    prompts = [[5, 9, 3, 7, 1], [4, 2], [8, 6, 12, 3]]
    steps = [[11, 4, 8], [7, 13, 2]]
    norms = [m for m in tiny_model.modules() if isinstance(m, Norm)]

    def decode(fused: bool):
        for m in norms:
            m.use_kernels = fused
        cache = tiny_model.new_cache(len(prompts), 12)
        for b, p in enumerate(prompts):
            ids = torch.tensor([p], device=DEVICE)
            tiny_model(ids, attention_mask=ids != -1, cache=cache.rows(b, b + 1), logits_at="last")
        step = DecodeStep(tiny_model, cache, use_graph=False)
        lengths = torch.tensor([len(p) for p in prompts], device=DEVICE)
        for b, n in enumerate(lengths.tolist()):
            step.key_mask[b, :n] = True
        step.key_mask[2, 0] = False  # a padded key: row 2's positions run one below its slots
        logits = []
        for tokens in steps:
            step.set_tokens(len(prompts), torch.tensor(tokens, device=DEVICE))
            step.slots.copy_(lengths)
            logits.append(step.run(len(prompts), int(lengths.max()) + 1).clone())
            lengths += 1
        return torch.stack(logits), cache.k.clone(), cache.v.clone()

    try:
        with torch.no_grad():
            ref = decode(False)
            assert not calls
            got = decode(True)
    finally:
        for m in norms:
            m.use_kernels = None
    assert len(calls) == len(steps) * tiny_model.config.n_layers
    assert not got[0].isnan().any() and rel_err(got[0], ref[0]) <= 1e-5
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
