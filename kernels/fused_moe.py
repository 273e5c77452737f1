"""The one MoE entry point of the runtime: routing + expert kernels, or the torch reference.

Shapes: T tokens, E experts, K top-k, H hidden, I expert hidden.

``fused_moe`` = fused top-k softmax (1 launch) + the expert path chosen by T:
  * decode (T <= the config's ``decode_max_tokens``): two GEMV-style launches, no sort, no
    padding (moe_gemv.py);
  * prefill: sort pairs by expert with torch ops, then two grouped tensor-core launches and one
    fp32 reduction over K (moe_grouped.py).
No path syncs with the host, so the decode step can be captured in a CUDA graph (launch
configs come from static tables, nothing autotunes).

Kernels run when the tensors are on CUDA and triton imports, or anywhere under Triton's
interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them); otherwise the pure-torch
reference runs. The kernel modules are imported on first use, not here: whether a
``@triton.jit`` function is compiled or interpreted is fixed when its module is imported.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from molmoe_lite.quantize.format import QuantizedWeight

from .configs import get_config
from .reference import MoEInputError, fused_moe_reference, moe_reference

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernels_available(device: torch.device) -> bool:
    """Whether fused_moe runs the Triton kernels (True) or the torch reference (False) on ``device``."""
    if not _HAS_TRITON:
        return False
    if interpreter_enabled():
        return True
    return device.type == "cuda" and torch.cuda.is_available()


def _check_devices(x: torch.Tensor, *qws: QuantizedWeight) -> None:
    for qw in qws:
        if qw.qweight.device != x.device:
            raise MoEInputError(f"moe: weights are on {qw.qweight.device}, hidden states on {x.device}")


def moe_experts(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                w13: QuantizedWeight, w2: QuantizedWeight, use_kernels: bool | None = None) -> torch.Tensor:
    """Expert part only: hidden [T, H], routing weights/ids [T, K] -> [T, H] in hidden's dtype.

    ``use_kernels`` None picks by device (see kernels_available); False forces the reference.
    """
    _check_devices(hidden, w13, w2)
    if use_kernels is None:
        use_kernels = kernels_available(hidden.device)
    if not use_kernels:
        return moe_reference(hidden, weights, ids, w13, w2)
    cfg = get_config(hidden.device)
    if hidden.shape[0] <= cfg["decode_max_tokens"]:
        from .moe_gemv import moe_gemv

        return moe_gemv(hidden, weights, ids, w13, w2, cfg)
    from .moe_grouped import moe_grouped

    return moe_grouped(hidden, weights, ids, w13, w2, cfg)


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused routing kernel (routing.topk_softmax), imported on first use like the others."""
    from .routing import topk_softmax as kernel

    return kernel(logits, top_k, renormalize)


def fused_moe(hidden: torch.Tensor, router_logits: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight,
              top_k: int, renormalize: bool = False, use_kernels: bool | None = None) -> torch.Tensor:
    """hidden [T, H], router_logits [T, E], w13 [E, 2I, H], w2 [E, H, I] -> [T, H] in hidden's dtype.

    Softmax over all E in fp32, top-k (ties to the lowest id), optional renormalisation, then
    sum_k w_k * down(silu(x gate^T) * (x up^T)) with int4/int8 weights read directly.
    """
    if use_kernels is None:
        use_kernels = kernels_available(hidden.device)
    if router_logits.dim() != 2 or router_logits.shape[0] != hidden.shape[0]:
        raise MoEInputError(
            f"fused_moe: router logits {tuple(router_logits.shape)} must be [T, E] with T = {hidden.shape[0]}")
    if router_logits.shape[1] != w13.shape[0]:
        raise MoEInputError(f"fused_moe: router has {router_logits.shape[1]} experts, weights {w13.shape[0]}")
    if not use_kernels:
        _check_devices(hidden, w13, w2)
        return fused_moe_reference(hidden, router_logits, w13, w2, top_k, renormalize)
    weights, ids = topk_softmax(router_logits.contiguous(), top_k, renormalize)
    return moe_experts(hidden, weights, ids, w13, w2, use_kernels=True)


def quantized_linear(x: torch.Tensor, qw: QuantizedWeight, use_kernels: bool | None = None) -> torch.Tensor:
    """A plain quantised linear layer through the same kernels: x [T, K_in], qw [N, K_in] -> [T, N].

    It is the down kernel with one expert, top-1 and routing weight 1.
    """
    if len(qw.shape) != 2:
        raise MoEInputError(f"quantized_linear: weight must be [N, K], got {tuple(qw.shape)}")
    if x.dim() != 2 or x.shape[1] != qw.shape[1]:
        raise MoEInputError(f"quantized_linear: input {tuple(x.shape)} does not match weight {tuple(qw.shape)}")
    _check_devices(x, qw)
    if use_kernels is None:
        use_kernels = kernels_available(x.device)
    if not use_kernels:
        return (x.float() @ qw.dequantize().to(x.device).t()).to(x.dtype)
    stacked = QuantizedWeight(qw.qweight[None], qw.scales[None], None if qw.zeros is None else qw.zeros[None],
                              qw.bits, qw.group_size, (1, *qw.shape))
    t = x.shape[0]
    weights = torch.ones(t, 1, dtype=torch.float32, device=x.device)
    ids = torch.zeros(t, 1, dtype=torch.int32, device=x.device)
    x = x.contiguous()
    cfg = get_config(x.device)
    if t <= cfg["decode_max_tokens"]:
        from .moe_gemv import down_gemv

        return down_gemv(x, weights, ids, stacked, x.dtype, cfg["down_decode"])
    from .moe_grouped import down_grouped
    from .routing import group_by_expert

    grouping = group_by_expert(ids, 1, cfg["down_grouped"]["BLOCK_M"])
    return down_grouped(x, weights, grouping, stacked, x.dtype, cfg["down_grouped"])
