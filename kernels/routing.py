"""Fused router: softmax over experts + top-k in one launch; prefill grouping of tokens by expert.

Names follow the package legend (``molmoe_lite.kernels``); BLOCK_M rows per grouped block.

``topk_softmax``: one program per token holds all E logits in one block (E <= a few hundred),
takes the softmax in fp32 and extracts the TOP_K largest by TOP_K rounds of (max, lowest index
attaining it, mask it out) -- so exact ties go to the lowest expert id, like the reference's
stable sort. No host sync: the decode path calls this and goes straight to the expert GEMVs.

``group_by_expert``: for the prefill path, the (token, choice) pairs sorted by expert (stable, so
token order is kept inside an expert), per-expert counts and offsets, and a block table that
maps each grouped-GEMM program to (expert, first row, end row). Torch ops only, no host sync:
the number of blocks is bounded from shapes alone (cdiv(T * TOP_K, BLOCK_M) + min(E, T * TOP_K)); programs past
the real count see expert id E and exit without touching memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .checks import MoEInputError


@triton.jit
def _topk_softmax_kernel(logits_ptr,  # [T, E] any float dtype, row stride stride_t
                         weights_ptr,  # [T, TOP_K] fp32 out
                         ids_ptr,  # [T, TOP_K] int32 out
                         E, stride_t,
                         TOP_K: tl.constexpr, BLOCK_TOP_K: tl.constexpr, BLOCK_E: tl.constexpr,
                         RENORMALIZE: tl.constexpr):
    # map program ids: one token, all its E logits
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < E
    # softmax in fp32
    x = tl.load(logits_ptr + t * stride_t + offs, mask=valid, other=float("-inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)
    ex = tl.where(valid, tl.exp(x), 0.0)
    p = ex / tl.sum(ex, axis=0)
    # padded lanes can never be picked (-1 < any probability)
    p = tl.where(valid, p, -1.0)
    # loop over the choices: the TOP_K winners collect in registers and are stored once
    offs_choice = tl.arange(0, BLOCK_TOP_K)
    top_w = tl.zeros([BLOCK_TOP_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_TOP_K], dtype=tl.int32)
    for choice in tl.static_range(TOP_K):
        m = tl.max(p, axis=0)
        # min(..., E - 1): a NaN row matches nothing; it still yields an in-range id (and a NaN
        # weight), never an expert past the weight tensor
        idx = tl.minimum(tl.min(tl.where(p == m, offs, BLOCK_E), axis=0), E - 1)
        top_w = tl.where(offs_choice == choice, m, top_w)
        top_i = tl.where(offs_choice == choice, idx, top_i)
        p = tl.where(offs == idx, -2.0, p)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=0)
    # write back
    chosen = offs_choice < TOP_K
    tl.store(weights_ptr + t * TOP_K + offs_choice, top_w, mask=chosen)
    tl.store(ids_ptr + t * TOP_K + offs_choice, top_i, mask=chosen)


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool = False,
                 out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights fp32 [T, TOP_K], ids int32 [T, TOP_K]); one Triton launch.

    ``out``: optional preallocated contiguous (weights fp32 [T, TOP_K], ids int32 [T, TOP_K]).
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise MoEInputError(
            f"topk_softmax: router logits must be [T, E] with contiguous rows, got shape "
            f"{tuple(logits.shape)} strides {logits.stride()}")
    t, n_exp = logits.shape
    if not 1 <= top_k <= n_exp:
        raise MoEInputError(f"topk_softmax: top_k={top_k} must be in [1, {n_exp}] (number of experts)")
    if out is None:
        weights = torch.empty(t, top_k, dtype=torch.float32, device=logits.device)
        ids = torch.empty(t, top_k, dtype=torch.int32, device=logits.device)
    else:
        weights, ids = out
        if (weights.shape != (t, top_k) or ids.shape != (t, top_k) or weights.dtype != torch.float32
                or ids.dtype != torch.int32 or not (weights.is_contiguous() and ids.is_contiguous())):
            raise MoEInputError(f"topk_softmax: out must be contiguous (fp32, int32) tensors of shape {(t, top_k)}")
    if t == 0:
        return weights, ids
    block_e = max(triton.next_power_of_2(n_exp), 16)
    _topk_softmax_kernel[(t,)](logits_ptr=logits, weights_ptr=weights, ids_ptr=ids, E=n_exp, stride_t=logits.stride(0),
                               TOP_K=top_k, BLOCK_TOP_K=triton.next_power_of_2(top_k), BLOCK_E=block_e,
                               RENORMALIZE=renormalize,
                               num_warps=1 if block_e <= 128 else 4)
    return weights, ids


@dataclass
class ExpertGrouping:
    """(token, choice) pairs grouped by expert, for the grouped kernels. Pair p = token * TOP_K + choice."""

    sorted_pairs: torch.Tensor  # [T * TOP_K] int32, pairs in expert order (stable)
    counts: torch.Tensor  # [E] int32, pairs per expert
    offsets: torch.Tensor  # [E + 1] int32, start of each expert in sorted_pairs
    block_expert: torch.Tensor  # [blocks] int32, expert of each block (E: unused block)
    block_row0: torch.Tensor  # [blocks] int32, first row of the block in sorted_pairs
    block_row_end: torch.Tensor  # [blocks] int32, end (exclusive) of the block's expert rows
    block_m: int

    @property
    def max_blocks(self) -> int:
        return self.block_expert.shape[0]


def group_by_expert(ids: torch.Tensor, n_experts: int, block_m: int) -> ExpertGrouping:
    """ids [T, TOP_K] -> ExpertGrouping with blocks of ``block_m`` rows; no host sync."""
    flat = ids.reshape(-1).to(torch.int64)  # [T * TOP_K]
    n_pairs = flat.numel()
    dev = ids.device
    sorted_ids, order = torch.sort(flat, stable=True)
    # offsets by binary search on the sorted ids: avoids bincount's device->host size query
    bounds = torch.searchsorted(sorted_ids, torch.arange(n_experts + 1, device=dev, dtype=torch.int64))
    counts = bounds[1:] - bounds[:-1]  # [E]
    blocks_per = (counts + block_m - 1) // block_m  # [E]
    block_end = torch.cumsum(blocks_per, 0)  # [E], inclusive
    max_blocks = (n_pairs + block_m - 1) // block_m + min(n_experts, n_pairs)
    b = torch.arange(max_blocks, device=dev, dtype=torch.int64)
    block_expert = torch.searchsorted(block_end, b, right=True)  # [blocks], E past the last block
    e_c = block_expert.clamp(max=n_experts - 1)
    first_block = block_end[e_c] - blocks_per[e_c]
    used = block_expert < n_experts
    row0 = torch.where(used, bounds[e_c] + (b - first_block) * block_m, 0)
    row_end = torch.where(used, bounds[e_c + 1], 0)
    return ExpertGrouping(
        sorted_pairs=order.to(torch.int32),
        counts=counts.to(torch.int32),
        offsets=bounds.to(torch.int32),
        block_expert=block_expert.to(torch.int32),
        block_row0=row0.to(torch.int32),
        block_row_end=row_end.to(torch.int32),
        block_m=block_m,
    )
