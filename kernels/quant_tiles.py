"""Triton helpers that load one tile of a quantised weight and dequantise it in registers.

Layout (molmoe_lite.quantize.format, version 1), for one expert's W [N, K] (N out, K in, group G along K):
  int4: qweight uint8 [N, K // 2], element k in byte k // 2, low nibble for even k, high for odd;
        scales, zeros fp16 [N, K // G]; w = (q - zero) * scale.
  int8: qweight int8 [N, K]; scales fp16 [N, K // G]; w = q * scale.

The helpers take row indices ``n`` and column indices (``j`` bytes for int4, ``k`` for int8)
already shaped for broadcasting, so the same code yields a [BLOCK_N, BLOCK_K] tile for GEMV-style kernels
and a [BLOCK_K, BLOCK_N] tile (the B operand of ``tl.dot``) for the grouped kernels. int4 returns two
tiles, even and odd k, so a byte is loaded once and never re-interleaved: callers multiply
them by the even/odd columns of the activations. When a K-step lies inside one group
(G % BLOCK_K == 0) the scales are one value per row, loaded once per step; otherwise
(G < BLOCK_K or G not a power of two, e.g. per-channel G = K) they are gathered per element.

Names follow the package legend (``molmoe_lite.kernels``). Row lengths come in as kernel
arguments (``qw_row_len``, ``groups_per_row``), never computed inside the kernel as K // 2 or K // G: Triton specialises an integer argument that is a
multiple of 16, and only then does it know that a row starts 16-byte aligned and issue 128-bit
loads (and cp.async copies). From K % 16 == 0 alone it can prove K // 2 % 8 == 0 and no more,
which halves the load width of the int4 weights (aot.py reports the load width).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def nibbles_f32(b, shift: tl.constexpr):
    # the 4-bit field at ``shift`` of each byte, as an exact fp32, without an int->float convert
    # (a quarter-rate instruction): OR the field into the mantissa of 2^23 and subtract 2^23
    field = (b.to(tl.int32) >> shift) & 15
    return (field | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def int8_f32(q):
    # int8 codes as exact fp32 without an int->float convert: a signed q added to the bits of
    # 1.5 * 2^23 moves only the mantissa (|q| < 2^22), then 1.5 * 2^23 is subtracted
    return (q.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0


@triton.jit
def dequant_int4_tile(qw_ptr, s_ptr, z_ptr, n, j, k0, N, qw_row_len, groups_per_row,
                      GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    # qw_ptr: uint8 [N, qw_row_len = K // 2]; s_ptr, z_ptr: fp16 [N, groups_per_row = K // G]
    # n: rows, j: byte columns (absolute), broadcastable to the tile; k0: first k of this step
    row_ok = n < N
    mask = row_ok & (j < qw_row_len)
    b = tl.load(qw_ptr + n * qw_row_len + j, mask=mask, other=0)
    if GROUP % BLOCK_K == 0:
        g = k0 // GROUP
        s = tl.load(s_ptr + n * groups_per_row + g, mask=row_ok, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n * groups_per_row + g, mask=row_ok, other=0.0).to(tl.float32)
    else:
        g = (2 * j) // GROUP
        s = tl.load(s_ptr + n * groups_per_row + g, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + n * groups_per_row + g, mask=mask, other=0.0).to(tl.float32)
    lo = nibbles_f32(b, 0)
    hi = nibbles_f32(b, 4)
    return (lo - z) * s, (hi - z) * s


@triton.jit
def dequant_int8_tile(qw_ptr, s_ptr, n, k, k0, N, qw_row_len, groups_per_row,
                      GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    # qw_ptr: int8 [N, qw_row_len = K]; s_ptr: fp16 [N, groups_per_row = K // G]
    row_ok = n < N
    mask = row_ok & (k < qw_row_len)
    q = int8_f32(tl.load(qw_ptr + n * qw_row_len + k, mask=mask, other=0))
    if GROUP % BLOCK_K == 0:
        s = tl.load(s_ptr + n * groups_per_row + k0 // GROUP, mask=row_ok, other=0.0).to(tl.float32)
    else:
        s = tl.load(s_ptr + n * groups_per_row + k // GROUP, mask=mask, other=0.0).to(tl.float32)
    return q * s


# ---------------------------------------------------------------- GEMV steps (decode kernels)
# A GEMV step returns sum_k W[rows, k] * x[k] over k in [k0, k0 + BLOCK_K) as fp32 [BLOCK_N].
# At batch 1 a fast GPU streams int4 weights nearly as fast as its lanes can dequantise them,
# so the dequantisation is the budget and the group factors are pulled out of the inner sum:
#   sum_k (q_k - z) s x_k = s * (sum_k q_k x_k - z * sum_k x_k)   per (row, group),
# leaving per weight a mask/shift, an OR and an add that make the code a float (nibbles_f32,
# int8_f32: an int->float convert runs at 1/8 of the fp32 rate) and one FMA. Groups are laid
# out as an explicit tile axis when a step spans several whole groups; odd group sizes
# (per-channel G = K with K not a power of two) fall back to per-element scales.


@triton.jit
def int4_gemv_step(q_base, s_base, z_base, x_row, rows, k0, N, qw_row_len, groups_per_row,
                   GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    # q_base: uint8 [N, qw_row_len = K/2]; s_base, z_base: fp16 [N, groups_per_row = K/G];
    # x_row: [K]; rows: [BLOCK_N]
    row_ok = rows < N
    if GROUP % BLOCK_K == 0:  # the whole step lies in one group: one (s, z) per row
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BLOCK_K/2]
        j_ok = j < qw_row_len
        xe = tl.load(x_row + 2 * j, mask=j_ok, other=0.0).to(tl.float32)
        xo = tl.load(x_row + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)
        b = tl.load(q_base + rows[:, None] * qw_row_len + j[None, :], mask=row_ok[:, None] & j_ok[None, :], other=0)
        p = tl.sum(nibbles_f32(b, 0) * xe[None, :] + nibbles_f32(b, 4) * xo[None, :], axis=1)
        xs = tl.sum(xe + xo, axis=0)
        g = k0 // GROUP
        s = tl.load(s_base + rows * groups_per_row + g, mask=row_ok, other=0.0).to(tl.float32)
        z = tl.load(z_base + rows * groups_per_row + g, mask=row_ok, other=0.0).to(tl.float32)
        return s * (p - z * xs)
    elif BLOCK_K % GROUP == 0:  # BLOCK_K // GROUP whole groups per step: a [BLOCK_N, groups, G/2] tile
        gi = tl.arange(0, BLOCK_K // GROUP)
        j = k0 // 2 + gi[:, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, :]  # [groups per step, G/2]
        j_ok = j < qw_row_len
        xe = tl.load(x_row + 2 * j, mask=j_ok, other=0.0).to(tl.float32)
        xo = tl.load(x_row + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)
        b = tl.load(q_base + rows[:, None, None] * qw_row_len + j[None, :, :],
                    mask=row_ok[:, None, None] & j_ok[None, :, :], other=0)
        p = tl.sum(nibbles_f32(b, 0) * xe[None, :, :] + nibbles_f32(b, 4) * xo[None, :, :], axis=2)
        xs = tl.sum(xe + xo, axis=1)  # [groups per step]
        g = k0 // GROUP + gi
        sz_mask = row_ok[:, None] & (g < groups_per_row)[None, :]
        s = tl.load(s_base + rows[:, None] * groups_per_row + g[None, :], mask=sz_mask, other=0.0).to(tl.float32)
        z = tl.load(z_base + rows[:, None] * groups_per_row + g[None, :], mask=sz_mask, other=0.0).to(tl.float32)
        return tl.sum(s * (p - z * xs[None, :]), axis=1)
    else:
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        j_ok = j < qw_row_len
        xe = tl.load(x_row + 2 * j, mask=j_ok, other=0.0).to(tl.float32)
        xo = tl.load(x_row + 2 * j + 1, mask=j_ok, other=0.0).to(tl.float32)
        w_lo, w_hi = dequant_int4_tile(q_base, s_base, z_base, n=rows[:, None], j=j[None, :], k0=k0, N=N,
                                       qw_row_len=qw_row_len, groups_per_row=groups_per_row, GROUP=GROUP,
                                       BLOCK_K=BLOCK_K)
        return tl.sum(w_lo * xe[None, :] + w_hi * xo[None, :], axis=1)


@triton.jit
def int8_gemv_step(q_base, s_base, x_row, rows, k0, N, qw_row_len, groups_per_row,
                   GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    # q_base: int8 [N, qw_row_len = K]; s_base: fp16 [N, groups_per_row = K/G]; x_row: [K];
    # rows: [BLOCK_N]
    K = qw_row_len
    row_ok = rows < N
    if GROUP % BLOCK_K == 0:
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xv = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        q = tl.load(q_base + rows[:, None] * K + k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0)
        p = tl.sum(int8_f32(q) * xv[None, :], axis=1)
        s = tl.load(s_base + rows * groups_per_row + k0 // GROUP, mask=row_ok, other=0.0).to(tl.float32)
        return s * p
    elif BLOCK_K % GROUP == 0:
        gi = tl.arange(0, BLOCK_K // GROUP)
        k = k0 + gi[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [groups per step, G]
        k_ok = k < K
        xv = tl.load(x_row + k, mask=k_ok, other=0.0).to(tl.float32)
        q = tl.load(q_base + rows[:, None, None] * K + k[None, :, :],
                    mask=row_ok[:, None, None] & k_ok[None, :, :], other=0)
        p = tl.sum(int8_f32(q) * xv[None, :, :], axis=2)  # [BLOCK_N, groups per step]
        g = k0 // GROUP + gi
        s = tl.load(s_base + rows[:, None] * groups_per_row + g[None, :], mask=row_ok[:, None] & (g < groups_per_row)[None, :],
                    other=0.0).to(tl.float32)
        return tl.sum(s * p, axis=1)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_row + k, mask=k < K, other=0.0).to(tl.float32)
        w = dequant_int8_tile(q_base, s_base, n=rows[:, None], k=k[None, :], k0=k0, N=N, qw_row_len=qw_row_len,
                              groups_per_row=groups_per_row, GROUP=GROUP, BLOCK_K=BLOCK_K)
        return tl.sum(w * xv[None, :], axis=1)


@triton.jit
def gemv_step(q_base, s_base, z_base, x_row, rows, k0, N, qw_row_len, groups_per_row,
              BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    # one K-step of either format (z_base is never read for int8)
    if BITS == 4:
        return int4_gemv_step(q_base, s_base, z_base, x_row, rows=rows, k0=k0, N=N, qw_row_len=qw_row_len,
                              groups_per_row=groups_per_row, GROUP=GROUP, BLOCK_K=BLOCK_K)
    else:
        return int8_gemv_step(q_base, s_base, x_row, rows=rows, k0=k0, N=N, qw_row_len=qw_row_len,
                              groups_per_row=groups_per_row, GROUP=GROUP, BLOCK_K=BLOCK_K)
