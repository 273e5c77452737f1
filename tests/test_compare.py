"""The float-vs-quantised comparison used by ``molmoe-lite compare``."""

import math

import pytest
import torch

from molmoe_lite.compare import compare_logits


def test_identical_logits_agree_fully():
    x = torch.randn(5, 11, generator=torch.Generator().manual_seed(0))
    r = compare_logits(x, x.clone())
    assert r["top1_agreement"] == 1.0 and r["rel_error"] == 0.0
    assert r["kl_max"] == pytest.approx(0.0, abs=1e-6)


def test_kl_matches_a_hand_computed_value():
    ref = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    cand = torch.tensor([[math.log(3.0), 0.0]])  # q = (3/4, 1/4)
    expected = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    r = compare_logits(ref, cand)
    assert r["kl_per_position"][0] == pytest.approx(expected, abs=1e-6)
    assert r["top1_agreement"] == 1.0  # argmax ties resolve to index 0 in both


def test_disagreeing_positions_are_counted():
    ref = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    cand = torch.tensor([[0.0, 2.0], [0.0, 2.0], [2.0, 0.0], [2.0, 0.0]])
    assert compare_logits(ref, cand)["top1_agreement"] == 0.75


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes differ"):
        compare_logits(torch.zeros(2, 3), torch.zeros(3, 3))
