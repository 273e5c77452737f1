"""``molmoe_lite.patch``: quantising the experts of loaded models in place, three block kinds.

Models: a tiny random transformers ``OlmoeForCausalLM`` (fused 3-D experts), our tiny MolmoE
(``DenseExperts``), and a stand-in of the release's remote-code block (router + plain expert
list + Python loop, returning (hidden, router_logits)). Everything runs on the CPU through the
torch reference, except the tests that force the Triton kernels (under TRITON_INTERPRET=1, or
on the GPU where there is one).

Bounds, relative Frobenius error of all logits vs the float model (measured on these seeds):
HF int8 0.0032 / int4 0.054 (top-1 agreement 1.0 / 0.97); MolmoE int8 0.0034 / int4 0.051
(1.0 / 0.94). Stated with ~3x margin: int8 <= 1e-2 with top-1 agreement >= 95%, int4 <= 0.15
with >= 85%. The release-block stand-in is compared on the MoE output itself (no residual
or lm_head to dilute it): measured int8 0.0067 / int4 0.097, bounds 2e-2 / 0.2.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import molmoe_lite
from molmoe_lite.patching import (
    EXPERTS_IMPLEMENTATION,
    HFQuantizedExperts,
    PatchError,
    QuantizedMoEBlock,
    register_experts_implementation,
)
from molmoe_lite.quantized import QuantizedExperts

BOUNDS = {8: (1e-2, 0.95), 4: (0.15, 0.85)}  # bits -> (max relative logit error, min top-1 agreement)
BLOCK_BOUNDS = {8: 2e-2, 4: 0.2}  # bits -> max relative error of one MoE block's output
BITS = pytest.mark.parametrize("bits", [8, 4], ids=["int8", "int4"])
# where the tests that force the Triton kernels run: the CPU under the interpreter, else the GPU
KERNEL_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def top1(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).float().mean())


def check_close(out: torch.Tensor, ref: torch.Tensor, bits: int) -> None:
    max_rel, min_agree = BOUNDS[bits]
    err, agree = rel_err(out, ref), top1(out, ref)
    assert err <= max_rel, f"int{bits}: relative logit error {err:.4f} > {max_rel}"
    assert agree >= min_agree, f"int{bits}: top-1 agreement {agree:.3f} < {min_agree}"


# ---------------------------------------------------------------------------------------
# transformers' OlmoeForCausalLM (kind b)
# ---------------------------------------------------------------------------------------
HF_LAYERS = 2


def tiny_olmoe(seed: int = 0):
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(seed)
    cfg = OlmoeConfig(
        hidden_size=64, num_hidden_layers=HF_LAYERS, num_attention_heads=4, num_key_value_heads=4,
        num_experts=8, num_experts_per_tok=2, intermediate_size=32, vocab_size=256, norm_topk_prob=False,
        # ~1/sqrt(fan_in), so the tiny model's logits are neither flat nor saturated (std ~1)
        initializer_range=0.125, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return OlmoeForCausalLM(cfg).eval()


def hf_ids(seq: int = 16) -> torch.Tensor:
    return torch.randint(3, 256, (2, seq), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def hf_float_logits():
    with torch.no_grad():
        return tiny_olmoe()(hf_ids()).logits


def fused_expert_params(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.ndim == 3 or n.endswith(("gate_up_proj", "down_proj"))]


@BITS
def test_hf_olmoe_patch(bits, hf_float_logits):
    m = tiny_olmoe()
    old = weakref.ref(m.model.layers[0].mlp.experts.gate_up_proj)
    names = molmoe_lite.patch(m, bits=bits)
    assert names == [f"model.layers.{i}.mlp.experts" for i in range(HF_LAYERS)]
    for i in range(HF_LAYERS):
        mlp = m.model.layers[i].mlp
        assert isinstance(mlp.experts, HFQuantizedExperts)
        assert mlp.experts.w13.bits == bits and mlp.experts.w13.shape == (8, 64, 64)
        assert type(mlp.gate).__name__ == "OlmoeTopKRouter"  # the router is kept
    # no dense expert tensor left, and the old one is really freed
    assert fused_expert_params(m) == []
    assert not any("gate_up_proj" in k for k in m.state_dict())
    gc.collect()
    assert old() is None, "the float gate_up_proj is still referenced after patch()"

    with torch.no_grad():
        out = m(hf_ids()).logits
    check_close(out, hf_float_logits, bits)

    prompt = hf_ids(4)[:1]
    gen = m.generate(prompt, max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9) and torch.equal(gen[:, :4], prompt)
    assert int(gen.min()) >= 0 and int(gen.max()) < 256


def test_hf_gate_up_rows_are_gate_then_up():
    """One expert of the patched stack equals silu(x gate^T) * (x up^T) with HF's [gate; up] split."""
    m = tiny_olmoe()
    ex = m.model.layers[0].mlp.experts
    gu, dp = ex.gate_up_proj.detach().clone(), ex.down_proj.detach().clone()
    molmoe_lite.patch(m, bits=8)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2))
    ids = torch.full((5, 1), 3, dtype=torch.long)
    w = torch.ones(5, 1)
    gate, up = gu[3].chunk(2, dim=0)
    want = (F.silu(x @ gate.t()) * (x @ up.t())) @ dp[3].t()
    swapped = (F.silu(x @ up.t()) * (x @ gate.t())) @ dp[3].t()
    got = m.model.layers[0].mlp.experts(x, ids, w)  # HF's argument order: index, then weights
    # int8 g64 rounding of three matrices: ~1% (measured 0.010); the other row order: O(1)
    assert rel_err(got, want) <= 3e-2
    assert rel_err(got, swapped) >= 0.3


# ---------------------------------------------------------------------------------------
# transformers' experts registry
# ---------------------------------------------------------------------------------------
def test_set_experts_implementation_matches_patch():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert register_experts_implementation() == EXPERTS_IMPLEMENTATION
    assert register_experts_implementation() == EXPERTS_IMPLEMENTATION  # idempotent
    assert EXPERTS_IMPLEMENTATION in ALL_EXPERTS_FUNCTIONS
    lazy = tiny_olmoe()
    lazy.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    with torch.no_grad():
        out = lazy(hf_ids()).logits
        cache = lazy.model.layers[0].mlp.experts.__dict__["_molmoe_lite_cache"]
        again = lazy(hf_ids()).logits
    assert lazy.model.layers[0].mlp.experts.__dict__["_molmoe_lite_cache"] is cache  # quantised once
    assert torch.equal(out, again)
    assert fused_expert_params(lazy), "the registry path keeps the float weights (other implementations need them)"

    patched = tiny_olmoe()
    molmoe_lite.patch(patched, bits=4)
    with torch.no_grad():
        ref = patched(hf_ids()).logits
    # same rounding of the same weights (int4 g64 by default) -> same logits up to summation order
    assert rel_err(out, ref) <= 1e-5


def test_registration_is_an_explicit_call():
    """Importing the package (or patching) registers nothing; the exported call does, once."""
    import subprocess
    import sys

    code = (
        "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS as R\n"
        "import molmoe_lite, molmoe_lite.patching\n"
        "before = 'molmoe_lite' in R\n"
        "name = molmoe_lite.register_experts_implementation()\n"
        "print(before, name, name in R)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "molmoe_lite", "True"]


def test_from_pretrained_selects_the_registered_implementation(tmp_path):
    register_experts_implementation()
    src = tiny_olmoe()
    src.save_pretrained(tmp_path)
    model = type(src).from_pretrained(tmp_path, experts_implementation=EXPERTS_IMPLEMENTATION)
    with torch.no_grad():
        model(hf_ids())
    assert "_molmoe_lite_cache" in model.model.layers[0].mlp.experts.__dict__


# ---------------------------------------------------------------------------------------
# Our MolmoE (kind a)
# ---------------------------------------------------------------------------------------
def molmoe_ids() -> torch.Tensor:
    return torch.randint(0, 480, (2, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def molmoe_float_logits(tiny_release):
    m = molmoe_lite.load(tiny_release, device="cpu", dtype="float32")
    with torch.no_grad():
        return m(molmoe_ids())


@pytest.mark.parametrize(
    "bits, group_size, quantize", [(8, None, "int8"), (4, 64, "int4")], ids=["int8-per-channel", "int4-g64"]
)
def test_molmoe_patch(bits, group_size, quantize, tiny_release, molmoe_float_logits):
    m = molmoe_lite.load(tiny_release, device="cpu", dtype="float32")
    n_layers = m.config.n_layers
    names = molmoe_lite.patch(m, bits=bits, group_size=group_size)
    assert names == [f"model.transformer.blocks.{i}.mlp.experts" for i in range(n_layers)]
    assert all(isinstance(b.mlp.experts, QuantizedExperts) for b in m.model.transformer.blocks)
    assert not any(".experts." in n and n.endswith("_proj.weight") for n, _ in m.named_parameters())
    with torch.no_grad():
        out = m(molmoe_ids())
    check_close(out, molmoe_float_logits, bits)

    # the same codes as quantising while loading (same rounding, same keys)
    loaded = molmoe_lite.load(tiny_release, device="cpu", dtype="float32", quantize=quantize)
    want = {k: v for k, v in loaded.state_dict().items() if ".experts." in k}
    got = {k: v for k, v in m.state_dict().items() if ".experts." in k}
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


# ---------------------------------------------------------------------------------------
# The release's remote-code block (kind c), as a stand-in
# ---------------------------------------------------------------------------------------
class StandInRMSNorm(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(d))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.weight


class StandInMLP(nn.Module):
    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class MolmoeSparseMoeBlock(nn.Module):
    """Like the release's block: ff_norm inside, fp32 softmax over all experts, top-k, a Python
    loop over every expert, ``(hidden, router_logits)`` out."""

    def __init__(self, d=64, hidden=32, n_experts=8, top_k=2, returns_logits=True, norm_topk_prob=None,
                 shared=False):
        super().__init__()
        self.num_experts, self.top_k = n_experts, top_k
        self.returns_logits = returns_logits
        if norm_topk_prob is not None:  # the release's block has no such attribute
            self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(d, n_experts, bias=False)
        self.experts = nn.ModuleList(StandInMLP(d, hidden) for _ in range(n_experts))
        self.ff_norm = StandInRMSNorm(d)
        self.shared = StandInMLP(d, hidden) if shared else None  # something patch() does not reproduce

    def forward(self, hidden_states):
        hidden_states = self.ff_norm(hidden_states)
        b, s, d = hidden_states.shape
        h = hidden_states.view(-1, d)
        router_logits = self.gate(h)
        weights = F.softmax(router_logits, dim=1, dtype=torch.float)
        weights, selected = torch.topk(weights, self.top_k, dim=-1)
        if getattr(self, "norm_topk_prob", False):
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(h.dtype)
        out = torch.zeros_like(h)
        mask = F.one_hot(selected, num_classes=self.num_experts).permute(2, 1, 0)
        for e in range(self.num_experts):
            slot, tok = torch.where(mask[e])
            out.index_add_(0, tok, self.experts[e](h[tok]) * weights[tok, slot, None])
        if self.shared is not None:
            out = out + self.shared(h)
        out = out.view(b, s, d)
        return (out, router_logits) if self.returns_logits else out


class StandInDecoder(nn.Module):
    def __init__(self, n_layers=2, **kw):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"mlp": MolmoeSparseMoeBlock(**kw)}) for _ in range(n_layers))

    def forward(self, x):
        logits = []
        for layer in self.layers:
            y = layer["mlp"](x)
            if isinstance(y, tuple):
                y, lg = y
                logits.append(lg)
            x = x + y
        return x, logits


STAND_INS = {
    "release-tuple": {},
    "tensor-only": {"returns_logits": False},
    "renormalised": {"norm_topk_prob": True},
}


@BITS
@pytest.mark.parametrize("variant", list(STAND_INS), ids=list(STAND_INS))
def test_release_block_patch(variant, bits):
    torch.manual_seed(0)
    m = StandInDecoder(**STAND_INS[variant]).eval()
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, ref_logits = m(x)
    names = molmoe_lite.patch(m, bits=bits)
    assert names == ["layers.0.mlp", "layers.1.mlp"]
    blk = m.layers[0]["mlp"]
    assert isinstance(blk, QuantizedMoEBlock) and isinstance(blk.experts, QuantizedExperts)
    assert blk.norm_topk_prob == (variant == "renormalised")
    assert not any(".experts." in n for n, _ in m.named_parameters())
    assert sorted(k for k in blk.state_dict() if not k.startswith("experts.")) == ["ff_norm.weight", "gate.weight"]
    with torch.no_grad():
        out, logits = m(x)
    # residual stream x + MoE(x): compare the MoE part, which is what quantisation touches
    err = rel_err(out - x, ref - x)
    assert err <= BLOCK_BOUNDS[bits], f"{variant} int{bits}: relative error {err:.4f}"
    assert len(logits) == len(ref_logits) == (2 if STAND_INS[variant].get("returns_logits", True) else 0)
    if logits:  # the tuple structure is kept; the float router is untouched (same input in layer 0)
        assert torch.equal(logits[0], ref_logits[0])


def test_release_block_with_unreproduced_step_is_refused():
    """A block whose forward adds something (here a shared expert) fails the probe check."""
    torch.manual_seed(0)
    m = StandInDecoder(shared=True).eval()
    with pytest.raises(PatchError, match="layers.0.mlp.*does something this patch does not reproduce"):
        molmoe_lite.patch(m, bits=8)


# ---------------------------------------------------------------------------------------
# Kind (a) outside our package: any expert list that is called as a unit
# ---------------------------------------------------------------------------------------
class UnitExperts(nn.ModuleList):
    """An expert list with its own forward (h, weights, ids), as our DenseExperts."""

    def forward(self, h, weights, ids):
        out = torch.zeros_like(h)
        for e in range(len(self)):
            tok, slot = torch.where(ids == e)
            out.index_add_(0, tok, self[e](h[tok]) * weights[tok, slot, None])
        return out


class SwappedUnitExperts(UnitExperts):
    """Same, but its forward takes (h, ids, weights): must not be wired as (h, weights, ids)."""

    def forward(self, h, ids, weights):
        return super().forward(h, weights, ids)


class UnitBlock(nn.Module):
    def __init__(self, experts_cls):
        super().__init__()
        self.gate = nn.Linear(64, 8, bias=False)
        self.experts = experts_cls(StandInMLP(64, 32) for _ in range(8))

    def forward(self, x):
        weights, ids = torch.topk(torch.softmax(self.gate(x).float(), -1), 2, dim=-1)
        return self.experts(x, weights.to(x.dtype), ids)


def test_foreign_unit_experts_patched_and_checked():
    torch.manual_seed(0)
    m = nn.Sequential(UnitBlock(UnitExperts))
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(x)
    assert molmoe_lite.patch(m, bits=8) == ["0.experts"]  # only the experts, the block stays
    assert isinstance(m[0], UnitBlock) and isinstance(m[0].experts, QuantizedExperts)
    with torch.no_grad():
        assert rel_err(m(x), ref) <= BLOCK_BOUNDS[8]

    torch.manual_seed(0)
    bad = nn.Sequential(UnitBlock(SwappedUnitExperts))
    with pytest.raises(PatchError, match=r"0\.experts: .*SwappedUnitExperts"):
        molmoe_lite.patch(bad, bits=8)
    assert isinstance(bad[0].experts, SwappedUnitExperts)  # nothing replaced


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model, match",
    [
        (nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), "Sequential: no MoE block found"),
        (nn.Module(), "Module: no MoE block found"),
    ],
    ids=["sequential", "empty"],
)
def test_unrecognised_model(model, match):
    with pytest.raises(ValueError, match=match):
        molmoe_lite.patch(model)


def test_package_export_is_callable():
    """``import molmoe_lite.patch`` binds the package attribute to the module; it still calls patch()."""
    import importlib

    importlib.import_module("molmoe_lite.patching")
    with pytest.raises(PatchError, match="Sequential: no MoE block found"):
        molmoe_lite.patch(nn.Sequential(nn.Linear(2, 2)))


def test_patch_twice_and_bad_bits():
    m = tiny_olmoe()
    with pytest.raises(PatchError, match="bits must be 4 or 8"):
        molmoe_lite.patch(m, bits=3)
    molmoe_lite.patch(m, bits=4)
    with pytest.raises(PatchError, match="already quantised"):
        molmoe_lite.patch(m, bits=4)


# ---------------------------------------------------------------------------------------
# The Triton kernels (interpreted on the CPU) inside a patched model
# ---------------------------------------------------------------------------------------
def _set_kernels(modules, setting):
    for mod in modules:
        mod.use_kernels = setting


def test_patched_hf_model_through_kernels():
    """use_kernels=True vs the torch reference on the same patched model: decode (T=3, GEMV path)
    and prefill (T=12, grouped path). fp32: relative error <= 1e-3 (measured ~2e-7). On a GPU
    machine the model runs there (compiled kernels take no CPU tensors)."""
    m = tiny_olmoe()
    molmoe_lite.patch(m, bits=4)
    m.to(KERNEL_DEVICE)
    experts = [mod for mod in m.modules() if isinstance(mod, QuantizedExperts)]
    try:
        for seq in (3, 12):
            ids = hf_ids(seq)[:1].to(KERNEL_DEVICE)
            with torch.no_grad():
                _set_kernels(experts, False)
                ref = m(ids).logits
                _set_kernels(experts, True)
                out = m(ids).logits
            assert rel_err(out, ref) <= 1e-3, f"T={seq}: kernels differ from the reference by {rel_err(out, ref):.2e}"
    finally:
        _set_kernels(experts, None)


@pytest.mark.parametrize("variant", ["molmoe", "release-renormalised"])
def test_quantised_blocks_route_with_the_fused_kernel(variant, tiny_release, monkeypatch):
    """With the kernels on, a quantised MoE block routes through the one-launch top-k softmax
    kernel (fp32 weights, int32 ids) and gives the reference's output: decode (T=3) and prefill
    (T=12), fp32, relative error <= 1e-3."""
    import molmoe_lite.quantized as quantized

    calls = []

    def counting(logits, top_k, renormalize=False):
        calls.append(tuple(logits.shape))
        return fused_topk(logits, top_k, renormalize)

    fused_topk = quantized.topk_softmax
    monkeypatch.setattr(quantized, "topk_softmax", counting)
    if variant == "molmoe":
        m = molmoe_lite.load(tiny_release, device=KERNEL_DEVICE, dtype="float32", quantize="int4")
        inputs = [molmoe_ids()[:, :3], molmoe_ids()[:, :12]]
        run = lambda x: m(x)  # noqa: E731
    else:
        torch.manual_seed(0)
        m = StandInDecoder(norm_topk_prob=True).eval()
        molmoe_lite.patch(m, bits=4)
        m.to(KERNEL_DEVICE)
        inputs = [torch.randn(1, t, 64, generator=torch.Generator().manual_seed(t)) for t in (3, 12)]
        run = lambda x: m(x)[0]  # noqa: E731
    experts = [mod for mod in m.modules() if isinstance(mod, QuantizedExperts)]
    for x in inputs:
        x = x.to(KERNEL_DEVICE)
        try:
            with torch.no_grad():
                _set_kernels(experts, False)
                ref = run(x)
                assert not calls  # the reference path routes in torch
                _set_kernels(experts, True)
                out = run(x)
        finally:
            _set_kernels(experts, None)
        assert len(calls) == len(experts), "every quantised block should route through the kernel"
        calls.clear()
        assert rel_err(out, ref) <= 1e-3, f"T={x.shape[1]}: {rel_err(out, ref):.2e}"
