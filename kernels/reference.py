"""Pure-torch fp32 reference of the MoE math: the oracle for the kernels and the CPU path.

Names follow the package legend (``molmoe_lite.kernels``).

Routing: softmax over all E router logits in fp32, then the TOP_K largest probabilities, ties
broken by the lowest expert id (a stable descending sort gives exactly that; ``torch.topk``
does not promise it). MolmoE does not renormalise the TOP_K weights; ``renormalize=True`` does.

Experts: for every (token, choice) pair, ``w * down(silu(x gate^T) * (x up^T))``, summed over
the token's choices, on dequantised weights in fp32. ``w13`` stacks gate rows 0..I-1 and up rows I..2I-1 per expert
([E, 2I, H]); ``w2`` is down_proj ([E, H, I]). Only experts that received tokens are
dequantised, one at a time, so the CPU path never holds a dequantised copy of a whole layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from molmoe_lite.quantize.format import QuantizedWeight, dequantize

from .checks import MoEInputError, check_moe_inputs


def route(logits: torch.Tensor, top_k: int, renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights fp32 [T, TOP_K], ids int64 [T, TOP_K]), best first."""
    if logits.dim() != 2:
        raise MoEInputError(f"route: router logits must be [T, E], got shape {tuple(logits.shape)}")
    n_experts = logits.shape[1]
    if not 1 <= top_k <= n_experts:
        raise MoEInputError(f"route: top_k={top_k} must be in [1, {n_experts}] (number of experts)")
    probs = torch.softmax(logits.float(), dim=-1)  # [T, E]
    # stable descending sort: equal probabilities keep ascending expert order -> lowest id wins
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights = sorted_probs[:, :top_k].contiguous()
    ids = order[:, :top_k].contiguous()
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def moe_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                  w13: QuantizedWeight, w2: QuantizedWeight) -> torch.Tensor:
    """x [T, H], weights/ids [T, TOP_K], w13 [E, 2I, H], w2 [E, H, I] -> [T, H] in x's dtype (fp32 math)."""
    t, h, n_exp, inter, top_k = check_moe_inputs(x, weights, ids, w13, w2)
    xf = x.float()
    out = torch.zeros(t, h, dtype=torch.float32, device=x.device)
    flat_ids = ids.reshape(-1)  # [T*TOP_K], pair p = t * TOP_K + choice
    flat_w = weights.reshape(-1).float()
    # host loop over the experts that got tokens (CPU path: a sync here is fine)
    for e in torch.unique(flat_ids).tolist():
        if not 0 <= e < n_exp:
            raise MoEInputError(f"moe: expert id {e} out of range [0, {n_exp})")
        pairs = (flat_ids == e).nonzero(as_tuple=True)[0]  # [P]
        tok = pairs // top_k
        w13_e = dequantize(w13.index(e)).float().to(x.device)  # [2I, H]
        w2_e = dequantize(w2.index(e)).float().to(x.device)  # [H, I]
        gu = xf[tok] @ w13_e.t()  # [P, 2I]
        act = F.silu(gu[:, :inter]) * gu[:, inter:]  # [P, I]
        y = (act @ w2_e.t()) * flat_w[pairs, None]  # [P, H]
        out.index_add_(0, tok, y)
    return out.to(x.dtype)


def fused_moe_reference(x: torch.Tensor, router_logits: torch.Tensor, w13: QuantizedWeight,
                        w2: QuantizedWeight, top_k: int, renormalize: bool = False) -> torch.Tensor:
    """route + moe_reference: the CPU path of ``fused_moe``."""
    weights, ids = route(router_logits, top_k, renormalize)
    return moe_reference(x, weights, ids, w13, w2)
