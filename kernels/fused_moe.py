"""The one MoE entry point of the runtime: routing + expert kernels, or the torch reference.

Names follow the package legend (``molmoe_lite.kernels``).

``fused_moe`` = fused top-k softmax + the expert path chosen by the token count
(``expert_path``, the only place that choice is made):
  * decode (T <= the config's ``decode_max_tokens``): GEMV-style kernels, no sort, no
    padding (moe_gemv.py);
  * prefill: pairs sorted by expert with torch ops, then grouped tensor-core kernels and one
    fp32 reduction over the choices (moe_grouped.py).
No path syncs with the host, so the decode step can be captured in a CUDA graph (launch
configs come from static tables, nothing autotunes).

Whether the kernels run is ``availability.use_kernels``; this API's default runs them
wherever they can (CUDA, or anywhere under ``TRITON_INTERPRET=1``), else the torch reference.
The kernel modules are imported on first use, not here: whether a ``@triton.jit`` function
is compiled or interpreted is fixed when its module is imported.
"""

from __future__ import annotations

from types import ModuleType

import torch

from molmoe_lite.quantize.format import QuantizedWeight

from .availability import interpreter_enabled, kernels_available, use_kernels as _use_kernels
from .checks import MoEInputError, check_devices
from .configs import get_config
from .reference import fused_moe_reference, moe_reference

__all__ = ["expert_path", "fused_moe", "interpreter_enabled", "kernels_available", "moe_experts",
           "quantized_linear", "topk_softmax"]


def _kernels_here(x: torch.Tensor, setting: bool | None) -> bool:
    return _use_kernels(x, setting, on_cpu_by_default=True)


def expert_path(tokens: int, cfg: dict) -> ModuleType:
    """The expert kernels for ``tokens`` rows: moe_gemv (decode) up to the config's
    ``decode_max_tokens``, moe_grouped (prefill) above. Both offer ``moe`` and ``linear``."""
    if tokens <= cfg["decode_max_tokens"]:
        from . import moe_gemv

        return moe_gemv
    from . import moe_grouped

    return moe_grouped


def moe_experts(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                w13: QuantizedWeight, w2: QuantizedWeight, use_kernels: bool | None = None) -> torch.Tensor:
    """Expert part only: hidden [T, H], routing weights/ids [T, TOP_K] -> [T, H] in hidden's dtype.

    ``use_kernels``: None runs the kernels wherever they can run, False the reference, True
    the kernels (an error where they cannot run).
    """
    check_devices(hidden, w13, w2)
    if not _kernels_here(hidden, use_kernels):
        return moe_reference(hidden, weights, ids, w13, w2)
    cfg = get_config(hidden.device)
    return expert_path(hidden.shape[0], cfg).moe(hidden, weights, ids, w13, w2, cfg)


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused routing kernel (routing.topk_softmax), imported on first use like the others."""
    from .routing import topk_softmax as kernel

    return kernel(logits, top_k, renormalize)


def fused_moe(hidden: torch.Tensor, router_logits: torch.Tensor, w13: QuantizedWeight, w2: QuantizedWeight,
              top_k: int, renormalize: bool = False, use_kernels: bool | None = None) -> torch.Tensor:
    """hidden [T, H], router_logits [T, E], w13 [E, 2I, H], w2 [E, H, I] -> [T, H] in hidden's dtype.

    Softmax over all E in fp32, top-k (ties to the lowest id), optional renormalisation, then
    sum over the choices of w * down(silu(x gate^T) * (x up^T)) with int4/int8 weights read directly.
    """
    if router_logits.dim() != 2 or router_logits.shape[0] != hidden.shape[0]:
        raise MoEInputError(
            f"fused_moe: router logits {tuple(router_logits.shape)} must be [T, E] with T = {hidden.shape[0]}")
    if router_logits.shape[1] != w13.shape[0]:
        raise MoEInputError(f"fused_moe: router has {router_logits.shape[1]} experts, weights {w13.shape[0]}")
    if not _kernels_here(hidden, use_kernels):
        check_devices(hidden, w13, w2)
        return fused_moe_reference(hidden, router_logits, w13, w2, top_k, renormalize)
    weights, ids = topk_softmax(router_logits.contiguous(), top_k, renormalize)
    return moe_experts(hidden, weights, ids, w13, w2, use_kernels=True)


def quantized_linear(x: torch.Tensor, qw: QuantizedWeight, use_kernels: bool | None = None) -> torch.Tensor:
    """A plain quantised linear layer through the same kernels: x [T, K], qw [N, K] -> [T, N].

    It is the down kernel with one expert, top-1 and routing weight 1.
    """
    if len(qw.shape) != 2:
        raise MoEInputError(f"quantized_linear: weight must be [N, K], got {tuple(qw.shape)}")
    if x.dim() != 2 or x.shape[1] != qw.shape[1]:
        raise MoEInputError(f"quantized_linear: input {tuple(x.shape)} does not match weight {tuple(qw.shape)}")
    check_devices(x, qw)
    if not _kernels_here(x, use_kernels):
        return (x.float() @ qw.dequantize().to(x.device).t()).to(x.dtype)
    stacked = QuantizedWeight(qw.qweight[None], qw.scales[None], None if qw.zeros is None else qw.zeros[None],
                              qw.bits, qw.group_size, (1, *qw.shape))
    t = x.shape[0]
    weights = torch.ones(t, 1, dtype=torch.float32, device=x.device)
    ids = torch.zeros(t, 1, dtype=torch.int32, device=x.device)
    cfg = get_config(x.device)
    return expert_path(t, cfg).linear(x.contiguous(), weights, ids, stacked, cfg)
