"""Helpers every expert kernel's launcher shares: output buffers, format tensors as kernel
arguments, the GPU's SM count.

Names follow the package legend (``molmoe_lite.kernels``).
"""

from __future__ import annotations

import functools

import torch

from molmoe_lite.quantize.format import QuantizedWeight

from .checks import MoEInputError


def out_buffer(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
               name: str, rows_strided: bool = False) -> torch.Tensor:
    """A fresh buffer, or the caller's after checking it matches (static buffers for CUDA graphs)."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    layout_ok = out.stride(-1) == 1 if rows_strided else out.is_contiguous()
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not layout_ok:
        raise MoEInputError(
            f"{name}: out must be {'row-major' if rows_strided else 'contiguous'} {shape} {dtype} on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device} strides {out.stride()}")
    return out


def row_lengths(qw: QuantizedWeight) -> dict[str, int]:
    """The kernels' ``qw_row_len`` (bytes of an int4 row, codes of an int8 row) and
    ``groups_per_row``: passed as arguments so that Triton can see they are multiples of 16
    (aligned 128-bit loads), see quant_tiles."""
    return {"qw_row_len": qw.qweight.shape[-1], "groups_per_row": qw.scales.shape[-1]}


def zeros_arg(qw: QuantizedWeight) -> torch.Tensor:
    """The zero points for int4; int8 has none and the kernels never read this pointer."""
    return qw.zeros if qw.zeros is not None else qw.scales


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int | None:
    """The SM count of a CUDA device; None elsewhere (the interpreter keeps the table's tiles)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
