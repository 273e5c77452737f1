"""Fused top-k softmax kernel and the prefill grouping by expert, against kernels/reference.route.

Runs under Triton's interpreter on CPU (TRITON_INTERPRET=1, set below before triton is
imported), compiled on CUDA. Weights: relative error <= 1e-5 (fp32 softmax both sides).
Ids: equal to the reference wherever neighbouring probabilities are not near-tied
(gap > 1e-6), and exactly equal (lowest id wins) for exact ties.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from molmoe_lite.kernels.fused_moe import kernels_available  # noqa: E402
from molmoe_lite.kernels.checks import MoEInputError  # noqa: E402
from molmoe_lite.kernels.reference import route  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(not kernels_available(DEVICE), reason="triton unavailable")

ROUTE_CASES = {
    # name: (T, E, K)
    "T1_molmoe": (1, 64, 8),  # MolmoE's router: 64 experts, top-8
    "odd_E": (5, 6, 2),  # E not a power of two: padded lanes must never win
    "top1": (9, 8, 1),
    "topE": (3, 4, 4),  # K = E: a full sort
    "many_tokens": (33, 16, 4),
}


def near_tied(probs: torch.Tensor, k: int, eps: float = 1e-6) -> torch.Tensor:
    """[T] True where any of the first k+1 sorted probabilities are within eps of a neighbour."""
    s = probs.sort(dim=-1, descending=True).values[:, : k + 1]
    return ((s[:, :-1] - s[:, 1:]) < eps).any(dim=-1)


@pytest.mark.parametrize("renormalize", [False, True], ids=["plain", "renorm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ROUTE_CASES.values(), ids=ROUTE_CASES.keys())
def test_topk_softmax_matches_reference(shape, dtype, renormalize):
    from molmoe_lite.kernels.routing import topk_softmax

    t, e, k = shape
    gen = torch.Generator().manual_seed(t * 100 + e)
    logits = (2 * torch.randn(t, e, generator=gen)).to(DEVICE, dtype)
    ref_w, ref_ids = route(logits, k, renormalize)
    # poisoned outputs: every element must be written
    w = torch.full((t, k), float("nan"), device=DEVICE)
    ids = torch.full((t, k), -1, dtype=torch.int32, device=DEVICE)
    topk_softmax(logits, k, renormalize, out=(w, ids))
    assert not w.isnan().any() and (ids >= 0).all() and (ids < e).all()
    ok = ~near_tied(torch.softmax(logits.float(), -1), k)
    assert ok.any()
    assert torch.equal(ids[ok].long(), ref_ids[ok]), "ids differ from the reference on untied tokens"
    err = float((w - ref_w).norm() / ref_w.norm())
    assert err <= 1e-5, f"routing weights: relative error {err:.2e}"
    if renormalize:
        torch.testing.assert_close(w.sum(-1), torch.ones(t, device=DEVICE), rtol=0, atol=1e-5)


def test_exact_ties_go_to_lowest_id():
    from molmoe_lite.kernels.routing import topk_softmax

    # hand-made: experts 1 and 2 tie for first, 0 and 3 tie for third
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.0]], device=DEVICE)
    _, ids = topk_softmax(logits, 3)
    assert ids.tolist() == [[1, 2, 0]]
    _, ref_ids = route(logits, 3)
    assert ref_ids.tolist() == [[1, 2, 0]]
    # many ties: integer logits in a small range, 64 experts, top-8
    gen = torch.Generator().manual_seed(7)
    logits = torch.randint(0, 4, (17, 64), generator=gen).float().to(DEVICE)
    _, ids = topk_softmax(logits, 8)
    _, ref_ids = route(logits, 8)
    assert torch.equal(ids.long(), ref_ids)


def test_topk_softmax_bad_inputs():
    from molmoe_lite.kernels.routing import topk_softmax

    logits = torch.zeros(2, 4, device=DEVICE)
    with pytest.raises(MoEInputError, match="top_k=0"):
        topk_softmax(logits, 0)
    with pytest.raises(MoEInputError, match=r"\[T, E\]"):
        topk_softmax(logits[0], 1)


GROUP_CASES = {
    # name: (T, E, K, block_m, routing)
    "random": (20, 8, 2, 16, "random"),
    "pairs_lt_block": (3, 8, 2, 16, "random"),
    "one_expert": (40, 8, 1, 16, "one"),  # 40 pairs, one expert: 3 blocks
    "some_empty": (12, 8, 2, 4, "some_empty"),
    "topE": (5, 4, 4, 4, "random"),
}


@pytest.mark.parametrize("case", GROUP_CASES.values(), ids=GROUP_CASES.keys())
def test_group_by_expert_invariants(case):
    from molmoe_lite.kernels.routing import group_by_expert

    t, e, k, bm, mode = case
    gen = torch.Generator().manual_seed(t + e)
    logits = torch.randn(t, e, generator=gen)
    if mode == "one":
        logits[:, 5] += 30
    elif mode == "some_empty":
        logits[:, [0, 7]] += 30
    _, ids = route(logits, k)
    g = group_by_expert(ids.to(DEVICE, torch.int32), e, bm)
    flat = ids.reshape(-1)
    pairs = g.sorted_pairs.cpu().long()
    # a stable permutation of the pairs, sorted by expert
    assert sorted(pairs.tolist()) == list(range(t * k))
    assert torch.equal(flat[pairs], flat.sort(stable=True).values)
    for ex in range(e):
        mine = pairs[g.offsets[ex] : g.offsets[ex + 1]]
        assert torch.equal(mine, mine.sort().values), "pairs of one expert must keep token order"
    assert torch.equal(g.counts.cpu().long(), torch.bincount(flat, minlength=e))
    # blocks: one expert each, cover every sorted row exactly once, unused blocks marked E
    covered = torch.zeros(t * k, dtype=torch.int64)
    used = 0
    for be, r0, r1 in zip(g.block_expert.tolist(), g.block_row0.tolist(), g.block_row_end.tolist()):
        if be == e:
            continue
        used += 1
        assert g.offsets[be] <= r0 < r1 == g.offsets[be + 1]
        covered[r0 : min(r0 + bm, r1)] += 1
    assert (covered == 1).all()
    expected_blocks = int(((g.counts.cpu() + bm - 1) // bm).sum())
    assert used == expected_blocks <= g.max_blocks
    assert (g.block_expert.cpu()[used:] == e).all(), "used blocks come first"


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_non_finite_logits_still_give_in_range_ids(bad):
    """A NaN (or overflowed) router row must not send the expert kernels past the weights."""
    from molmoe_lite.kernels.routing import topk_softmax

    logits = torch.randn(3, 8, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    logits[1] = float(bad)
    w, ids = topk_softmax(logits, 2)
    assert (ids >= 0).all() and (ids < 8).all()
    good_w, good_ids = topk_softmax(logits[[0, 2]], 2)
    assert torch.equal(ids[[0, 2]], good_ids) and torch.equal(w[[0, 2]], good_w)  # other rows untouched
