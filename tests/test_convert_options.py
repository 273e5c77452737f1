"""``convert()``'s rounding method and output dtype reach every tensor it writes.

The tiny release is converted with ``method="rtn"`` and ``dtype="float16"``; each stored
expert stack must be exactly ``quantize_weight(..., method="rtn")`` of the source matrices
(asked for directly), and every unquantised tensor exactly the source cast to float16.
"""

from __future__ import annotations

import json

import pytest
import torch

from molmoe_lite.quantize.checkpoint import open_checkpoint
from molmoe_lite.quantize.convert import convert
from molmoe_lite.quantize.format import quantize_weight, tensors_to_quantized
from molmoe_lite.quantize.layout import expert_key


@pytest.mark.parametrize("method", ["rtn", "refit"])
def test_rtn_and_float16_output(tiny_release, tmp_path, method):
    dst = tmp_path / method
    summary = convert(tiny_release, dst, bits=4, group_size=32, method=method, dtype="float16", progress=False)
    assert summary.method == method and summary.dtype == "float16"
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert q["method"] == method and q["dtype"] == "float16"
    with open_checkpoint(tiny_release) as r:
        src = {k: r.get(k).clone() for k in r.keys()}
    with open_checkpoint(dst) as r:
        out = {k: r.get(k) for k in r.keys()}
    floats = [k for k in src if ".mlp.experts." not in k]
    assert floats and all(out[k].dtype == torch.float16 and torch.equal(out[k], src[k].half()) for k in floats)
    for layer in range(2):
        prefix = f"model.transformer.blocks.{layer}.mlp.experts"
        w13 = tensors_to_quantized(f"{prefix}.w13", out, 4, 32)
        for e in (0, 7):
            gate = src[expert_key(layer, e, "gate_proj")]
            direct = quantize_weight(gate, bits=4, group_size=32, method=method)
            assert torch.equal(w13.qweight[e, : gate.shape[0]], direct.qweight)
            assert torch.equal(w13.scales[e, : gate.shape[0]], direct.scales)
            assert torch.equal(w13.zeros[e, : gate.shape[0]], direct.zeros)
