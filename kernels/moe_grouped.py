"""Prefill path: tokens grouped by expert, tensor-core tiles with on-the-fly dequantisation.

Shapes: T tokens, E experts, K top-k, H hidden, I expert hidden, G group size, BM/BN/BK tile
sizes; pair p = t * K + k; MB = number of blocks (routing.group_by_expert).

The router's (token, k) pairs are sorted by expert (routing.group_by_expert); each block of BM
consecutive sorted rows belongs to one expert, and a block table gives every program its
(expert, first row, end row), so no pair is padded into the sorted array and blocks past the
real count exit at once.

1. ``_gate_up_grouped_kernel``: grid (MB, cdiv(I, BN)). A [BM, BK] tile of gathered token rows
   of x times dequantised [BK, BN] tiles of the expert's gate and up rows (tl.dot, fp32
   accumulators), then act[p, n] = silu(gate) * up, stored by pair so the down pass (and the
   decode kernel) index it the same way.
2. ``_down_grouped_kernel``: grid (MB, cdiv(I, BN)): act rows of the block times W2[e] tiles,
   scaled by each pair's routing weight, stored to y[p, :]; the top-k sum is one small torch
   reduction y.view(T, K, H).sum(1) in fp32 (deterministic, unlike atomics).
int4 tiles are consumed as even and odd K-halves (dot(A[:, 0::2], W_lo) + dot(A[:, 1::2], W_hi)),
so a packed byte is loaded once and never re-interleaved in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from molmoe_lite.quantize.format import QuantizedWeight

from .configs import get_config
from .moe_gemv import _output, _zeros_arg, check_quantized, row_lengths
from .quant_tiles import dequant_int4_tile, dequant_int8_tile
from .reference import check_moe_inputs
from .routing import ExpertGrouping, group_by_expert


@triton.jit
def _dot_quantized(a, acc, q_base, s_base, z_base, wn, k0, N_W, QK, NG,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # acc + a [BM, BK] @ W[wn, k0:k0+BK]^T, the weight tile dequantised in registers; int4 takes
    # a's even and odd columns against the low and high nibbles
    if BITS == 4:
        a_even, a_odd = tl.split(tl.reshape(a, [a.shape[0], BLOCK_K // 2, 2]))
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BK/2] byte columns
        w_lo, w_hi = dequant_int4_tile(q_base, s_base, z_base, wn, j[:, None], k0, N_W, QK, NG, GROUP, BLOCK_K)
        acc = tl.dot(a_even, w_lo.to(a.dtype), acc, input_precision=PRECISION)
        acc = tl.dot(a_odd, w_hi.to(a.dtype), acc, input_precision=PRECISION)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        w = dequant_int8_tile(q_base, s_base, wn, k[:, None], k0, N_W, QK, NG, GROUP, BLOCK_K)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_matmul_tile(a_ptr, a_rows, m_ok, stride_a,  # A rows: [BM] row offsets into a_ptr
                         q_base, s_base, z_base, n_w, n_w2, N_W, KDIM, QK, NG,
                         TWO: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # returns (A[rows, :KDIM] @ W[n_w, :KDIM]^T, A[rows] @ W[n_w2]^T if TWO else zeros), fp32 [BM, BN]
    # each; W is [N_W, KDIM] quantised, QK codes and NG groups per row (quant_tiles: why they are
    # arguments). TWO serves gate and up from one load of A per K-step.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_row_ptr = a_ptr + a_rows[:, None] * stride_a  # [BM, 1]
    wn = n_w[None, :]  # [1, BN]: tiles come out [BK, BN], the B operand of tl.dot
    wn2 = n_w2[None, :]
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, KDIM, BLOCK_K):
        k = k0 + kk
        # contiguous rows: 128-bit loads, pipelined through shared memory (int4 splits them into
        # even and odd columns in registers; strided loads of each half would be 2-byte gathers)
        a = tl.load(a_row_ptr + k[None, :], mask=m_ok[:, None] & (k[None, :] < KDIM), other=0.0)
        acc = _dot_quantized(a, acc, q_base, s_base, z_base, wn, k0, N_W, QK, NG, BITS, GROUP, BLOCK_K, PRECISION)
        if TWO:
            acc2 = _dot_quantized(a, acc2, q_base, s_base, z_base, wn2, k0, N_W, QK, NG,
                                  BITS, GROUP, BLOCK_K, PRECISION)
    return acc, acc2


@triton.jit
def _gate_up_grouped_kernel(x_ptr,  # [T, H] activations, row stride stride_xt
                            pairs_ptr,  # [T*K] int32 pairs in expert order
                            blk_e_ptr, blk_r0_ptr, blk_r1_ptr,  # [MB] int32 block table
                            qw_ptr, s_ptr, z_ptr,  # w13: [E, 2I, H/2 | H], [E, 2I, H/G] x2
                            act_ptr,  # [T*K, I] out, x's dtype
                            E, I, H, stride_xt,
                            QK, NG,  # w13 qweight row length (H/2 | H), groups per row (H/G)
                            TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr):
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_e_ptr + blk)
    if e >= E:  # past the real number of blocks
        return
    e = e.to(tl.int64)
    r = tl.load(blk_r0_ptr + blk) + tl.arange(0, BLOCK_M)  # [BM] rows of the sorted pairs
    m_ok = r < tl.load(blk_r1_ptr + blk)
    pair = tl.load(pairs_ptr + r, mask=m_ok, other=0)
    tok = (pair // TOP_K).to(tl.int64)
    n_rows = 2 * I
    q_base = qw_ptr + e * n_rows * QK
    s_base = s_ptr + e * n_rows * NG
    z_base = z_ptr + e * n_rows * NG
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    n_gate = tl.where(n_ok, n, n_rows)  # rows >= 2I load nothing
    n_up = tl.where(n_ok, n + I, n_rows)
    g, u = _grouped_matmul_tile(x_ptr, tok, m_ok, stride_xt, q_base, s_base, z_base, n_gate, n_up, n_rows, H,
                                QK, NG, True, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    act = g * tl.sigmoid(g) * u
    out = act_ptr + pair.to(tl.int64)[:, None] * I + n[None, :]
    tl.store(out, act.to(act_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_grouped_kernel(act_ptr,  # [T*K, I] x's dtype
                         w_ptr,  # [T*K] fp32 routing weights
                         pairs_ptr, blk_e_ptr, blk_r0_ptr, blk_r1_ptr,
                         qw_ptr, s_ptr, z_ptr,  # w2: [E, H, I/2 | I], [E, H, I/G] x2
                         y_ptr,  # [T*K, H] out: weighted expert output per pair
                         E, H, I,
                         QK, NG,  # w2 qweight row length (I/2 | I), groups per row (I/G)
                         BITS: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr):
    blk = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(blk_e_ptr + blk)
    if e >= E:
        return
    e = e.to(tl.int64)
    r = tl.load(blk_r0_ptr + blk) + tl.arange(0, BLOCK_M)
    m_ok = r < tl.load(blk_r1_ptr + blk)
    pair = tl.load(pairs_ptr + r, mask=m_ok, other=0).to(tl.int64)
    q_base = qw_ptr + e * H * QK
    s_base = s_ptr + e * H * NG
    z_base = z_ptr + e * H * NG
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    y, _ = _grouped_matmul_tile(act_ptr, pair, m_ok, I, q_base, s_base, z_base, n, n, H, I, QK, NG,
                                False, BITS, GROUP, BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)
    wt = tl.load(w_ptr + pair, mask=m_ok, other=0.0)
    y = y * wt[:, None]
    out = y_ptr + pair[:, None] * H + n[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (n[None, :] < H))


def _tiles(cfg: dict, n: int, k: int, bits: int) -> tuple[int, int]:
    # tl.dot needs inner size >= 16: int4 halves a K-step, so BK >= 32 there
    bk_min = 32 if bits == 4 else 16
    bn = max(min(cfg["BLOCK_N"], triton.next_power_of_2(n)), 16)
    bk = max(min(cfg["BLOCK_K"], triton.next_power_of_2(k)), bk_min)
    return bn, bk


def _precision(dtype: torch.dtype) -> str:
    # fp32 activations: exact fp32 FMA products (tf32 would miss the 1e-3 tolerance)
    return "ieee" if dtype == torch.float32 else "tf32"


def gate_up_grouped(x: torch.Tensor, grouping: ExpertGrouping, top_k: int, w13: QuantizedWeight,
                    config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] -> act [T*K, I] = silu(x gate^T) * (x up^T) per pair, in x's dtype."""
    check_quantized(w13, "w13")
    t, h = x.shape
    n_exp, inter = w13.shape[0], w13.shape[1] // 2
    cfg = config or get_config(x.device)["gate_up_grouped"]
    act = _output(out, (t * top_k, inter), x.dtype, x.device, "gate_up_grouped")
    bn, bk = _tiles(cfg, inter, h, w13.bits)
    grid = (grouping.max_blocks, triton.cdiv(inter, bn))
    _gate_up_grouped_kernel[grid](
        x, grouping.sorted_pairs, grouping.block_expert, grouping.block_row0, grouping.block_row_end,
        w13.qweight, w13.scales, _zeros_arg(w13), act,
        n_exp, inter, h, x.stride(0), *row_lengths(w13),
        TOP_K=top_k, BITS=w13.bits, GROUP=w13.group_size,
        BLOCK_M=grouping.block_m, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return act


def down_grouped(act: torch.Tensor, weights: torch.Tensor, grouping: ExpertGrouping, w2: QuantizedWeight,
                 out_dtype: torch.dtype, config: dict | None = None,
                 workspace: torch.Tensor | None = None) -> torch.Tensor:
    """act [T*K, I], weights [T, K] -> [T, H] = sum_k w_k * act[p] W2[e_p]^T.

    ``workspace``: optional contiguous [T*K, H] buffer in act's dtype for the per-pair outputs;
    with top-1 and out_dtype == act's dtype it is itself the result (no sum to do).
    """
    check_quantized(w2, "w2")
    t, top_k = weights.shape
    n_exp, h, inter = w2.shape
    cfg = config or get_config(act.device)["down_grouped"]
    y = _output(workspace, (t * top_k, h), act.dtype, act.device, "down_grouped workspace")
    bn, bk = _tiles(cfg, h, inter, w2.bits)
    grid = (grouping.max_blocks, triton.cdiv(h, bn))
    _down_grouped_kernel[grid](
        act, weights.reshape(-1).float().contiguous(),
        grouping.sorted_pairs, grouping.block_expert, grouping.block_row0, grouping.block_row_end,
        w2.qweight, w2.scales, _zeros_arg(w2), y,
        n_exp, h, inter, *row_lengths(w2),
        BITS=w2.bits, GROUP=w2.group_size,
        BLOCK_M=grouping.block_m, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(act.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if top_k == 1 and out_dtype == act.dtype:  # a plain linear (quantized_linear): nothing to sum
        return y.view(t, h)
    return y.view(t, top_k, h).sum(dim=1, dtype=torch.float32).to(out_dtype)


def moe_grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                w13: QuantizedWeight, w2: QuantizedWeight, config: dict | None = None) -> torch.Tensor:
    """Prefill path: x [T, H], weights/ids [T, K] -> [T, H] in x's dtype."""
    t, h, n_exp, inter, top_k = check_moe_inputs(x, weights, ids, w13, w2)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or get_config(x.device)
    # BM: the config's, but no taller than needed when few pairs reach an expert on average
    bm = max(16, min(cfg["gate_up_grouped"]["BLOCK_M"], triton.next_power_of_2(max(1, t * top_k // n_exp))))
    grouping = group_by_expert(ids, n_exp, bm)
    act = gate_up_grouped(x, grouping, top_k, w13, cfg["gate_up_grouped"])
    return down_grouped(act, weights, grouping, w2, x.dtype, cfg["down_grouped"])
