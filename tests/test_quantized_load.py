"""Quantised models through ``load``: on-the-fly quantisation, converted folders, the dense guard.

Bounds (tiny random model, whole-sequence logits with one image, relative Frobenius error
against the float32 model; measured 2026-11-26 on this CPU: int8 0.0021, int4 0.036):
int8 <= 0.01 with top-1 agreement >= 98%; int4 <= 0.1 with top-1 agreement >= 85%.
"""

import pytest
import torch

from molmoe_lite import load
from molmoe_lite.demo import demo_image
from molmoe_lite.quantized import QuantizedExperts
from molmoe_lite.testing import DenseExpertError, no_dense_experts
from molmoe_lite.testing import tiny_config_dict, write_tiny_release

BOUNDS = {"int8": (0.01, 0.98), "int4": (0.1, 0.85)}


def _compare(model, reference, inputs):
    with torch.no_grad():
        got = model(**inputs)[0].float()
        ref = reference(**inputs)[0].float()
    rel = float((got - ref).norm() / ref.norm())
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    return rel, agree


@pytest.fixture(scope="module")
def inputs(tiny_model):
    return tiny_model.processor.process(images=demo_image(), text="Describe this image.")


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantize_on_the_fly_stays_within_bounds(tiny_release, tiny_model, inputs, scheme):
    model = load(tiny_release, device="cpu", quantize=scheme)
    blocks = model.model.transformer.blocks
    assert all(isinstance(b.mlp.experts, QuantizedExperts) for b in blocks)
    assert not [n for n, _ in model.named_parameters() if ".experts." in n], "float expert weights remain"
    rel, agree = _compare(model, tiny_model, inputs)
    print(f"\n{scheme} experts (on the fly) vs float32: relative error {rel:.4f}, top-1 agreement {agree:.3f}")
    bound, min_agree = BOUNDS[scheme]
    assert rel <= bound and agree >= min_agree, (rel, agree)


def test_unknown_quantize_scheme_is_rejected(tiny_release):
    with pytest.raises(ValueError, match="quantize must be one of"):
        load(tiny_release, device="cpu", quantize="int3")


# a config whose watched expert shapes ([48, 64], [96, 64] and the stacks) no other weight
# shares, so the guard watches exactly the experts
GUARD_CFG = tiny_config_dict(mlp_ratio=1.5, moe_num_experts=6)


@pytest.fixture(scope="module")
def guard_release(tmp_path_factory):
    return write_tiny_release(tmp_path_factory.mktemp("guard"), seed=1, cfg=GUARD_CFG)


def test_guard_catches_a_dense_expert_load(guard_release):
    # the float load creates dense expert tensors: the guard must say so, or it proves nothing
    with pytest.raises(DenseExpertError):
        with no_dense_experts(6, 64, 48):
            load(guard_release, device="cpu")


@pytest.mark.parametrize("bits", [4, 8])
def test_converted_checkpoint_loads_without_dense_experts(guard_release, tmp_path, bits):
    from molmoe_lite.quantize.convert import convert

    dst = tmp_path / f"q{bits}"
    convert(guard_release, dst, bits=bits, group_size=64, dtype=torch.float32, progress=False)
    with no_dense_experts(6, 64, 48):
        model = load(dst, device="cpu")
    # (running it may dequantise one expert at a time on the CPU: outside the guard)
    assert isinstance(model.generate(demo_image(), "Describe this image.", max_new_tokens=3), str)
    reference = load(guard_release, device="cpu")
    inputs = reference.processor.process(images=demo_image(), text="What is this?")
    rel, agree = _compare(model, reference, inputs)
    bound, min_agree = BOUNDS[f"int{bits}"]
    assert rel <= bound and agree >= min_agree, (rel, agree)


def test_converted_checkpoint_with_attention_and_lm_head(guard_release, tmp_path):
    from molmoe_lite.quantize.convert import convert
    from molmoe_lite.quantized import QuantizedLinear

    dst = tmp_path / "q8-all"
    convert(guard_release, dst, bits=8, include=("experts", "attention", "lm_head"), dtype=torch.float32, progress=False)
    model = load(dst, device="cpu")
    assert isinstance(model.lm_head, QuantizedLinear)
    assert isinstance(model.model.transformer.blocks[0].attn.att_proj, QuantizedLinear)
    reference = load(guard_release, device="cpu")
    inputs = reference.processor.process(images=demo_image(), text="What is this?")
    rel, agree = _compare(model, reference, inputs)
    assert rel <= BOUNDS["int8"][0] and agree >= BOUNDS["int8"][1], (rel, agree)
