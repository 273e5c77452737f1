"""``patch()``'s options and every refusal, on small stand-in modules written out here.

Stand-ins: ``FusedExperts`` holds transformers-style 3-D ``gate_up_proj`` / ``down_proj`` in
any of the stored layouts (rows [gate; up] or interleaved, transposed or not) and computes the
SwiGLU experts from its own separately kept gate/up/down matrices, so a layout decoded wrongly
by ``patch`` shows as a wrong output; ``LoopBlock`` is a router plus a plain list of experts
looped over in Python (the release's block kind). Bounds: int8 per channel keeps one MoE
output within 2e-2 relative (measured ~7e-3 in float32); in bfloat16/float16 the bound is 3e-2.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import molmoe_lite
from molmoe_lite.patching import HFQuantizedExperts, PatchError
from molmoe_lite.quantize.format import dequantize, quantize_weight

E, H, I, K, T = 8, 64, 32, 2, 12


def _weights(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(E, I, H, generator=g) / H**0.5
    up = torch.randn(E, I, H, generator=g) / H**0.5
    down = torch.randn(E, H, I, generator=g) / I**0.5
    return gate, up, down


def swiglu_moe(h, ids, weights, gate, up, down, act=F.silu):
    """The experts' output written out token by token: sum_k w_k * down_e(act(gate_e h) * up_e h)."""
    out = torch.zeros(h.shape, dtype=torch.float32)
    hf = h.float()
    for t in range(h.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            y = act(gate[e].float() @ hf[t]) * (up[e].float() @ hf[t])
            out[t] += float(weights[t, k]) * (down[e].float() @ y)
    return out


class FusedExperts(nn.Module):
    """transformers-style fused experts in a chosen stored layout; called (h, ids, weights)."""

    def __init__(self, transposed=False, concatenated=True, act=F.silu, seed=0):
        super().__init__()
        gate, up, down = _weights(seed)
        self.ref = (gate, up, down)  # plain tensors: the math, independent of the stored layout
        gu = torch.cat([gate, up], dim=1) if concatenated else torch.stack([gate, up], dim=2).reshape(E, 2 * I, H)
        dp = down
        if transposed:
            gu, dp = gu.transpose(1, 2), dp.transpose(1, 2)
        self.gate_up_proj = nn.Parameter(gu.contiguous())
        self.down_proj = nn.Parameter(dp.contiguous())
        self.is_transposed, self.is_concatenated, self.act_fn = transposed, concatenated, act

    def forward(self, h, ids, weights):
        return swiglu_moe(h, ids, weights, *self.ref, act=self.act_fn).to(h.dtype)


class Holder(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts


class Expert(nn.Module):
    def __init__(self, e: int, gate, up, down, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(H, I, bias=bias)
        self.up_proj = nn.Linear(H, I, bias=bias)
        self.down_proj = nn.Linear(I, H, bias=bias)
        with torch.no_grad():
            self.gate_proj.weight.copy_(gate[e])
            self.up_proj.weight.copy_(up[e])
            self.down_proj.weight.copy_(down[e])

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LoopBlock(nn.Module):
    """Router + expert list, looped over in Python; returns hidden states (plus ``extra``)."""

    def __init__(self, n_router=E, top_k=K, bias=False, extra=0.0):
        super().__init__()
        gate, up, down = _weights(1)
        self.gate = nn.Linear(H, n_router, bias=False)
        with torch.no_grad():  # seeded router: no near-ties that bf16 logits could flip
            self.gate.weight.copy_(torch.randn(n_router, H, generator=torch.Generator().manual_seed(2)) / H**0.5)
        self.experts = nn.ModuleList(Expert(e, gate, up, down, bias) for e in range(E))
        if top_k is not None:
            self.top_k = top_k
        self.extra = extra

    def forward(self, x):
        flat = x.reshape(-1, H)
        w, ids = torch.softmax(self.gate(flat).float(), -1).topk(self.top_k, dim=-1)
        out = torch.zeros_like(flat)
        for t in range(flat.shape[0]):
            for k in range(self.top_k):
                out[t] += w[t, k].to(flat.dtype) * self.experts[int(ids[t, k])](flat[t])
        return (out + self.extra).reshape(x.shape)


def probe(dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, H, generator=g).to(dtype)
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :K]
    weights = torch.rand(T, K, generator=g).to(dtype)
    return h, ids, weights


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("transposed", [False, True], ids=["stacked", "transposed"])
@pytest.mark.parametrize("concatenated", [True, False], ids=["gate-then-up", "interleaved"])
def test_fused_layouts_are_decoded(transposed, concatenated):
    model = Holder(FusedExperts(transposed, concatenated))
    h, ids, w = probe()
    ref = swiglu_moe(h, ids, w, *model.experts.ref)
    assert molmoe_lite.patch(model, bits=8) == ["experts"]
    assert isinstance(model.experts, HFQuantizedExperts)
    with torch.no_grad():
        assert rel(model.experts(h, ids, w), ref) <= 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_models(dtype):
    model = Holder(FusedExperts()).to(dtype)
    h, ids, w = probe(dtype)
    ref = swiglu_moe(h, ids, w, *model.experts.ref)
    molmoe_lite.patch(model, bits=8)
    with torch.no_grad():
        out = model.experts(h, ids, w)
    assert out.dtype == dtype
    assert rel(out, ref) <= 3e-2
    # and a half-precision list block (the release's kind)
    block = Holder(LoopBlock()).to(dtype)
    x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(4)).to(dtype)
    with torch.no_grad():
        ref = block.experts(x)
        molmoe_lite.patch(block, bits=8)
        out = block.experts(x)
    assert out.dtype == dtype and rel(out, ref) <= 3e-2


def test_method_and_group_size_reach_the_quantised_weights():
    gate, up, _ = _weights(0)
    rounded = {}
    for method in ("rtn", "refit"):
        model = Holder(FusedExperts())
        molmoe_lite.patch(model, bits=4, group_size=32, method=method)
        w13 = model.experts.w13
        assert w13.bits == 4 and w13.group_size == 32 and w13.scales.shape == (E, 2 * I, H // 32)
        # the same rounding quantize_weight does to expert 0's gate rows, asked for directly
        direct = quantize_weight(gate[0], bits=4, group_size=32, method=method)
        assert torch.equal(w13.qweight[0, :I], direct.qweight)
        assert torch.equal(w13.scales[0, :I], direct.scales)
        rounded[method] = w13.qweight.clone()
        # up rows follow the gate rows
        assert torch.equal(w13.qweight[0, I:], quantize_weight(up[0], bits=4, group_size=32, method=method).qweight)
    assert not torch.equal(rounded["rtn"], rounded["refit"])
    # default group size for int4 is 64
    model = Holder(FusedExperts())
    molmoe_lite.patch(model, bits=4)
    assert model.experts.w13.group_size == 64


def test_verify_false_skips_the_probe():
    # a block that adds something the quantised block does not reproduce: refused when verified
    with pytest.raises(PatchError, match="does something this patch does not reproduce"):
        molmoe_lite.patch(Holder(LoopBlock(extra=1.0)), bits=8)
    model = Holder(LoopBlock(extra=1.0))
    assert molmoe_lite.patch(model, bits=8, verify=False) == ["experts"]
    # unverified, it is replaced all the same (and gives the MoE without the extra)
    x = torch.randn(1, T, H, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = Holder(LoopBlock(extra=0.0)).experts(x)
        out = model.experts(x)
    out = out[0] if isinstance(out, tuple) else out
    assert rel(out, plain) <= 2e-2


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Holder(_with(FusedExperts(), has_bias=True)), "experts with biases are not supported"),
        (lambda: Holder(FusedExperts(act=F.gelu)), "only SiLU"),
        (lambda: Holder(_with(FusedExperts(), has_post_expert_norm=True)), "post-expert norm"),
        (lambda: Holder(_with(FusedExperts(), has_gate=False)), "without a gate projection"),
        (lambda: _on_meta(Holder(FusedExperts())), "meta device"),
        (lambda: Holder(LoopBlock(n_router=4)), "router gives 4 experts, the block holds 8"),
        (lambda: Holder(LoopBlock(top_k=None)), "no top_k / num_experts_per_tok"),
        (lambda: Holder(LoopBlock(bias=True)), "has a bias"),
        (lambda: _on_meta(Holder(LoopBlock())), "meta device"),
    ],
    ids=["fused-bias", "non-silu", "post-norm", "no-gate", "fused-meta", "router-mismatch", "no-top-k",
         "list-bias", "list-meta"],
)
def test_every_refusal_names_its_reason(make, message):
    with pytest.raises(PatchError, match=message):
        molmoe_lite.patch(make(), bits=4)


def _with(module: nn.Module, **attrs) -> nn.Module:
    for k, v in attrs.items():
        setattr(module, k, v)
    return module


def _on_meta(module: nn.Module) -> nn.Module:
    return module.to_empty(device="meta")


def test_dequantised_weights_are_the_stored_experts():
    # int8 per channel: each dequantised expert matrix is within half a step of the float one
    model = Holder(FusedExperts(transposed=True, concatenated=False))
    gate, up, down = model.experts.ref
    molmoe_lite.patch(model, bits=8)
    w13 = dequantize(model.experts.w13.weight())
    w2 = dequantize(model.experts.w2.weight())
    assert rel(w13[:, :I], gate) <= 1e-2 and rel(w13[:, I:], up) <= 1e-2 and rel(w2, down) <= 1e-2
