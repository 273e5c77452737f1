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


def test_cli_threads_option_reaches_load(tiny_release, tmp_path, capsys):
    # --threads is one of compare's options: a bad value must be refused, not silently ignored
    from molmoe_lite.cli import main
    from molmoe_lite.demo import demo_image

    image = tmp_path / "scene.png"
    demo_image().save(image)
    code = main(["compare", str(tiny_release), str(tiny_release), "--image", str(image), "--threads", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "threads must be a positive whole number, got 0" in err
