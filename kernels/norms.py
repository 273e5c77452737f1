"""Fused RMSNorm variants and the token lookup: the decoder's per-token glue, one launch each.

At batch 1 the matmuls of a decode step read their weights near the bandwidth limit, but the
glue between them, as torch ops, is a string of tiny launches (RMSNorm: a cast, square, mean,
add, rsqrt, multiply, cast and multiply; RoPE as many again), each costing more than the
arithmetic. Each kernel here is one launch, one program per row, with the same roundings as
the torch code in ``molmoe_lite/model/layers.py``:

  normed = x * rsqrt(mean(x^2) + eps)     in fp32
  y      = round_xdtype(normed) * w       rounded to the promoted dtype of x and w
  out    = round_out(y)                   (the caller's ``.to(compute dtype)``)
  rope:  out = round_out(y * cos + rotate_half(y) * sin) on y rounded to the output dtype first

Kernels: ``_rms_norm_kernel`` (plain), ``_add_rms_norm_kernel`` (the residual add, then the
norm), ``_rms_norm_rope_kernel`` (QK-norm + RoPE) and ``_rms_norm_rope_to_cache_kernel`` (the
same for one decode step's keys, written with the values into each row's own KV-cache slot); they share
their math through the jit helpers below. Sums run in another order than torch's, so results
agree to rounding, not bit for bit. rotate_half pairs element d of a head with d +- D/2: the
partner is loaded a second time from memory (an L1 hit) instead of shuffled in registers.
``embedding`` reads a token's row from one of the two tables (Molmo's extra rows live in a
second one).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


# ---------------------------------------------------------------- shared math (jit helpers)
@triton.jit
def _load_f32(ptr, cols, ok):
    return tl.load(ptr + cols, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _inv_rms(x, N, eps):
    # x: fp32 [BLOCK], zero past N
    return tl.math.rsqrt(tl.sum(x * x, axis=0) / N + eps)


@triton.jit
def _scaled(x, w_ptr, cols, ok, inv_rms, X_DTYPE: tl.constexpr, PROD: tl.constexpr):
    # round_xdtype(x * inv_rms) * w, rounded to PROD, as fp32 (x: fp32 values of X_DTYPE)
    n = (x * inv_rms).to(X_DTYPE).to(tl.float32)
    w = _load_f32(w_ptr, cols, ok)
    return (n * w).to(PROD).to(tl.float32)


@triton.jit
def _normed_rotated(x_row, w_ptr, cos_row, sin_row, cols, ok, N, eps,
                    PROD: tl.constexpr, OUT_DTYPE: tl.constexpr, HEAD_DIM: tl.constexpr):
    # one row read as N / HEAD_DIM heads: normed, rounded to OUT_DTYPE, rotated; fp32 [BLOCK].
    # RoPE runs on the normed row rounded to the output dtype (the torch code's .to(compute));
    # rotate_half's partner of element d is d +- D/2 of the same head, loaded again
    x_dtype = x_row.dtype.element_ty
    x = _load_f32(x_row, cols, ok)
    inv_rms = _inv_rms(x, N=N, eps=eps)
    half: tl.constexpr = HEAD_DIM // 2
    dd = cols % HEAD_DIM
    first = dd < half
    partner = tl.where(first, cols + half, cols - half)
    y = _scaled(x, w_ptr, cols, ok, inv_rms, X_DTYPE=x_dtype, PROD=PROD)
    yp = _scaled(_load_f32(x_row, partner, ok), w_ptr, partner, ok, inv_rms, X_DTYPE=x_dtype, PROD=PROD)
    y = y.to(OUT_DTYPE).to(tl.float32)
    yp = yp.to(OUT_DTYPE).to(tl.float32)
    cos = tl.load(cos_row + dd, mask=ok, other=0.0)
    sin = tl.load(sin_row + dd, mask=ok, other=0.0)
    return y * cos + tl.where(first, -yp, yp) * sin


# ---------------------------------------------------------------- kernels
@triton.jit
def _rms_norm_kernel(x_ptr,  # [rows, N], row stride stride_x
                     w_ptr,  # [N] norm weight
                     out_ptr,  # [rows, N] out, row stride stride_o
                     N, stride_x, stride_o, eps,
                     PROD: tl.constexpr, BLOCK: tl.constexpr):
    # map program ids: one row
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    # pointers and math: the whole row in one block
    x = _load_f32(x_ptr + row * stride_x, cols, ok)
    y = _scaled(x, w_ptr, cols, ok, _inv_rms(x, N=N, eps=eps), X_DTYPE=x_ptr.dtype.element_ty, PROD=PROD)
    # write back
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _add_rms_norm_kernel(x_ptr,  # [rows, N] residual, row stride stride_x
                         delta_ptr,  # [rows, N] added to it, row stride stride_d
                         w_ptr,  # [N] norm weight
                         sum_ptr,  # [rows, N] out: x + delta, contiguous
                         out_ptr,  # [rows, N] out: norm(x + delta), row stride stride_o
                         N, stride_x, stride_d, stride_o, eps,
                         PROD: tl.constexpr, BLOCK: tl.constexpr):
    # map program ids: one row
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    # pointers and math: x + delta in fp32, rounded to the sum's dtype, then normalised (the
    # normed row is rounded to that dtype too)
    sum_dtype = sum_ptr.dtype.element_ty
    x = _load_f32(x_ptr + row * stride_x, cols, ok) + _load_f32(delta_ptr + row * stride_d, cols, ok)
    x = x.to(sum_dtype).to(tl.float32)
    y = _scaled(x, w_ptr, cols, ok, _inv_rms(x, N=N, eps=eps), X_DTYPE=sum_dtype, PROD=PROD)
    # write back: the sum and its norm
    tl.store(sum_ptr + row * N + cols, x.to(sum_dtype), mask=ok)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_rope_kernel(x_ptr,  # [rows, N] = N / HEAD_DIM heads per row, row stride stride_x
                          w_ptr,  # [N] norm weight
                          cos_ptr, sin_ptr,  # fp32 [rows, HEAD_DIM]
                          out_ptr,  # [rows, N] out, row stride stride_o
                          N, stride_x, stride_o, eps,
                          PROD: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    # map program ids: one row
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    # pointers and math: the row and its position's angles
    y = _normed_rotated(x_ptr + row * stride_x, w_ptr, cos_ptr + row * HEAD_DIM, sin_ptr + row * HEAD_DIM,
                        cols, ok, N=N, eps=eps, PROD=PROD, OUT_DTYPE=out_ptr.dtype.element_ty, HEAD_DIM=HEAD_DIM)
    # write back
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rms_norm_rope_to_cache_kernel(k_ptr,  # [B, N] one step's keys, row stride stride_k
                                   w_ptr,  # [N] k-norm weight
                                   cos_ptr, sin_ptr,  # fp32 [B, HEAD_DIM]
                                   v_ptr,  # [B, N] one step's values, row stride stride_v
                                   k_cache_ptr, v_cache_ptr,  # [B, N / HEAD_DIM, max_len, HEAD_DIM]
                                   pos_ptr,  # [B] int64: the slot each row writes
                                   N, stride_k, stride_v, max_len, eps,
                                   PROD: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    # map program ids: one batch row
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < N
    # pointers and math: the keys normed and rotated (the row's angles are those of its own
    # position); each head's element goes to the row's own slot
    y = _normed_rotated(k_ptr + row * stride_k, w_ptr, cos_ptr + row * HEAD_DIM, sin_ptr + row * HEAD_DIM,
                        cols, ok, N=N, eps=eps, PROD=PROD, OUT_DTYPE=k_cache_ptr.dtype.element_ty, HEAD_DIM=HEAD_DIM)
    pos = tl.load(pos_ptr + row)
    slot = ((row * (N // HEAD_DIM) + cols // HEAD_DIM) * max_len + pos) * HEAD_DIM + cols % HEAD_DIM
    # write back: keys and the values beside them
    tl.store(k_cache_ptr + slot, y.to(k_cache_ptr.dtype.element_ty), mask=ok)
    v = tl.load(v_ptr + row * stride_v + cols, mask=ok, other=0.0)
    tl.store(v_cache_ptr + slot, v.to(v_cache_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------- launchers
def _launch_options(n: int) -> dict:
    block = triton.next_power_of_2(n)
    return {"BLOCK": block, "num_warps": max(1, min(8, block // 256))}


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    rows = t.reshape(-1, n)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def _angles(t: torch.Tensor, n_rows: int) -> torch.Tensor:
    return t.reshape(n_rows, -1).float().contiguous()


def rms_norm_rope_to_cache(k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, eps: float,
                           cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           pos: torch.Tensor) -> None:
    """One decode step's keys and values into each row's cache slot, in one launch: k [B, 1, N]
    normed and rotated (as ``rms_norm(k, ..., rope=(cos, sin))`` in the cache's dtype; cos, sin
    [B, 1, D] the angles of each row's own position), v [B, 1, N] copied; caches
    [B, N/D, max_len, D] contiguous. ``pos`` is a device tensor [B] int64, row b's slot
    (graph-capturable: no Python int from the device; slots are not range-checked, as
    ``index_put_`` on a GPU does not check them either)."""
    n = k.shape[-1]
    rows, v_rows = _rows(k, n), _rows(v, n)
    B, heads, max_len, head_dim = k_cache.shape
    if rows.shape[0] != B or heads * head_dim != n or v_cache.shape != k_cache.shape:
        raise ValueError(f"rms_norm_rope_to_cache: one token per row of the cache; k {tuple(k.shape)}, "
                         f"cache {tuple(k_cache.shape)}")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rms_norm_rope_to_cache: the caches must be contiguous")
    if pos.dtype != torch.int64 or tuple(pos.shape) != (B,):
        raise ValueError(f"rms_norm_rope_to_cache: pos must be int64 [B] = [{B}], one slot per row; "
                         f"got {pos.dtype} {tuple(pos.shape)}")
    pos = pos.contiguous()  # an expanded shared slot (stride 0) becomes B copies: the kernel reads pos + row
    prod = torch.promote_types(k.dtype, weight.dtype)
    _rms_norm_rope_to_cache_kernel[(B,)](
        k_ptr=rows, w_ptr=weight, cos_ptr=_angles(cos, B), sin_ptr=_angles(sin, B), v_ptr=v_rows,
        k_cache_ptr=k_cache, v_cache_ptr=v_cache, pos_ptr=pos,
        N=n, stride_k=rows.stride(0), stride_v=v_rows.stride(0), max_len=max_len, eps=float(eps),
        PROD=_TL[prod], HEAD_DIM=head_dim, **_launch_options(n))


def _norm_rope(rows: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, prod: torch.dtype,
               rope: tuple[torch.Tensor, torch.Tensor]) -> None:
    n = rows.shape[1]
    cos, sin = (_angles(t, rows.shape[0]) for t in rope)
    head_dim = cos.shape[-1]
    if n % head_dim or head_dim % 2:
        raise ValueError(f"rms_norm: width {n} is not a whole number of even heads of {head_dim}")
    if rows.shape[0]:
        _rms_norm_rope_kernel[(rows.shape[0],)](
            x_ptr=rows, w_ptr=weight, cos_ptr=cos, sin_ptr=sin, out_ptr=out,
            N=n, stride_x=rows.stride(0), stride_o=out.stride(0), eps=float(eps),
            PROD=_TL[prod], HEAD_DIM=head_dim, **_launch_options(n))


def _add_norm(rows: torch.Tensor, deltas: torch.Tensor, weight: torch.Tensor, eps: float, total: torch.Tensor,
              out: torch.Tensor, prod: torch.dtype) -> None:
    n = rows.shape[1]
    if rows.shape[0]:
        _add_rms_norm_kernel[(rows.shape[0],)](
            x_ptr=rows, delta_ptr=deltas, w_ptr=weight, sum_ptr=total, out_ptr=out,
            N=n, stride_x=rows.stride(0), stride_d=deltas.stride(0), stride_o=out.stride(0), eps=float(eps),
            PROD=_TL[prod], **_launch_options(n))


def _norm(rows: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, prod: torch.dtype) -> None:
    n = rows.shape[1]
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
            x_ptr=rows, w_ptr=weight, out_ptr=out, N=n, stride_x=rows.stride(0), stride_o=out.stride(0),
            eps=float(eps), PROD=_TL[prod], **_launch_options(n))


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
    if delta is not None:
        total = torch.empty(rows.shape, dtype=sum_dtype, device=x.device)
        _add_norm(rows, _rows(delta, n), weight, eps, total, out, prod)
        return total.view(x.shape), out.view(x.shape)
    if rope is not None:
        _norm_rope(rows, weight, eps, out, prod, rope)
    else:
        _norm(rows, weight, eps, out, prod)
    return out.view(x.shape)


@triton.jit
def _embedding_kernel(ids_ptr,  # [rows] int64 token ids, -1 for padding
                      table_ptr,  # [V, D] the main table
                      new_ptr,  # [V_new, D] the extra rows (HAS_NEW only)
                      out_ptr,  # [rows, D] out
                      V, D,
                      HAS_NEW: tl.constexpr, BLOCK: tl.constexpr):
    # map program ids: one token
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < D
    # pointers: the token's row in one of the tables
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
    # write back
    tl.store(out_ptr + row * D + cols, vals, mask=ok)


def embedding(ids: torch.Tensor, table: torch.Tensor, new_table: torch.Tensor | None) -> torch.Tensor:
    """Rows of ``table`` [V, D] for ids < V and of ``new_table`` for ids >= V (Molmo's extra
    rows); id -1 reads row 0. ids [...] -> [..., D] in the tables' dtype, one launch (as torch
    ops: a masked fill, a compare, two lookups, a subtraction, a clamp and a select)."""
    flat = ids.reshape(-1).contiguous()
    v, d = table.shape
    out = torch.empty(flat.shape[0], d, dtype=table.dtype, device=table.device)
    if flat.shape[0]:
        _embedding_kernel[(flat.shape[0],)](
            ids_ptr=flat, table_ptr=table, new_ptr=table if new_table is None else new_table, out_ptr=out, V=v, D=d,
            HAS_NEW=new_table is not None, **_launch_options(d))
    return out.view(*ids.shape, d)
