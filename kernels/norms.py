"""Fused RMSNorm, and RMSNorm + rotary embedding, for the decoder's per-token glue.

At batch 1 the matmuls of a decode step read their weights near the bandwidth limit, but the
glue between them is a string of tiny kernels: RMSNorm as torch ops is a cast, square, mean,
add, rsqrt, multiply, cast and multiply; RoPE a cast, two multiplies, a negation, a concat,
an add and a cast. With QK-norm and RoPE on q and k that is about 50 launches per layer, each
a couple of microseconds even replayed from a CUDA graph: longer than the layer's weights take
to read. Each function here is one launch, one program per row, with the same roundings as the
torch code in ``molmoe_lite/model/layers.py``:

  normed = x * rsqrt(mean(x^2) + eps)     in fp32
  y      = round_xdtype(normed) * w       rounded to the promoted dtype of x and w
  out    = round_out(y)                   (the caller's ``.to(compute dtype)``)
  rope:  out = round_out(y * cos + rotate_half(y) * sin) on y rounded to the output dtype first

Sums run in another order than torch's, so results agree to rounding, not bit for bit.
rotate_half pairs element d of a head with d +- D/2: the partner is loaded a second time
from memory (an L1 hit) instead of shuffled in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _normed(x_ptr, w_ptr, cols, ok, inv_rms, PROD: tl.constexpr):
    # round_xdtype(x * inv_rms) * w, rounded to PROD, as fp32
    x = tl.load(x_ptr + cols, mask=ok, other=0.0)
    n = (x.to(tl.float32) * inv_rms).to(x.dtype).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return (n * w).to(PROD).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, cos_ptr, sin_ptr,
                     N, stride_x, stride_o, eps,
                     PROD: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x_row = x_ptr + row * stride_x
    x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    y = _normed(x_row, w_ptr, cols, ok, inv_rms, PROD)
    if ROPE:
        # RoPE runs on the normed row rounded to the output dtype (the torch code's .to(compute))
        half: tl.constexpr = HEAD_DIM // 2
        d = cols % HEAD_DIM
        first = d < half
        partner = tl.where(first, cols + half, cols - half)
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        yp = _normed(x_row, w_ptr, partner, ok, inv_rms, PROD).to(out_ptr.dtype.element_ty).to(tl.float32)
        cos = tl.load(cos_ptr + row * HEAD_DIM + d, mask=ok, other=0.0)
        sin = tl.load(sin_ptr + row * HEAD_DIM + d, mask=ok, other=0.0)
        y = y * cos + tl.where(first, -yp, yp) * sin
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """RMSNorm over the last dim of x [..., N] (rows with contiguous columns); the result in
    ``out_dtype`` (default: x's and weight's promoted dtype, as ``normed.to(x.dtype) * weight``).

    ``rope=(cos, sin)``, each fp32 [..., D] for the rows of x (x's leading dims), also rotates
    the result, read as N / D heads of D, the rotate-half way: ``apply_rope(norm(x).to(out))``.
    """
    n = x.shape[-1]
    prod = torch.promote_types(x.dtype, weight.dtype)
    out_dtype = out_dtype or prod
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=out_dtype, device=x.device)
    if rows.shape[0] == 0:
        return out.view(x.shape)
    head_dim = 1
    cos = sin = rows  # not read without rope
    if rope is not None:
        cos, sin = (t.reshape(rows.shape[0], -1).float().contiguous() for t in rope)
        head_dim = cos.shape[-1]
        if n % head_dim or head_dim % 2:
            raise ValueError(f"rms_norm: width {n} is not a whole number of even heads of {head_dim}")
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, cos, sin, n, rows.stride(0), out.stride(0), float(eps),
        PROD=_TL[prod], BLOCK=block, ROPE=rope is not None, HEAD_DIM=head_dim,
        num_warps=max(1, min(8, block // 256)))
    return out.view(x.shape)
