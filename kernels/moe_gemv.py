"""Decode path (few tokens): quantised expert GEMVs, no sort and no padding.

Names follow the package legend (``molmoe_lite.kernels``); pair p = t * TOP_K + choice indexes
the router's (token, chosen expert) pairs.

1. ``_gate_up_gemv_kernel``: grid (T * TOP_K, cdiv(I, BLOCK_N)). A program reads the token's x
   once per K-step and the matching gate rows n and up rows I + n of its expert (int4 nibbles
   or int8 codes read directly; scales and zero points applied once per group, see
   quant_tiles' GEMV steps), accumulates both in fp32 and writes act[p, n] = silu(gate) * up.
   Gate and up of a row meet in the same program, so SwiGLU needs no extra pass and the
   [T * TOP_K, 2I] pre-activation is never stored.
2. ``_down_gemv_kernel``: grid (T * SPLIT, cdiv(H, BLOCK_N)). A program owns BLOCK_N output rows
   of one token and loops over its share (1 / SPLIT) of the token's TOP_K experts, adding
   w * (act[p] . W2[e, n, :]) in fp32. With SPLIT = 1 it stores the result; with SPLIT > 1
   (small grids on big GPUs, ``expert_split``) it stores its partial sum and counts its
   arrival atomically, and the last of the SPLIT programs adds the partials in a fixed order
   and stores. Either way the routing weight and the top-k sum are fused and the result is
   deterministic.
At batch 1 the work is reading weights, so the tiles are wide along K (contiguous bytes) and
short along N; on CUDA, BLOCK_N is traded for BLOCK_K until the grid has >= 4 programs per SM
(tiles chosen from the device's SM count, ``decode_tiles``); see configs.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from molmoe_lite.errors import MolmoeLiteError
from molmoe_lite.quantize.format import QuantizedWeight

from .checks import check_moe_inputs, check_quantized
from .configs import get_config
from .launch import device_sms, out_buffer, row_lengths, zeros_arg
from .quant_tiles import gemv_step


@triton.jit
def _gate_up_gemv_kernel(x_ptr,  # [T, H] activations (fp16/bf16/fp32), row stride stride_xt
                         ids_ptr,  # [T * TOP_K] int expert of each pair
                         qw_ptr,  # int4: uint8 [E, 2I, H/2]; int8: int8 [E, 2I, H]
                         s_ptr,  # fp16 [E, 2I, H/G]
                         z_ptr,  # fp16 [E, 2I, H/G] (int4 only; never read for int8)
                         act_ptr,  # [T * TOP_K, I] out, x's dtype
                         I, H, stride_xt,
                         qw_row_len, groups_per_row,  # of w13: H/2 | H, H/G
                         TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # map program ids: one pair, BLOCK_N gate rows (and the matching up rows)
    pair = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] gate rows; up rows are I + n
    n_ok = n < I
    # pointers: the pair's token row and its expert's slices of w13
    tok = (pair // TOP_K).to(tl.int64)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    n_rows = 2 * I
    q_base = qw_ptr + e * n_rows * qw_row_len
    s_base = s_ptr + e * n_rows * groups_per_row
    z_base = z_ptr + e * n_rows * groups_per_row
    x_row = x_ptr + tok * stride_xt
    rows_gate = tl.where(n_ok, n, n_rows)  # rows >= 2I load nothing
    rows_up = tl.where(n_ok, n + I, n_rows)
    # loop over K: gate and up share each step's x
    acc_gate = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        acc_gate += gemv_step(q_base, s_base, z_base, x_row, rows=rows_gate, k0=k0, N=n_rows, qw_row_len=qw_row_len,
                              groups_per_row=groups_per_row, BITS=BITS, GROUP=GROUP, BLOCK_K=BLOCK_K)
        acc_up += gemv_step(q_base, s_base, z_base, x_row, rows=rows_up, k0=k0, N=n_rows, qw_row_len=qw_row_len,
                            groups_per_row=groups_per_row, BITS=BITS, GROUP=GROUP, BLOCK_K=BLOCK_K)
    # write back: SwiGLU of the pair's rows
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    tl.store(act_ptr + pair.to(tl.int64) * I + n, act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _weighted_expert_rows(act_ptr, ids_ptr, w_ptr, qw_ptr, s_ptr, z_ptr, tok, n, first, end, H, I,
                          qw_row_len, groups_per_row, TOP_K: tl.constexpr, BITS: tl.constexpr,
                          GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # sum over the token's choices first..end-1 of w * (act[p] . W2[e, n, :]), fp32 [BLOCK_N]
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for choice in range(first, end):
        pair = tok * TOP_K + choice
        e = tl.load(ids_ptr + pair).to(tl.int64)
        a_row = act_ptr + pair * I
        q_base = qw_ptr + e * H * qw_row_len
        s_base = s_ptr + e * H * groups_per_row
        z_base = z_ptr + e * H * groups_per_row
        part = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            part += gemv_step(q_base, s_base, z_base, a_row, rows=n, k0=k0, N=H, qw_row_len=qw_row_len,
                              groups_per_row=groups_per_row, BITS=BITS, GROUP=GROUP, BLOCK_K=BLOCK_K)
        acc += tl.load(w_ptr + pair).to(tl.float32) * part
    return acc


@triton.jit
def _down_gemv_kernel(act_ptr,  # [T * TOP_K, I] x's dtype
                      ids_ptr,  # [T * TOP_K] int
                      w_ptr,  # [T * TOP_K] fp32 routing weights
                      qw_ptr,  # int4: uint8 [E, H, I/2]; int8: int8 [E, H, I]
                      s_ptr,  # fp16 [E, H, I/G]
                      z_ptr,  # fp16 [E, H, I/G] (int4 only)
                      out_ptr,  # [T, H] out, row stride stride_ot
                      partial_ptr,  # fp32 [SPLIT, T, H]: each split's sum (SPLIT > 1 only)
                      count_ptr,  # int32 [T * cdiv(H, BLOCK_N)]: splits done per output tile, 0 between calls
                      T, H, I, stride_ot,
                      qw_row_len, groups_per_row,  # of w2: I/2 | I, I/G
                      TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    # map program ids: a token, this program's share of its choices, BLOCK_N output rows
    tok = (tl.program_id(0) // SPLIT).to(tl.int64)
    split = tl.program_id(0) % SPLIT
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output rows
    n_ok = n < H
    per_split: tl.constexpr = (TOP_K + SPLIT - 1) // SPLIT
    # loop over the share's experts (pointers per expert inside)
    acc = _weighted_expert_rows(act_ptr, ids_ptr, w_ptr, qw_ptr, s_ptr, z_ptr, tok=tok, n=n,
                                first=split * per_split, end=tl.minimum((split + 1) * per_split, TOP_K),
                                H=H, I=I, qw_row_len=qw_row_len, groups_per_row=groups_per_row, TOP_K=TOP_K,
                                BITS=BITS, GROUP=GROUP, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    # write back: directly, or through the partials and the last split to arrive
    if SPLIT == 1:
        tl.store(out_ptr + tok * stride_ot + n, acc.to(out_ptr.dtype.element_ty), mask=n_ok)
    else:
        tl.store(partial_ptr + (split * T + tok) * H + n, acc, mask=n_ok)
        tile = tok * tl.num_programs(1) + pid_n
        # every warp's partial stores come before the one thread that counts the arrival; acq_rel:
        # the partial is visible before its arrival is counted, and the last split to arrive sees
        # every partial (read past L1, which is not coherent across SMs)
        tl.debug_barrier()
        done = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            total = tl.zeros([BLOCK_N], dtype=tl.float32)
            for j in range(SPLIT):  # a fixed order: the result does not depend on arrival order
                total += tl.load(partial_ptr + (j * T + tok) * H + n, mask=n_ok, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + tok * stride_ot + n, total.to(out_ptr.dtype.element_ty), mask=n_ok)
            tl.store(count_ptr + tile, 0)  # ready for the next call (or graph replay)


def decode_tiles(cfg: dict, rows: int, k: int, bits: int, other_programs: int,
                 sms: int | None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of a decode launch over ``rows`` output rows of length ``k``.

    The table's tiles, clipped to the matrix. With an SM count (CUDA), BLOCK_N is halved (down
    to 4) until the grid has >= 4 programs per SM, since at T = 1 the grid is small and a GEMV
    only nears the bandwidth limit when every SM has loads in flight; each halving doubles
    BLOCK_K (up to the row), so a program's tile keeps its size: each thread still issues
    128-bit loads and the bytes in flight across the GPU grow with the grid instead of staying
    put. aot.py compiles these T = 1 shapes too. A config with ``"fill_sms": 0`` is launched
    exactly as given (the launch sweep, or a pin in MOLMOE_LITE_KERNEL_CONFIG).
    """
    k_max = triton.next_power_of_2(k)
    bn = min(cfg["BLOCK_N"], triton.next_power_of_2(rows))
    # int4 needs an even split into nibble halves
    bk = max(min(cfg["BLOCK_K"], k_max), 4 if bits == 4 else 2)
    if sms and cfg.get("fill_sms", 1):
        while bn > 4 and other_programs * triton.cdiv(rows, bn) < 4 * sms:
            bn //= 2
            bk = max(min(2 * bk, k_max), bk)
    return bn, bk


def expert_split(cfg: dict, top_k: int, programs: int, sms: int | None) -> int:
    """Into how many parts the down kernel splits each token's TOP_K experts (grid axis 0).

    One part loops over all TOP_K experts, so only one expert's tile per program is in flight;
    at T = 1 that is H x BLOCK_K/2 bytes across the whole GPU, short of what a big GPU needs to
    reach its bandwidth. Splitting multiplies the programs; the parts' sums meet in a fixed
    order in the last part to finish (deterministic, no extra launch). On CUDA: doubled until
    the grid has >= 8 programs per SM; off CUDA 1; ``EXPERT_SPLIT`` in the config pins it.
    """
    if "EXPERT_SPLIT" in cfg:
        return max(1, min(int(cfg["EXPERT_SPLIT"]), top_k))
    split = 1
    if sms:
        while split < top_k and programs * split < 8 * sms:
            split *= 2
    return min(split, top_k)


class GraphCaptureError(MolmoeLiteError, RuntimeError):
    """Something the kernels must set up outside a CUDA graph capture was first needed inside one."""


_ARRIVALS: dict[tuple[torch.device, int, int], torch.Tensor] = {}


def _capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (never off CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` zeroed int32 counters, one per output tile, kept per (device, n, stream) for the
    process: the kernel leaves them at zero, so no memset runs per call and a CUDA graph
    replays without one; never freed, so a captured graph's pointer stays valid. Per stream,
    so launches that may overlap (other streams) never share counters; launches on one stream
    are ordered. Never created inside a graph capture: there the zero-fill would only be
    recorded, and if the capture failed the counters would stay unzeroed for later launches;
    a capture must follow an eager step on its own stream (a warm-up)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, n, stream)
    if key not in _ARRIVALS:
        if _capturing():
            raise GraphCaptureError(
                "down kernel: its arrival counters would be created inside a CUDA graph capture; "
                "run the step once on the capture stream before capturing it")
        _ARRIVALS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _ARRIVALS[key]


def gate_up_gemv(x: torch.Tensor, ids: torch.Tensor, w13: QuantizedWeight, config: dict | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], ids [T, TOP_K] -> act [T * TOP_K, I] = silu(x gate^T) * (x up^T), in x's dtype.

    ``out``: an optional preallocated contiguous [T * TOP_K, I] buffer (static buffers for CUDA graphs).
    """
    check_quantized(w13, "w13")
    t, h = x.shape
    top_k = ids.shape[1]
    inter = w13.shape[1] // 2
    cfg = config or get_config(x.device)["gate_up_decode"]
    act = out_buffer(out, (t * top_k, inter), x.dtype, x.device, "gate_up_gemv")
    if t == 0:
        return act
    bn, bk = decode_tiles(cfg, inter, h, w13.bits, t * top_k, device_sms(x.device))
    _gate_up_gemv_kernel[(t * top_k, triton.cdiv(inter, bn))](
        x_ptr=x, ids_ptr=ids.reshape(-1), qw_ptr=w13.qweight, s_ptr=w13.scales, z_ptr=zeros_arg(w13), act_ptr=act,
        I=inter, H=h, stride_xt=x.stride(0), **row_lengths(w13),
        TOP_K=top_k, BITS=w13.bits, GROUP=w13.group_size, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return act


def down_gemv(act: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w2: QuantizedWeight,
              out_dtype: torch.dtype, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """act [T * TOP_K, I], weights/ids [T, TOP_K] -> [T, H] = sum over choices of w * act[p] W2[e]^T.

    ``out``: an optional preallocated [T, H] buffer (rows may be strided, columns contiguous).
    """
    check_quantized(w2, "w2")
    t, top_k = ids.shape
    h, inter = w2.shape[1], w2.shape[2]
    cfg = config or get_config(act.device)["down_decode"]
    out = out_buffer(out, (t, h), out_dtype, act.device, "down_gemv", rows_strided=True)
    if t == 0:
        return out
    sms = device_sms(act.device)
    bn, bk = decode_tiles(cfg, h, inter, w2.bits, t, sms)
    tiles = triton.cdiv(h, bn)
    split = expert_split(cfg, top_k, t * tiles, sms)
    if split > 1:
        partial = torch.empty(split, t, h, dtype=torch.float32, device=act.device)
        counts = _arrival_counters(act.device, t * tiles)
    else:
        partial = counts = out  # never touched
    _down_gemv_kernel[(t * split, tiles)](
        act_ptr=act, ids_ptr=ids.reshape(-1), w_ptr=weights.reshape(-1).float().contiguous(), qw_ptr=w2.qweight,
        s_ptr=w2.scales, z_ptr=zeros_arg(w2), out_ptr=out, partial_ptr=partial, count_ptr=counts,
        T=t, H=h, I=inter, stride_ot=out.stride(0), **row_lengths(w2),
        TOP_K=top_k, BITS=w2.bits, GROUP=w2.group_size, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def moe_gemv(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
             w13: QuantizedWeight, w2: QuantizedWeight, config: dict | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode path: x [T, H], weights/ids [T, TOP_K] -> [T, H] in x's dtype."""
    check_moe_inputs(x, weights, ids, w13, w2)
    if x.stride(1) != 1:
        x = x.contiguous()
    ids = ids.contiguous()
    cfg = config or get_config(x.device)
    act = gate_up_gemv(x, ids, w13, cfg["gate_up_decode"])
    return down_gemv(act, weights, ids, w2, x.dtype, cfg["down_decode"], out=out)


def linear_gemv(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w: QuantizedWeight,
                config: dict) -> torch.Tensor:
    """A quantised linear as the down kernel with one expert: x [T, K] contiguous, w [1, N, K]."""
    return down_gemv(x, weights, ids, w, x.dtype, config["down_decode"])


# the interface fused_moe.expert_path hands out (moe_grouped offers the same)
moe = moe_gemv
linear = linear_gemv
