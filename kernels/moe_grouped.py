"""Prefill path: tokens grouped by expert, tensor-core tiles with on-the-fly dequantisation.

Names follow the package legend (``molmoe_lite.kernels``); pair p = t * TOP_K + choice;
``blocks`` is the number of grouped blocks (routing.group_by_expert).

The router's (token, choice) pairs are sorted by expert (routing.group_by_expert); each block
of BLOCK_M consecutive sorted rows belongs to one expert, and a block table gives every program
its (expert, first row, end row), so no pair is padded into the sorted array and blocks past
the real count exit at once.

1. ``_gate_up_grouped_kernel``: grid (blocks, cdiv(I, BLOCK_N)). A [BLOCK_M, BLOCK_K] tile of
   gathered token rows of x times dequantised [BLOCK_K, BLOCK_N] tiles of the expert's gate and
   up rows (tl.dot, fp32 accumulators), then act[p, n] = silu(gate) * up, stored by pair so the
   down pass (and the decode kernel) index it the same way.
2. ``_down_grouped_kernel``: grid (blocks, cdiv(H, BLOCK_N)): act rows of the block times W2[e]
   tiles, scaled by each pair's routing weight, stored to y[p, :]; the top-k sum is one small
   torch reduction y.view(T, TOP_K, H).sum(1) in fp32 (deterministic, unlike atomics).
int4 tiles are consumed as even and odd K-halves (dot(A[:, 0::2], W_lo) + dot(A[:, 1::2], W_hi)),
so a packed byte is loaded once and never re-interleaved in registers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from molmoe_lite.quantize.format import QuantizedWeight

from .checks import check_moe_inputs, check_quantized
from .configs import get_config
from .launch import out_buffer, row_lengths, zeros_arg
from .quant_tiles import dequant_int4_tile, dequant_int8_tile
from .routing import ExpertGrouping, group_by_expert


@triton.jit
def _dot_quantized(a, acc, q_base, s_base, z_base, wn, k0, N, qw_row_len, groups_per_row,
                   BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # acc + a [BLOCK_M, BLOCK_K] @ W[wn, k0:k0+BLOCK_K]^T, the weight tile dequantised in registers;
    # int4 takes a's even and odd columns against the low and high nibbles
    if BITS == 4:
        a_even, a_odd = tl.split(tl.reshape(a, [a.shape[0], BLOCK_K // 2, 2]))
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # [BLOCK_K/2] byte columns
        w_lo, w_hi = dequant_int4_tile(q_base, s_base, z_base, n=wn, j=j[:, None], k0=k0, N=N,
                                       qw_row_len=qw_row_len, groups_per_row=groups_per_row, GROUP=GROUP,
                                       BLOCK_K=BLOCK_K)
        acc = tl.dot(a_even, w_lo.to(a.dtype), acc, input_precision=PRECISION)
        acc = tl.dot(a_odd, w_hi.to(a.dtype), acc, input_precision=PRECISION)
    else:
        k = k0 + tl.arange(0, BLOCK_K)
        w = dequant_int8_tile(q_base, s_base, n=wn, k=k[:, None], k0=k0, N=N, qw_row_len=qw_row_len,
                              groups_per_row=groups_per_row, GROUP=GROUP, BLOCK_K=BLOCK_K)
        acc = tl.dot(a, w.to(a.dtype), acc, input_precision=PRECISION)
    return acc


@triton.jit
def _grouped_matmul_tile(a_ptr, a_rows, m_ok, stride_a,  # A rows: [BLOCK_M] row offsets into a_ptr
                         q_base, s_base, z_base, n_rows, n_up_rows, N, K, qw_row_len, groups_per_row,
                         FUSE_UP: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    # returns (A[rows, :K] @ W[n_rows, :K]^T, A[rows] @ W[n_up_rows]^T if FUSE_UP else zeros), fp32
    # [BLOCK_M, BLOCK_N] each; W is [N, K] quantised (quant_tiles: why its row lengths are
    # arguments). FUSE_UP serves gate and up from one load of A per K-step.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    a_row_ptr = a_ptr + a_rows[:, None] * stride_a  # [BLOCK_M, 1]
    wn = n_rows[None, :]  # [1, BLOCK_N]: tiles come out [BLOCK_K, BLOCK_N], the B operand of tl.dot
    wn_up = n_up_rows[None, :]
    kk = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + kk
        # contiguous rows: 128-bit loads, pipelined through shared memory (int4 splits them into
        # even and odd columns in registers; strided loads of each half would be 2-byte gathers)
        a = tl.load(a_row_ptr + k[None, :], mask=m_ok[:, None] & (k[None, :] < K), other=0.0)
        acc = _dot_quantized(a, acc, q_base, s_base, z_base, wn=wn, k0=k0, N=N, qw_row_len=qw_row_len,
                             groups_per_row=groups_per_row, BITS=BITS, GROUP=GROUP, BLOCK_K=BLOCK_K,
                             PRECISION=PRECISION)
        if FUSE_UP:
            acc_up = _dot_quantized(a, acc_up, q_base, s_base, z_base, wn=wn_up, k0=k0, N=N, qw_row_len=qw_row_len,
                                    groups_per_row=groups_per_row, BITS=BITS, GROUP=GROUP, BLOCK_K=BLOCK_K,
                                    PRECISION=PRECISION)
    return acc, acc_up


@triton.jit
def _block_rows(pairs_ptr, blk_e_ptr, blk_r0_ptr, blk_r1_ptr, blk, BLOCK_M: tl.constexpr):
    # the block's expert (E or more: past the real blocks), its pairs [BLOCK_M] and their mask
    e = tl.load(blk_e_ptr + blk)
    r = tl.load(blk_r0_ptr + blk) + tl.arange(0, BLOCK_M)  # [BLOCK_M] rows of the sorted pairs
    m_ok = r < tl.load(blk_r1_ptr + blk)
    pair = tl.load(pairs_ptr + r, mask=m_ok, other=0).to(tl.int64)
    return e, pair, m_ok


@triton.jit
def _gate_up_grouped_kernel(x_ptr,  # [T, H] activations, row stride stride_xt
                            pairs_ptr,  # [T * TOP_K] int32 pairs in expert order
                            blk_e_ptr, blk_r0_ptr, blk_r1_ptr,  # [blocks] int32 block table
                            qw_ptr, s_ptr, z_ptr,  # w13: [E, 2I, H/2 | H], [E, 2I, H/G] x2
                            act_ptr,  # [T * TOP_K, I] out, x's dtype
                            E, I, H, stride_xt,
                            qw_row_len, groups_per_row,  # of w13: H/2 | H, H/G
                            TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PRECISION: tl.constexpr):
    # map program ids: one block of one expert's pairs, BLOCK_N gate rows (and the up rows)
    e, pair, m_ok = _block_rows(pairs_ptr, blk_e_ptr, blk_r0_ptr, blk_r1_ptr, blk=tl.program_id(0), BLOCK_M=BLOCK_M)
    if e >= E:  # past the real number of blocks
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < I
    # pointers: the expert's slices of w13, the pairs' token rows
    e = e.to(tl.int64)
    n_rows = 2 * I
    q_base = qw_ptr + e * n_rows * qw_row_len
    s_base = s_ptr + e * n_rows * groups_per_row
    z_base = z_ptr + e * n_rows * groups_per_row
    tok = pair // TOP_K
    # loop over K (inside the tile helper): gate and up from one load of x
    gate, up = _grouped_matmul_tile(x_ptr, tok, m_ok, stride_xt, q_base, s_base, z_base,
                                    n_rows=tl.where(n_ok, n, n_rows), n_up_rows=tl.where(n_ok, n + I, n_rows),
                                    N=n_rows, K=H, qw_row_len=qw_row_len, groups_per_row=groups_per_row,
                                    FUSE_UP=True, BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                    BLOCK_K=BLOCK_K, PRECISION=PRECISION)  # rows >= 2I load nothing
    # write back: SwiGLU, by pair
    act = gate * tl.sigmoid(gate) * up
    out = act_ptr + pair[:, None] * I + n[None, :]
    tl.store(out, act.to(act_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_grouped_kernel(act_ptr,  # [T * TOP_K, I] x's dtype
                         w_ptr,  # [T * TOP_K] fp32 routing weights
                         pairs_ptr, blk_e_ptr, blk_r0_ptr, blk_r1_ptr,  # as in the gate+up kernel
                         qw_ptr, s_ptr, z_ptr,  # w2: [E, H, I/2 | I], [E, H, I/G] x2
                         y_ptr,  # [T * TOP_K, H] out: weighted expert output per pair
                         E, H, I,
                         qw_row_len, groups_per_row,  # of w2: I/2 | I, I/G
                         BITS: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         PRECISION: tl.constexpr):
    # map program ids: one block of one expert's pairs, BLOCK_N output rows
    e, pair, m_ok = _block_rows(pairs_ptr, blk_e_ptr, blk_r0_ptr, blk_r1_ptr, blk=tl.program_id(0), BLOCK_M=BLOCK_M)
    if e >= E:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # pointers: the expert's slices of w2 (act rows are the pairs themselves)
    e = e.to(tl.int64)
    q_base = qw_ptr + e * H * qw_row_len
    s_base = s_ptr + e * H * groups_per_row
    z_base = z_ptr + e * H * groups_per_row
    # loop over K (inside the tile helper)
    y, _ = _grouped_matmul_tile(act_ptr, pair, m_ok, I, q_base, s_base, z_base, n_rows=n, n_up_rows=n, N=H, K=I,
                                qw_row_len=qw_row_len, groups_per_row=groups_per_row, FUSE_UP=False, BITS=BITS,
                                GROUP=GROUP, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PRECISION=PRECISION)
    # write back: weighted by the pair's routing weight, one row per pair
    y = y * tl.load(w_ptr + pair, mask=m_ok, other=0.0)[:, None]
    out = y_ptr + pair[:, None] * H + n[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & (n[None, :] < H))


def _tiles(cfg: dict, n: int, k: int, bits: int) -> tuple[int, int]:
    # tl.dot needs inner size >= 16: int4 halves a K-step, so BLOCK_K >= 32 there
    bk_min = 32 if bits == 4 else 16
    bn = max(min(cfg["BLOCK_N"], triton.next_power_of_2(n)), 16)
    bk = max(min(cfg["BLOCK_K"], triton.next_power_of_2(k)), bk_min)
    return bn, bk


def _precision(dtype: torch.dtype) -> str:
    # fp32 activations: exact fp32 FMA products (tf32 would miss the 1e-3 tolerance)
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_table(grouping: ExpertGrouping) -> dict[str, torch.Tensor]:
    return {"pairs_ptr": grouping.sorted_pairs, "blk_e_ptr": grouping.block_expert,
            "blk_r0_ptr": grouping.block_row0, "blk_r1_ptr": grouping.block_row_end}


def gate_up_grouped(x: torch.Tensor, grouping: ExpertGrouping, top_k: int, w13: QuantizedWeight,
                    config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H] -> act [T * TOP_K, I] = silu(x gate^T) * (x up^T) per pair, in x's dtype."""
    check_quantized(w13, "w13")
    t, h = x.shape
    n_exp, inter = w13.shape[0], w13.shape[1] // 2
    cfg = config or get_config(x.device)["gate_up_grouped"]
    act = out_buffer(out, (t * top_k, inter), x.dtype, x.device, "gate_up_grouped")
    bn, bk = _tiles(cfg, inter, h, w13.bits)
    _gate_up_grouped_kernel[(grouping.max_blocks, triton.cdiv(inter, bn))](
        x_ptr=x, **_block_table(grouping), qw_ptr=w13.qweight, s_ptr=w13.scales, z_ptr=zeros_arg(w13), act_ptr=act,
        E=n_exp, I=inter, H=h, stride_xt=x.stride(0), **row_lengths(w13),
        TOP_K=top_k, BITS=w13.bits, GROUP=w13.group_size,
        BLOCK_M=grouping.block_m, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return act


def down_grouped(act: torch.Tensor, weights: torch.Tensor, grouping: ExpertGrouping, w2: QuantizedWeight,
                 out_dtype: torch.dtype, config: dict | None = None,
                 workspace: torch.Tensor | None = None) -> torch.Tensor:
    """act [T * TOP_K, I], weights [T, TOP_K] -> [T, H] = sum over choices of w * act[p] W2[e_p]^T.

    ``workspace``: optional contiguous [T * TOP_K, H] buffer in act's dtype for the per-pair
    outputs; with top-1 and out_dtype == act's dtype it is itself the result (no sum to do).
    """
    check_quantized(w2, "w2")
    t, top_k = weights.shape
    n_exp, h, inter = w2.shape
    cfg = config or get_config(act.device)["down_grouped"]
    y = out_buffer(workspace, (t * top_k, h), act.dtype, act.device, "down_grouped workspace")
    bn, bk = _tiles(cfg, h, inter, w2.bits)
    _down_grouped_kernel[(grouping.max_blocks, triton.cdiv(h, bn))](
        act_ptr=act, w_ptr=weights.reshape(-1).float().contiguous(), **_block_table(grouping),
        qw_ptr=w2.qweight, s_ptr=w2.scales, z_ptr=zeros_arg(w2), y_ptr=y,
        E=n_exp, H=h, I=inter, **row_lengths(w2),
        BITS=w2.bits, GROUP=w2.group_size,
        BLOCK_M=grouping.block_m, BLOCK_N=bn, BLOCK_K=bk, PRECISION=_precision(act.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if top_k == 1 and out_dtype == act.dtype:  # a plain linear (quantized_linear): nothing to sum
        return y.view(t, h)
    return y.view(t, top_k, h).sum(dim=1, dtype=torch.float32).to(out_dtype)


def moe_grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                w13: QuantizedWeight, w2: QuantizedWeight, config: dict | None = None) -> torch.Tensor:
    """Prefill path: x [T, H], weights/ids [T, TOP_K] -> [T, H] in x's dtype."""
    t, h, n_exp, inter, top_k = check_moe_inputs(x, weights, ids, w13, w2)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or get_config(x.device)
    # BLOCK_M: the config's, but no taller than needed when few pairs reach an expert on average
    bm = max(16, min(cfg["gate_up_grouped"]["BLOCK_M"], triton.next_power_of_2(max(1, t * top_k // n_exp))))
    grouping = group_by_expert(ids, n_exp, bm)
    act = gate_up_grouped(x, grouping, top_k, w13, cfg["gate_up_grouped"])
    return down_grouped(act, weights, grouping, w2, x.dtype, cfg["down_grouped"])


def linear_grouped(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w: QuantizedWeight,
                   config: dict) -> torch.Tensor:
    """A quantised linear as the down kernel with one expert: x [T, K] contiguous, w [1, N, K]."""
    grouping = group_by_expert(ids, 1, config["down_grouped"]["BLOCK_M"])
    return down_grouped(x, weights, grouping, w, x.dtype, config["down_grouped"])


# the interface fused_moe.expert_path hands out (moe_gemv offers the same)
moe = moe_grouped
linear = linear_grouped
