"""``patch(model)``: quantise the float experts of a loaded MoE model in place and route them
through our kernels; and ``register_experts_implementation()``, which adds ``"molmoe_lite"``
to transformers' experts-implementation registry.

MoE blocks are recognised by structure (never by class name), three kinds:

  (a) our ``Transformer`` (and any block alike): ``experts`` is a ModuleList of
      gate_proj/up_proj/down_proj experts whose class defines its own ``forward``, i.e. the
      block calls the experts as one unit, ``experts(h, weights, ids)`` (our ``DenseExperts``).
      Only ``experts`` is replaced, by ``QuantizedExperts``.
  (b) transformers' ``OlmoeForCausalLM`` (5.x): ``experts`` holds fused 3-D parameters
      ``gate_up_proj`` [E, 2I, H] (rows [gate; up]) and ``down_proj`` [E, H, I], called as
      ``experts(hidden_states, top_k_index, top_k_weights)``. Replaced by ``HFQuantizedExperts``,
      a ``QuantizedExperts`` taking HF's argument order; the router stays.
  (c) the release's remote-code block (and transformers 4.x's OLMoE block): a ``gate`` router
      Linear and a *plain* ModuleList of gate_proj/up_proj/down_proj experts that the block's
      own forward loops over in Python. A plain ``nn.ModuleList`` has no forward, so the
      block must index it itself: swapping ``experts`` alone would keep the loop. The whole
      block is replaced by ``QuantizedMoEBlock`` (ff_norm if the block has one -> router
      softmax in fp32 over all experts -> top-k -> renormalise only if the block says
      ``norm_topk_prob`` -> weights in the hidden dtype -> ``QuantizedExperts``), returning
      what the original returned (the release returns ``(hidden, router_logits)``).

Structure says what a module holds, not what its forward does, so before each swap the
original and its replacement run on the same random probe input (8 tokens); a difference
beyond quantisation error (a skipped norm, another argument order, a shared expert) is an
error, not a silently wrong model.

Quantisation goes one expert at a time into preallocated stacks (never a dense copy of
more than one expert); each layer's float experts are released when its module is
swapped, so peak memory is the float model plus one layer's codes.

``register_experts_implementation()`` adds ``"molmoe_lite"`` to transformers' experts
registry (an explicit call; importing this module registers nothing). Selected with
``model.set_experts_implementation("molmoe_lite")`` or
``from_pretrained(..., experts_implementation="molmoe_lite")``, it quantises an HF experts
module's 3-D weights lazily on its first call (int4, group 64 unless the module's
``molmoe_lite_bits`` / ``molmoe_lite_group_size`` / ``molmoe_lite_method`` say otherwise),
caches the codes on the module and runs ``moe_experts``. The module keeps its float
weights: transformers owns them and switching back to another implementation needs them,
so this way saves time, not memory. ``patch`` replaces the modules and saves both.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from molmoe_lite.kernels.availability import use_kernels
from molmoe_lite.kernels.fused_moe import moe_experts
from molmoe_lite.model.decoder import DenseExperts
from molmoe_lite.quantize.format import QuantFormatError, QuantizedWeight
from molmoe_lite.quantize.format import quantize_expert_stack as _quantize_expert_stack
from molmoe_lite.quantized import QuantizedExperts
from molmoe_lite.errors import MolmoeLiteError

EXPERTS_IMPLEMENTATION = "molmoe_lite"
LAZY_DEFAULTS = {"bits": 4, "group_size": 64, "method": "refit"}
# Probe check: relative error allowed between a replacement and the float module on random
# input. Quantisation alone gives ~1% (int8) / ~10% (int4) on one block; a step the
# replacement does not reproduce (a missing norm, another routing, swapped arguments) gives O(1).
PROBE_TOLERANCE = {8: 0.08, 4: 0.35}
_EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")


class PatchError(MolmoeLiteError, ValueError):
    """A model ``patch`` cannot handle: no MoE block, an unsupported layout, or weights it cannot read."""


# ---------------------------------------------------------------------------------------
# Quantising expert stacks
# ---------------------------------------------------------------------------------------
def quantize_expert_stack(n_experts, get_expert, bits=4, group_size=None, method="refit", name="experts"):
    """``format.quantize_expert_stack`` with its errors as PatchError."""
    try:
        return _quantize_expert_stack(n_experts, get_expert, bits, group_size, method, name)
    except QuantFormatError as exc:
        raise PatchError(str(exc)) from exc


# ---------------------------------------------------------------------------------------
# Recognising blocks
# ---------------------------------------------------------------------------------------
def _is_linear_expert(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in _EXPERT_LINEARS)


def _is_expert_list(experts) -> bool:
    return isinstance(experts, nn.ModuleList) and len(experts) > 0 and all(map(_is_linear_expert, experts))


def _calls_experts_as_unit(experts: nn.ModuleList) -> bool:
    """True when the experts list is itself callable (defines ``forward``), like DenseExperts.

    ``nn.ModuleList`` (and ``nn.Module``) have no usable forward, so a block holding a plain
    list must loop over the experts itself; a subclass that defines forward exists to be
    called as one unit with (h, weights, ids).
    """
    return isinstance(experts, DenseExperts) or type(experts).forward is not nn.Module.forward


def _fused_layout(experts: nn.Module) -> tuple[int, int, int] | None:
    """(E, H, I) of an experts module with 3-D ``gate_up_proj`` / ``down_proj``, else None."""
    gu, dp = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(dp, torch.Tensor) and gu.ndim == 3 and dp.ndim == 3):
        return None
    if getattr(experts, "is_transposed", False):  # [E, H, 2I], [E, I, H]
        e, h, two_i = gu.shape
        want_dp = (e, two_i // 2, h)
    else:  # [E, 2I, H], [E, H, I]
        e, two_i, h = gu.shape
        want_dp = (e, h, two_i // 2)
    if two_i % 2 or tuple(dp.shape) != want_dp:
        raise PatchError(
            f"{type(experts).__name__}: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(dp.shape)} "
            f"do not form an [E, 2I, H] / [E, H, I] expert stack"
        )
    return e, h, two_i // 2


def _check_silu(act, where: str) -> None:
    """Our kernels compute silu(gate) * up: refuse any other activation."""
    if act is None:
        return
    x = torch.linspace(-4, 4, 17)
    try:
        ok = torch.allclose(act(x), F.silu(x), atol=1e-5)
    except Exception:  # an activation that cannot run on a CPU float tensor
        ok = False
    if not ok:
        raise PatchError(f"{where}: experts use activation {act!r}; only SiLU (SwiGLU experts) is supported")


def _check_fused_supported(experts: nn.Module) -> None:
    where = type(experts).__name__
    if getattr(experts, "has_bias", False) or getattr(experts, "gate_up_proj_bias", None) is not None:
        raise PatchError(f"{where}: experts with biases are not supported")
    if not getattr(experts, "has_gate", True):
        raise PatchError(f"{where}: experts without a gate projection are not supported")
    if getattr(experts, "has_post_expert_norm", False):
        raise PatchError(f"{where}: experts with a post-expert norm are not supported")
    if getattr(experts, "_is_expert_parallel", False):
        raise PatchError(f"{where}: expert-parallel experts are not supported")
    _check_silu(getattr(experts, "act_fn", None), where)


def _fused_getter(experts: nn.Module):
    """get_expert(e) -> (gate [I, H], up [I, H], down [H, I]) views of one expert of a fused stack."""
    gu, dp = experts.gate_up_proj.detach(), experts.down_proj.detach()
    transposed = getattr(experts, "is_transposed", False)
    concatenated = getattr(experts, "is_concatenated", True)

    def get(e: int):
        gu_e, dp_e = gu[e], dp[e]
        if transposed:
            gu_e, dp_e = gu_e.t(), dp_e.t()
        if concatenated:  # rows [gate; up]: HF chunks the projection's output in two, gate first
            gate, up = gu_e.chunk(2, dim=0)
        else:  # rows interleaved gate0, up0, gate1, up1, ...
            gate, up = gu_e[0::2], gu_e[1::2]
        # one expert's copy at most (only when the stored layout is transposed/interleaved)
        return gate.contiguous(), up.contiguous(), dp_e.contiguous()

    return get


def _list_getter(experts: nn.ModuleList):
    def get(e: int):
        ex = experts[e]
        for n in _EXPERT_LINEARS:
            if getattr(ex, n).bias is not None:
                raise PatchError(f"experts.{e}.{n} has a bias; biased experts are not supported")
        return ex.gate_proj.weight.detach(), ex.up_proj.weight.detach(), ex.down_proj.weight.detach()

    return get


def _check_materialised(module: nn.Module, name: str) -> None:
    for p in module.parameters():
        if p.is_meta:
            raise PatchError(f"{name or 'model'}: weights are on the meta device; load them before patch()")


# ---------------------------------------------------------------------------------------
# Replacement modules
# ---------------------------------------------------------------------------------------
class HFQuantizedExperts(QuantizedExperts):
    """Quantised experts called in transformers' order: ``(hidden_states [T, H], top_k_index [T, K],
    top_k_weights [T, K]) -> [T, H]``."""

    def __init__(self, n_experts: int, d: int, hidden: int, bits: int, group_size: int | None, device=None):
        super().__init__(n_experts, d, hidden, bits, group_size, device)
        self.num_experts = n_experts  # HF code reads these off experts modules
        self.hidden_dim, self.intermediate_dim = d, hidden

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        return super().forward(hidden_states, top_k_weights, top_k_index)


class QuantizedMoEBlock(nn.Module):
    """A whole MoE block (kind c) with quantised experts.

    forward(x [..., H]) -> [..., H], or (that, router_logits [T, E]) when the original
    block returned a pair. Children keep the original names (``ff_norm``, ``gate``,
    ``experts``), so state-dict keys follow the release's / our converter's layout.
    """

    def __init__(self, gate: nn.Module, experts: QuantizedExperts, top_k: int, norm_topk_prob: bool,
                 ff_norm: nn.Module | None, returns_router_logits: bool):
        super().__init__()
        self.ff_norm = ff_norm  # the release's block normalises its input itself
        self.gate = gate
        self.experts = experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.returns_router_logits = returns_router_logits

    def forward(self, hidden_states: torch.Tensor):
        x = self.ff_norm(hidden_states) if self.ff_norm is not None else hidden_states
        shape = x.shape
        h = x.reshape(-1, shape[-1])  # [T, H]
        router_logits = self.gate(h)  # [T, E]
        # fp32 softmax over all experts, top-k, optional renormalisation: one kernel on a GPU
        weights, ids = self.experts.route(router_logits, self.top_k, self.norm_topk_prob)
        out = self.experts(h, weights, ids).view(shape)
        return (out, router_logits) if self.returns_router_logits else out


def _top_k_of(block: nn.Module, name: str) -> int:
    for attr in ("top_k", "num_experts_per_tok", "moe_top_k"):
        k = getattr(block, attr, None)
        if isinstance(k, int) and k > 0:
            return k
    cfg = getattr(block, "config", None)
    for attr in ("num_experts_per_tok", "moe_top_k"):
        k = getattr(cfg, attr, None)
        if isinstance(k, int) and k > 0:
            return k
    raise PatchError(f"{name}: MoE block {type(block).__name__} has no top_k / num_experts_per_tok attribute")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def _check_probe(name: str, what: str, got: torch.Tensor, ref: torch.Tensor, bits: int) -> None:
    err = _rel(got, ref)
    if not err <= PROBE_TOLERANCE[bits]:
        raise PatchError(
            f"{name}: the quantised replacement of {what} differs from it by {err:.3f} (relative) on a "
            f"probe input, more than int{bits} rounding explains ({PROBE_TOLERANCE[bits]}); its forward "
            f"does something this patch does not reproduce"
        )


def _probe_hidden(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """Deterministic random hidden states, off-centre and not unit-scale (so a skipped norm shows)."""
    gen = torch.Generator().manual_seed(0)
    return (2.0 * torch.randn(*shape, generator=gen) + 0.5).to(like.device, like.dtype)


@torch.no_grad()
def _verify_experts(name: str, old: nn.Module, new: nn.Module, n_experts: int, d: int, like: torch.Tensor,
                    bits: int, hf_order: bool) -> None:
    """Call the float and the quantised experts alike on 8 probe tokens routed to random experts."""
    h = _probe_hidden((8, d), like)
    gen = torch.Generator().manual_seed(1)
    k = min(2, n_experts)
    ids = torch.rand(8, n_experts, generator=gen).argsort(dim=-1)[:, :k].to(like.device)  # distinct per token
    weights = torch.rand(8, k, generator=gen).add_(0.1).to(like.device, like.dtype)
    args = (h, ids, weights) if hf_order else (h, weights, ids)
    try:
        ref = old(*args)
    except Exception as e:  # e.g. a list whose forward takes another argument order
        raise PatchError(
            f"{name}: calling {type(old).__name__} as experts{'(h, ids, weights)' if hf_order else '(h, weights, ids)'}"
            f" failed ({type(e).__name__}: {e}); its forward is not the expected experts interface"
        ) from None
    _check_probe(name, type(old).__name__, new(*args), ref, bits)


@torch.no_grad()
def _patched_block(block: nn.Module, name: str, bits: int, group_size, method: str, verify: bool) -> nn.Module:
    """Quantised replacement of a kind-(c) block, checked on a probe input against the original."""
    gate, experts = block.gate, block.experts
    if gate.out_features != len(experts):
        raise PatchError(f"{name}: router gives {gate.out_features} experts, the block holds {len(experts)}")
    _check_silu(getattr(experts[0], "act_fn", None), f"{name}.experts")
    top_k = _top_k_of(block, name)
    ff_norm = getattr(block, "ff_norm", None)

    # Probe: what the original returns (always needed), and its output to compare with.
    probe = _probe_hidden((1, 8, gate.in_features), gate.weight)
    ref = block(probe)
    returns_logits = isinstance(ref, tuple)
    if returns_logits and len(ref) != 2:
        raise PatchError(f"{name}: {type(block).__name__}.forward returns {len(ref)} values; expected 1 or 2")
    ref_out = ref[0] if returns_logits else ref
    if not isinstance(ref_out, torch.Tensor) or ref_out.shape != probe.shape:
        raise PatchError(f"{name}: {type(block).__name__}.forward does not return hidden states shaped like its input")

    w13, w2 = quantize_expert_stack(len(experts), _list_getter(experts), bits, group_size, method, f"{name}.experts")
    new = QuantizedMoEBlock(gate, QuantizedExperts.from_weights(w13, w2), top_k,
                            bool(getattr(block, "norm_topk_prob", False)), ff_norm, returns_logits)
    new.train(block.training)
    if verify:
        got = new(probe)
        _check_probe(name, type(block).__name__, got[0] if returns_logits else got, ref_out, bits)
    return new


# ---------------------------------------------------------------------------------------
# patch()
# ---------------------------------------------------------------------------------------
def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def patch(model: nn.Module, bits: int = 4, group_size: int | None = None, method: str = "refit",
          verify: bool = True) -> list[str]:
    """Quantise every MoE block's float experts in place; returns the names of the replaced modules.

    ``group_size`` None (default) takes the format's default, the same as
    ``load(quantize=...)`` and the converter: 64 for int4, per output channel for int8. ``verify`` calls every replaced module and its replacement on the same probe
    input and refuses a difference beyond rounding (``PROBE_TOLERANCE``): a block or experts
    list whose forward does something else than assumed is an error, not a wrong model.
    Raises PatchError (a ValueError) when no MoE block is found; an error in one block leaves
    the blocks before it patched.
    """
    if bits not in (4, 8):
        raise PatchError(f"bits must be 4 or 8, got {bits!r}")
    replaced: list[str] = []
    done: list[str] = []  # prefixes already handled: their submodules are not visited again
    already_quantised = False
    for name, mod in list(model.named_modules()):
        if any(name == p or name.startswith(p + ".") for p in done):
            continue
        if isinstance(mod, QuantizedExperts):
            already_quantised = True
            continue
        experts = mod._modules.get("experts")
        if experts is None:
            continue
        exp_name = f"{name}.experts" if name else "experts"
        if _is_expert_list(experts) and _calls_experts_as_unit(experts):  # (a)
            _check_materialised(experts, exp_name)
            w13, w2 = quantize_expert_stack(len(experts), _list_getter(experts), bits, group_size, method, exp_name)
            new = QuantizedExperts.from_weights(w13, w2)
            if verify:
                like = experts[0].gate_proj.weight
                _verify_experts(exp_name, experts, new, len(experts), like.shape[1], like, bits, hf_order=False)
            _set_child(model, exp_name, new)
            replaced.append(exp_name)
            done.append(name)
        elif _fused_layout(experts) is not None:  # (b)
            _check_fused_supported(experts)
            _check_materialised(experts, exp_name)
            n_exp, d, _ = _fused_layout(experts)
            w13, w2 = quantize_expert_stack(n_exp, _fused_getter(experts), bits, group_size, method, exp_name)
            new = HFQuantizedExperts.from_weights(w13, w2)
            if verify:
                _verify_experts(exp_name, experts, new, n_exp, d, experts.gate_up_proj, bits, hf_order=True)
            _set_child(model, exp_name, new)
            replaced.append(exp_name)
            done.append(name)
        elif _is_expert_list(experts) and isinstance(getattr(mod, "gate", None), nn.Linear):  # (c)
            if not name:
                raise PatchError(
                    f"{type(mod).__name__} is itself an MoE block that must be replaced whole; "
                    f"pass the model that contains it"
                )
            _check_materialised(mod, name)
            _set_child(model, name, _patched_block(mod, name, bits, group_size, method, verify))
            replaced.append(name)
            done.append(name)
    if not replaced:
        if already_quantised:
            raise PatchError(f"{type(model).__name__}: its experts are already quantised")
        raise PatchError(
            f"{type(model).__name__}: no MoE block found. patch() recognises blocks whose `experts` is "
            f"a list of gate_proj/up_proj/down_proj experts (with a `gate` router Linear when the "
            f"block loops over them itself) or holds 3-D gate_up_proj/down_proj parameters"
        )
    return replaced


# ---------------------------------------------------------------------------------------
# transformers' experts-implementation registry
# ---------------------------------------------------------------------------------------
def _lazy_weights(experts: nn.Module) -> tuple[QuantizedWeight, QuantizedWeight]:
    """The module's quantised stacks, made on first use and cached on the module.

    The cache is a plain attribute (not a buffer: no state-dict keys) keyed by the settings
    and the float weights' device, storage and version, so moving or editing the float
    weights re-quantises.
    """
    cfg = tuple(getattr(experts, f"molmoe_lite_{k}", v) for k, v in LAZY_DEFAULTS.items())
    gu, dp = experts.gate_up_proj, experts.down_proj
    key = cfg + (gu.device, gu.data_ptr(), gu._version, dp.data_ptr(), dp._version)
    cached = experts.__dict__.get("_molmoe_lite_cache")
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    if _fused_layout(experts) is None:
        raise PatchError(f"{type(experts).__name__}: needs 3-D gate_up_proj / down_proj parameters")
    _check_fused_supported(experts)
    bits, group_size, method = cfg
    with torch.no_grad():
        w13, w2 = quantize_expert_stack(gu.shape[0], _fused_getter(experts), bits, group_size, method,
                                        type(experts).__name__)
    experts.__dict__["_molmoe_lite_cache"] = (key, w13, w2)
    return w13, w2


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts function: hidden_states [T, H], top_k_index/weights [T, K] -> [T, H].

    Triton kernels run on CUDA (or when the module's ``molmoe_lite_use_kernels`` is True), the
    CPU kernels on the CPU, the torch reference when it is False.
    """
    w13, w2 = _lazy_weights(self)
    setting = getattr(self, "molmoe_lite_use_kernels", None)
    if setting is None and hidden_states.device.type == "cpu":
        # the CPU kernels, as QuantizedExperts runs them; their packed copy is cached beside
        cached = self.__dict__.get("_molmoe_lite_cpu")
        if cached is None or cached[0] is not w13:
            from molmoe_lite.kernels.cpu_experts import CpuWeight

            cached = (w13, CpuWeight(w13), CpuWeight(w2))
            self.__dict__["_molmoe_lite_cpu"] = cached
        from molmoe_lite.kernels.cpu_experts import moe_experts_cpu

        return moe_experts_cpu(hidden_states, top_k_weights, top_k_index, cached[1], cached[2])
    use = use_kernels(hidden_states, setting)
    return moe_experts(hidden_states, top_k_weights, top_k_index, w13, w2, use_kernels=use)


def register_experts_implementation() -> str:
    """Add ``experts_forward`` to transformers' experts registry as ``"molmoe_lite"`` and return that name.

    Idempotent. Afterwards ``model.set_experts_implementation("molmoe_lite")`` (or
    ``from_pretrained(..., experts_implementation="molmoe_lite")``) runs an HF MoE model's
    experts through our kernels, quantising them on first use; the float weights stay in
    memory (use ``patch`` to drop them). Raises PatchError when the installed transformers
    has no experts registry (it arrived in 5.x).
    """
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError as exc:
        raise PatchError(
            "this transformers has no experts-implementation registry (transformers 5 added it); "
            "use molmoe_lite.patch(model) instead"
        ) from exc
    try:
        current = ALL_EXPERTS_FUNCTIONS.get(EXPERTS_IMPLEMENTATION)
    except Exception:  # a registry whose get() raises for unknown names
        current = None
    if current is not experts_forward:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)
    return EXPERTS_IMPLEMENTATION
