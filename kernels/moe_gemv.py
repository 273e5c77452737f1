"""Decode path (few tokens): quantised expert GEMVs, two launches, no sort and no padding.

Shapes: T tokens, E experts, K top-k, H hidden, I expert hidden, G group size;
pair p = t * K + k indexes the (token, k) choices of the router.

1. ``_gate_up_gemv_kernel``: grid (T*K, cdiv(I, BLOCK_N)). A program reads the token's x once
   per K-step and the matching gate rows n and up rows I + n of its expert (int4 nibbles or int8
   codes read directly; scales and zero points applied once per group, see quant_tiles'
   GEMV steps), accumulates both in fp32 and writes
   act[p, n] = silu(gate) * up. Gate and up of a row meet in the same program, so SwiGLU needs
   no extra pass and the [T*K, 2I] pre-activation is never stored.
2. ``_down_gemv_kernel``: grid (T * S, cdiv(H, BLOCK_N)). A program owns BLOCK_N output rows
   of one token and loops over its share (1/S) of the token's K experts, adding
   w_k * (act[p] . W2[e, n, :]) in fp32. With S = 1 it stores the result; with S > 1 (small
   grids on big GPUs, ``expert_split``) it stores its partial sum and counts its arrival
   atomically, and the last of the S programs adds the partials in a fixed order and stores.
   Either way the routing weight and the top-k sum are fused and the result is deterministic.
At batch 1 the work is reading weights, so the tiles are wide along K (contiguous bytes) and
short along N; on CUDA, BLOCK_N is traded for BLOCK_K until the grid has >= 4 programs per SM
(tiles chosen from the device's SM count, ``decode_tiles``); see configs.py.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from molmoe_lite.quantize.format import QuantizedWeight

from .configs import get_config
from .quant_tiles import int4_gemv_step, int8_gemv_step
from .reference import MoEInputError, check_moe_inputs


@triton.jit
def _gate_up_gemv_kernel(x_ptr,  # [T, H] activations (fp16/bf16/fp32), row stride stride_xt
                         ids_ptr,  # [T*K] int expert of each pair
                         qw_ptr,  # int4: uint8 [E, 2I, H/2]; int8: int8 [E, 2I, H]
                         s_ptr,  # fp16 [E, 2I, H/G]
                         z_ptr,  # fp16 [E, 2I, H/G] (int4 only; any pointer for int8)
                         act_ptr,  # [T*K, I] out, x's dtype
                         I, H, stride_xt,
                         QK, NG,  # qweight row length (H/2 | H), groups per row (H/G)
                         TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)
    pid_n = tl.program_id(1)
    tok = (pair // TOP_K).to(tl.int64)
    e = tl.load(ids_ptr + pair).to(tl.int64)
    n_rows = 2 * I
    s_base = s_ptr + e * n_rows * NG
    z_base = z_ptr + e * n_rows * NG
    q_base = qw_ptr + e * n_rows * QK
    x_row = x_ptr + tok * stride_xt
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] gate rows; up rows are I + n
    n_ok = n < I
    rows_g = tl.where(n_ok, n, n_rows)  # rows >= 2I load nothing
    rows_u = tl.where(n_ok, n + I, n_rows)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        if BITS == 4:
            acc_g += int4_gemv_step(q_base, s_base, z_base, x_row, rows_g, k0, n_rows, QK, NG, GROUP, BLOCK_K)
            acc_u += int4_gemv_step(q_base, s_base, z_base, x_row, rows_u, k0, n_rows, QK, NG, GROUP, BLOCK_K)
        else:
            acc_g += int8_gemv_step(q_base, s_base, x_row, rows_g, k0, n_rows, QK, NG, GROUP, BLOCK_K)
            acc_u += int8_gemv_step(q_base, s_base, x_row, rows_u, k0, n_rows, QK, NG, GROUP, BLOCK_K)
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    tl.store(act_ptr + pair.to(tl.int64) * I + n, act.to(act_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _down_gemv_kernel(act_ptr,  # [T*K, I] x's dtype
                      ids_ptr,  # [T*K] int
                      w_ptr,  # [T*K] fp32 routing weights
                      qw_ptr,  # int4: uint8 [E, H, I/2]; int8: int8 [E, H, I]
                      s_ptr,  # fp16 [E, H, I/G]
                      z_ptr,  # fp16 [E, H, I/G] (int4 only)
                      out_ptr,  # [T, H] out, row stride stride_ot
                      partial_ptr,  # fp32 [SPLIT, T, H]: each split's sum (SPLIT > 1 only)
                      count_ptr,  # int32 [T * cdiv(H, BLOCK_N)]: splits done per output tile, 0 between calls
                      T, H, I, stride_ot,
                      QK, NG,  # qweight row length (I/2 | I), groups per row (I/G)
                      TOP_K: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    tok = (tl.program_id(0) // SPLIT).to(tl.int64)
    split = tl.program_id(0) % SPLIT  # this program's share of the token's experts
    pid_n = tl.program_id(1)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output rows
    n_ok = n < H
    per_split: tl.constexpr = (TOP_K + SPLIT - 1) // SPLIT
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for kt in range(split * per_split, tl.minimum((split + 1) * per_split, TOP_K)):
        pair = tok * TOP_K + kt
        e = tl.load(ids_ptr + pair).to(tl.int64)
        wt = tl.load(w_ptr + pair).to(tl.float32)
        a_row = act_ptr + pair * I
        s_base = s_ptr + e * H * NG
        z_base = z_ptr + e * H * NG
        q_base = qw_ptr + e * H * QK
        part = tl.zeros([BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            if BITS == 4:
                part += int4_gemv_step(q_base, s_base, z_base, a_row, n, k0, H, QK, NG, GROUP, BLOCK_K)
            else:
                part += int8_gemv_step(q_base, s_base, a_row, n, k0, H, QK, NG, GROUP, BLOCK_K)
        acc += wt * part
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


def _output(out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
            name: str, rows_strided: bool = False) -> torch.Tensor:
    """A fresh buffer, or the caller's after checking it matches."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    layout_ok = out.stride(-1) == 1 if rows_strided else out.is_contiguous()
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device or not layout_ok:
        raise MoEInputError(
            f"{name}: out must be {'row-major' if rows_strided else 'contiguous'} {shape} {dtype} on {device}, "
            f"got {tuple(out.shape)} {out.dtype} on {out.device} strides {out.stride()}")
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_sms(device: torch.device) -> int | None:
    """The SM count of a CUDA device; None elsewhere (the interpreter keeps the table's tiles)."""
    if device.type != "cuda":
        return None
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def decode_tiles(cfg: dict, rows: int, k: int, bits: int, other_programs: int,
                 sms: int | None) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_K) of a decode launch over ``rows`` output rows of length ``k``.

    The table's tiles, clipped to the matrix. With an SM count (CUDA), BLOCK_N is halved (down
    to 4) until the grid has >= 4 programs per SM, since at T = 1 the grid is small and a GEMV
    only nears the bandwidth limit when every SM has loads in flight; each halving doubles
    BLOCK_K (up to the row), so a program's tile keeps its size: each thread still issues
    128-bit loads and the bytes in flight across the GPU grow with the grid instead of staying
    put. aot.py compiles these T = 1 shapes too. A config with ``"fill_sms": 0`` is launched
    exactly as given (benchmarks/sweep_decode.py, or a pin in MOLMOE_LITE_KERNEL_CONFIG).
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
    """Into how many parts the down kernel splits each token's top-k experts (grid axis 0).

    One part loops over all K experts, so only one expert's tile per program is in flight; at
    T = 1 that is H x BLOCK_K/2 bytes across the whole GPU (1 MB for MolmoE), short of what a
    big GPU needs to reach its bandwidth. Splitting multiplies the programs; the parts' sums
    meet in a fixed order in the last part to finish (deterministic, no extra launch). On
    CUDA: doubled until the grid has >= 8 programs per SM; off CUDA 1; ``EXPERT_SPLIT`` in the
    config pins it.
    """
    if "EXPERT_SPLIT" in cfg:
        return max(1, min(int(cfg["EXPERT_SPLIT"]), top_k))
    split = 1
    if sms:
        while split < top_k and programs * split < 8 * sms:
            split *= 2
    return min(split, top_k)


_ARRIVALS: dict[tuple[torch.device, int, int], torch.Tensor] = {}


def _arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """``n`` zeroed int32 counters, one per output tile, kept per (device, n, stream) for the
    process: the kernel leaves them at zero, so no memset runs per call and a CUDA graph
    replays without one; never freed, so a captured graph's pointer stays valid. Per stream,
    so launches that may overlap (other streams) never share counters; launches on one stream
    are ordered. A first call inside a capture allocates from the graph's pool, which the
    dictionary's reference keeps alive."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, n, stream)
    if key not in _ARRIVALS:
        _ARRIVALS[key] = torch.zeros(n, dtype=torch.int32, device=device)
    return _ARRIVALS[key]


def row_lengths(qw: QuantizedWeight) -> tuple[int, int]:
    """(qweight row length, groups per row): passed as arguments so that Triton can see they
    are multiples of 16 (aligned 128-bit loads), see quant_tiles."""
    return qw.qweight.shape[-1], qw.scales.shape[-1]


def _zeros_arg(qw: QuantizedWeight) -> torch.Tensor:
    return qw.zeros if qw.zeros is not None else qw.scales  # int8: never read


def gate_up_gemv(x: torch.Tensor, ids: torch.Tensor, w13: QuantizedWeight, config: dict | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, H], ids [T, K] -> act [T*K, I] = silu(x gate^T) * (x up^T), in x's dtype.

    ``out``: an optional preallocated contiguous [T*K, I] buffer (static buffers for CUDA graphs).
    """
    check_quantized(w13, "w13")
    t, h = x.shape
    top_k = ids.shape[1]
    inter = w13.shape[1] // 2
    cfg = config or get_config(x.device)["gate_up_decode"]
    act = _output(out, (t * top_k, inter), x.dtype, x.device, "gate_up_gemv")
    if t == 0:
        return act
    bn, bk = decode_tiles(cfg, inter, h, w13.bits, t * top_k, device_sms(x.device))
    grid = (t * top_k, triton.cdiv(inter, bn))
    _gate_up_gemv_kernel[grid](
        x, ids.reshape(-1), w13.qweight, w13.scales, _zeros_arg(w13), act,
        inter, h, x.stride(0), *row_lengths(w13),
        TOP_K=top_k, BITS=w13.bits, GROUP=w13.group_size, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return act


def down_gemv(act: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w2: QuantizedWeight,
              out_dtype: torch.dtype, config: dict | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """act [T*K, I], weights/ids [T, K] -> [T, H] = sum_k w_k * act[t, k] W2[e_k]^T.

    ``out``: an optional preallocated [T, H] buffer (rows may be strided, columns contiguous).
    """
    check_quantized(w2, "w2")
    t, top_k = ids.shape
    h, inter = w2.shape[1], w2.shape[2]
    cfg = config or get_config(act.device)["down_decode"]
    out = _output(out, (t, h), out_dtype, act.device, "down_gemv", rows_strided=True)
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
        act, ids.reshape(-1), weights.reshape(-1).float().contiguous(), w2.qweight, w2.scales, _zeros_arg(w2), out,
        partial, counts, t, h, inter, out.stride(0), *row_lengths(w2),
        TOP_K=top_k, BITS=w2.bits, GROUP=w2.group_size, BLOCK_N=bn, BLOCK_K=bk, SPLIT=split,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out


def moe_gemv(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
             w13: QuantizedWeight, w2: QuantizedWeight, config: dict | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode path: x [T, H], weights/ids [T, K] -> [T, H] in x's dtype; two launches."""
    check_moe_inputs(x, weights, ids, w13, w2)
    if x.stride(1) != 1:
        x = x.contiguous()
    ids = ids.contiguous()
    cfg = config or get_config(x.device)
    act = gate_up_gemv(x, ids, w13, cfg["gate_up_decode"])
    return down_gemv(act, weights, ids, w2, x.dtype, cfg["down_decode"], out=out)
