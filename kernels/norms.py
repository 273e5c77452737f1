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
def _scaled(x, w_ptr, cols, ok, inv_rms, X_DTYPE: tl.constexpr, PROD: tl.constexpr):
    # round_xdtype(x * inv_rms) * w, rounded to PROD, as fp32 (x: fp32 values of X_DTYPE)
    n = (x * inv_rms).to(X_DTYPE).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    return (n * w).to(PROD).to(tl.float32)


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, cos_ptr, sin_ptr, delta_ptr, sum_ptr,
                     N, stride_x, stride_o, stride_d, eps,
                     PROD: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    x_row = x_ptr + row * stride_x
    x = tl.load(x_row + cols, mask=ok, other=0.0).to(tl.float32)
    if RESIDUAL:  # x + delta in fp32, rounded to the sum's dtype, stored, then normalised
        d = tl.load(delta_ptr + row * stride_d + cols, mask=ok, other=0.0).to(tl.float32)
        x = (x + d).to(sum_ptr.dtype.element_ty).to(tl.float32)
        tl.store(sum_ptr + row * N + cols, x.to(sum_ptr.dtype.element_ty), mask=ok)
        inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        y = _scaled(x, w_ptr, cols, ok, inv_rms, sum_ptr.dtype.element_ty, PROD)
    else:
        inv_rms = tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)
        y = _scaled(x, w_ptr, cols, ok, inv_rms, x_ptr.dtype.element_ty, PROD)
    if ROPE:
        # RoPE runs on the normed row rounded to the output dtype (the torch code's .to(compute));
        # rotate_half's partner of element d is d +- D/2 of the same head, loaded again
        half: tl.constexpr = HEAD_DIM // 2
        dd = cols % HEAD_DIM
        first = dd < half
        partner = tl.where(first, cols + half, cols - half)
        xp = tl.load(x_row + partner, mask=ok, other=0.0).to(tl.float32)
        yp = _scaled(xp, w_ptr, partner, ok, inv_rms, x_ptr.dtype.element_ty, PROD)
        y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
        yp = yp.to(out_ptr.dtype.element_ty).to(tl.float32)
        cos = tl.load(cos_ptr + row * HEAD_DIM + dd, mask=ok, other=0.0)
        sin = tl.load(sin_ptr + row * HEAD_DIM + dd, mask=ok, other=0.0)
        y = y * cos + tl.where(first, -yp, yp) * sin
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None,
             rope: tuple[torch.Tensor, torch.Tensor] | None = None,
             delta: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x [..., N]; the result in ``out_dtype`` (default: x's and the
    weight's promoted dtype, as ``normed.to(x.dtype) * weight``).

    ``rope=(cos, sin)``, each fp32 [..., D] for the rows of x (x's leading dims), also rotates
    the result, read as N / D heads of D, the rotate-half way: ``apply_rope(norm(x).to(out))``.
    ``delta`` (x's shape) is added to x first, the residual add before a norm: returns
    (x + delta, norm(x + delta)), the sum in x's and delta's promoted dtype.
    """
    if rope is not None and delta is not None:
        raise ValueError("rms_norm: rope and delta together are not supported")
    n = x.shape[-1]
    rows = x.reshape(-1, n)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    sum_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    prod = torch.promote_types(sum_dtype, weight.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype or prod, device=x.device)
    total = deltas = rows  # not touched without delta
    if delta is not None:
        deltas = delta.reshape(-1, n)
        if deltas.stride(-1) != 1:
            deltas = deltas.contiguous()
        total = torch.empty(rows.shape, dtype=sum_dtype, device=x.device)
    head_dim = 1
    cos = sin = rows  # not read without rope
    if rope is not None:
        cos, sin = (t.reshape(rows.shape[0], -1).float().contiguous() for t in rope)
        head_dim = cos.shape[-1]
        if n % head_dim or head_dim % 2:
            raise ValueError(f"rms_norm: width {n} is not a whole number of even heads of {head_dim}")
    if rows.shape[0]:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows.shape[0],)](
            rows, weight, out, cos, sin, deltas, total, n, rows.stride(0), out.stride(0), deltas.stride(0),
            float(eps), PROD=_TL[prod], BLOCK=block, ROPE=rope is not None, HEAD_DIM=head_dim,
            RESIDUAL=delta is not None, num_warps=max(1, min(8, block // 256)))
    if delta is None:
        return out.view(x.shape)
    return total.view(x.shape), out.view(x.shape)
