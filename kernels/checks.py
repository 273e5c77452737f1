"""Input checks of the MoE ops, shared by the kernels' launchers and the torch reference.

Names follow the package legend (``molmoe_lite.kernels``). Every check raises MoEInputError
with the op's name and the shapes it got.
"""

from __future__ import annotations

import torch

from molmoe_lite.errors import MolmoeLiteError
from molmoe_lite.quantize.format import QuantizedWeight


class MoEInputError(MolmoeLiteError, ValueError):
    """Inputs of the MoE ops with the wrong shape, dtype or layout."""


def check_moe_inputs(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                     w13: QuantizedWeight, w2: QuantizedWeight) -> tuple[int, int, int, int, int]:
    """Validate shapes; returns (T, H, E, I, TOP_K)."""
    if x.dim() != 2:
        raise MoEInputError(f"moe: hidden states must be [T, H], got shape {tuple(x.shape)}")
    if weights.shape != ids.shape or weights.dim() != 2 or weights.shape[0] != x.shape[0]:
        raise MoEInputError(
            f"moe: routing weights {tuple(weights.shape)} and ids {tuple(ids.shape)} must both be [T, TOP_K] "
            f"with T = {x.shape[0]}")
    if len(w13.shape) != 3 or len(w2.shape) != 3:
        raise MoEInputError(f"moe: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} must be stacked [E, N, K]")
    n_exp, two_i, hid = w13.shape
    t, h = x.shape
    if hid != h or two_i % 2:
        raise MoEInputError(f"moe: w13 must be [E, 2I, H={h}], got {tuple(w13.shape)}")
    inter = two_i // 2
    if tuple(w2.shape) != (n_exp, h, inter):
        raise MoEInputError(f"moe: w2 must be [E={n_exp}, H={h}, I={inter}], got {tuple(w2.shape)}")
    return t, h, n_exp, inter, ids.shape[1]


def check_quantized(qw: QuantizedWeight, name: str) -> None:
    """The kernels read the format's tensors directly: check bits, dtypes and contiguity."""
    if qw.bits not in (4, 8):
        raise MoEInputError(f"{name}: bits must be 4 or 8, got {qw.bits}")
    want = torch.uint8 if qw.bits == 4 else torch.int8
    if qw.qweight.dtype != want:
        raise MoEInputError(f"{name}: int{qw.bits} qweight must be {want}, got {qw.qweight.dtype}")
    if qw.bits == 4 and qw.zeros is None:
        raise MoEInputError(f"{name}: int4 weights need zeros (asymmetric format)")
    k = qw.shape[-1]
    if k % qw.group_size:
        raise MoEInputError(f"{name}: group size {qw.group_size} does not divide K={k}")
    for part in ("qweight", "scales", "zeros"):
        t = getattr(qw, part)
        if t is not None and not t.is_contiguous():
            raise MoEInputError(f"{name}: {part} must be contiguous")


def check_devices(x: torch.Tensor, *qws: QuantizedWeight) -> None:
    """Weights and activations on one device."""
    for qw in qws:
        if qw.qweight.device != x.device:
            raise MoEInputError(f"moe: weights are on {qw.qweight.device}, hidden states on {x.device}")
