"""Fused RMSNorm, RMSNorm + rotary embedding, and the token lookup: the decoder's per-token glue.

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
from memory (an L1 hit) instead of shuffled in registers. ``embedding`` reads a token's row
from one of the two tables (Molmo's extra rows live in a second one) in one launch.
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
                     v_ptr, vc_ptr, pos_ptr,  # TO_CACHE: v rows, the v cache, the slot (a [1] tensor)
                     N, stride_x, stride_o, stride_d, stride_v, max_len, eps,
                     PROD: tl.constexpr, BLOCK: tl.constexpr, ROPE: tl.constexpr, HEAD_DIM: tl.constexpr,
                     RESIDUAL: tl.constexpr, TO_CACHE: tl.constexpr):
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
    # the normed row is rounded to the dtype of what was normalised (a constexpr per branch)
    if RESIDUAL:
        y = _scaled(x, w_ptr, cols, ok, inv_rms, sum_ptr.dtype.element_ty, PROD)
    else:
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
    if TO_CACHE:
        # row = batch row of a one-token step; out_ptr / vc_ptr are caches [B, N/D, max_len, D]:
        # this row's heads go to slot pos, and v's row is copied beside them
        pos = tl.load(pos_ptr)
        slot = ((row * (N // HEAD_DIM) + cols // HEAD_DIM) * max_len + pos) * HEAD_DIM + cols % HEAD_DIM
        tl.store(out_ptr + slot, y.to(out_ptr.dtype.element_ty), mask=ok)
        v = tl.load(v_ptr + row * stride_v + cols, mask=ok, other=0.0)
        tl.store(vc_ptr + slot, v.to(vc_ptr.dtype.element_ty), mask=ok)
    else:
        tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(rows, weight, out, eps, prod, cos, sin, deltas, total, v_rows, v_cache, pos, max_len, head_dim,
            rope: bool, residual: bool, to_cache: bool) -> None:
    n = rows.shape[1]
    block = triton.next_power_of_2(n)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, weight, out, cos, sin, deltas, total, v_rows, v_cache, pos,
        n, rows.stride(0), out.stride(0) if out.dim() == 2 else 0, deltas.stride(0), v_rows.stride(0), max_len,
        float(eps), PROD=_TL[prod], BLOCK=block, ROPE=rope, HEAD_DIM=head_dim, RESIDUAL=residual,
        TO_CACHE=to_cache, num_warps=max(1, min(8, block // 256)))


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    rows = t.reshape(-1, n)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rms_norm_rope_to_cache(k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, eps: float,
                           cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           pos: torch.Tensor) -> None:
    """One decode step's keys and values into their cache slot, in one launch: k [B, 1, N]
    normed and rotated (as ``rms_norm(k, ..., rope=(cos, sin))`` in the cache's dtype), v
    [B, 1, N] copied; caches [B, N/D, max_len, D] contiguous, ``pos`` a device tensor [1]
    (graph-capturable: no Python int from the device). Replaces the norm kernel and two
    ``index_copy_`` launches."""
    n = k.shape[-1]
    rows, v_rows = _rows(k, n), _rows(v, n)
    B, heads, max_len, head_dim = k_cache.shape
    if rows.shape[0] != B or heads * head_dim != n or v_cache.shape != k_cache.shape:
        raise ValueError(f"rms_norm_rope_to_cache: one token per row of the cache; k {tuple(k.shape)}, "
                         f"cache {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rms_norm_rope_to_cache: the caches must be contiguous")
    c, s = (t.reshape(B, -1).float().contiguous() for t in (cos, sin))
    prod = torch.promote_types(k.dtype, weight.dtype)
    _launch(rows, weight, k_cache, eps, prod, c, s, rows, rows, v_rows, v_cache, pos, max_len, head_dim,
            rope=True, residual=False, to_cache=True)


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
    rows = _rows(x, n)
    sum_dtype = x.dtype if delta is None else torch.promote_types(x.dtype, delta.dtype)
    prod = torch.promote_types(sum_dtype, weight.dtype)
    out = torch.empty(rows.shape, dtype=out_dtype or prod, device=x.device)
    total = deltas = rows  # not touched without delta
    if delta is not None:
        deltas = _rows(delta, n)
        total = torch.empty(rows.shape, dtype=sum_dtype, device=x.device)
    head_dim = 1
    cos = sin = rows  # not read without rope
    if rope is not None:
        cos, sin = (t.reshape(rows.shape[0], -1).float().contiguous() for t in rope)
        head_dim = cos.shape[-1]
        if n % head_dim or head_dim % 2:
            raise ValueError(f"rms_norm: width {n} is not a whole number of even heads of {head_dim}")
    if rows.shape[0]:
        _launch(rows, weight, out, eps, prod, cos, sin, deltas, total, rows, rows, rows, 1, head_dim,
                rope=rope is not None, residual=delta is not None, to_cache=False)
    if delta is None:
        return out.view(x.shape)
    return total.view(x.shape), out.view(x.shape)


@triton.jit
def _embedding_kernel(ids_ptr, table_ptr, new_ptr, out_ptr, V, D,
                      HAS_NEW: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    tok = tl.load(ids_ptr + row).to(tl.int64)
    tok = tl.where(tok == -1, 0, tok)  # batch padding embeds as id 0
    if HAS_NEW:
        is_new = tok >= V
        # both rows are always in range (row 0 stands in for the table not used); keep one
        base = tl.load(table_ptr + tl.where(is_new, 0, tok) * D + cols, mask=ok, other=0.0)
        extra = tl.load(new_ptr + tl.where(is_new, tok - V, 0) * D + cols, mask=ok, other=0.0)
        vals = tl.where(is_new, extra, base)
    else:
        vals = tl.load(table_ptr + tok * D + cols, mask=ok, other=0.0)
    tl.store(out_ptr + row * D + cols, vals, mask=ok)


def embedding(ids: torch.Tensor, table: torch.Tensor, new_table: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``table`` [V, D] for ids < V and of ``new_table`` for ids >= V (Molmo's extra
    rows); id -1 reads row 0. ids [...] -> [..., D] in the tables' dtype, one launch (as torch
    ops: a masked fill, a compare, two lookups, a subtraction, a clamp and a select)."""
    flat = ids.reshape(-1).contiguous()
    v, d = table.shape
    out = torch.empty(flat.shape[0], d, dtype=table.dtype, device=table.device)
    if flat.shape[0]:
        block = triton.next_power_of_2(d)
        _embedding_kernel[(flat.shape[0],)](
            flat, table, table if new_table is None else new_table, out, v, d,
            HAS_NEW=new_table is not None, BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return out.view(*ids.shape, d)
