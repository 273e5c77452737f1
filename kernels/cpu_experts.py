"""Expert matmuls on the CPU that read packed int4/int8 weights directly (torch's CPU kernels).

Shapes: T tokens, E experts, K top-k, H hidden, I expert hidden; a weight is [N, Kin].

Kernels: int4 runs ``aten._weight_int4pack_mm_for_cpu`` on weights repacked once, at load, by
``aten._convert_weight_to_int4pack_for_cpu``; int8 runs ``aten._weight_int8pack_mm`` on the
stored codes as they are. Neither makes a dense copy of a weight: each dequantises in
registers. Measured on a 2-core AVX-512 VM (one layer's 8 chosen experts at batch 1, while
other jobs ran): int4 with bfloat16 activations 12.8 ms, with float32 or float16 activations
about 1 s (those dtypes take a scalar loop), today's dequantise-then-matmul 925 ms; int8 with
bfloat16 activations 44 ms, float32 242 ms. So activations, scales and zero points go to the
kernels in bfloat16 (accumulation is float32 inside), and results come back in float32.

Format mapping. Ours: ``w = (q - z) * s`` with a real-valued zero z per group (q in 0..15).
The int4 kernel's: ``w = (q - 8) * S + Z`` per group of 32/64/128/256, so S = s and
Z = (8 - z) * s. A stored group size G that is a multiple of 32 uses the largest of those
sizes dividing G (scales repeated); any other G is padded to a multiple of 32 with codes
whose activations are zero (the input is padded the same way per call). Output rows are
padded to a multiple of 16 (the packer's unit) with zero scales. int8 per output channel
goes to the kernel as is; int8 with groups smaller than a row runs one kernel call per group.
The bfloat16 int8 kernel needs rows of a multiple of 16 inputs; other sizes use float32.

Experts: tokens are grouped by expert (one stable sort of the T*K pairs), then per expert
that got tokens one gate+up call, SwiGLU in float32, one down call; the routing weights scale
the rows and ``index_add_`` sums each token's K experts. No loop runs over tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from molmoe_lite.quantize.format import QuantizedWeight

from .checks import MoEInputError, check_moe_inputs

INT4_GROUPS = (256, 128, 64, 32)  # the group sizes the int4 kernel takes, largest first
_N_UNIT = 16  # the int4 packer wants a multiple of 16 output rows
_ALIGN = 64  # bytes: the bfloat16 int8 kernel reads activation rows with aligned loads


def _aligned(x: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    return x if x.data_ptr() % _ALIGN == 0 else x.clone()


def _unpack_nibbles(qweight: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] (low nibble = even k) -> uint8 codes [..., K]."""
    return torch.stack((qweight & 15, qweight >> 4), dim=-1).flatten(-2)


StoredScales = tuple[torch.Tensor, torch.Tensor | None]  # scales, zeros (None for int8)


def _int4_layout(n: int, group_size: int) -> tuple[int, int, int]:
    """(stored group padded to a kernel-sized run, the kernel's group size, padded rows)."""
    padded = group_size if group_size % 32 == 0 else math.ceil(group_size / 32) * 32
    return padded, next(s for s in INT4_GROUPS if padded % s == 0), math.ceil(n / _N_UNIT) * _N_UNIT


def _int8_act_dtype(group_size: int) -> torch.dtype:
    # the vectorised bfloat16 kernel reads 16 inputs at a time, with no tail
    return torch.bfloat16 if group_size % 16 == 0 else torch.float32


def cpu_layout_nbytes(shape: tuple[int, int, int], bits: int, group_size: int, keeps_stored: bool) -> int:
    """Bytes a ``CpuWeight`` of a stacked weight [E, N, K] holds (its ``nbytes``), without
    building one: the kernels' tensors, and the stored fp16 scales (and zeros) when kept
    (``keeps_stored``: no ``reread_stored``)."""
    e, n, k = shape
    groups = k // group_size
    stored = e * n * groups * 2 * (2 if bits == 4 else 1) if keeps_stored else 0
    if bits == 8:
        return stored + e * n * k + e * n * groups * _int8_act_dtype(group_size).itemsize
    padded, kernel_group, n_pad = _int4_layout(n, group_size)
    packed = e * n_pad * groups * padded // 2
    return stored + packed + e * groups * (padded // kernel_group) * n_pad * 2 * torch.bfloat16.itemsize


class CpuWeight:
    """One stacked quantised weight [E, N, K] in the layout of a torch CPU kernel.

    ``mm(x, e)``: x [M, K] (any float dtype) @ expert e's weight^T -> [M, N] float32.

    ``to_quantized`` gives the stored format back exactly, which needs the stored fp16 scales
    (and zeros): the kernels' bfloat16 copies cannot give them back. They are kept in memory
    (for int4, 1/8 of the packed bytes: 0.4 GB for MolmoE-1B) unless ``reread_stored`` is given,
    a function that reads them again (from the checkpoint file they came from) when needed.
    """

    def __init__(self, qw: QuantizedWeight, reread_stored: Callable[[], StoredScales] | None = None):
        if len(qw.shape) != 3:
            raise MoEInputError(f"cpu experts: weight must be stacked [E, N, K], got {tuple(qw.shape)}")
        self.bits, self.shape, self.group_size = qw.bits, tuple(qw.shape), qw.group_size
        e, n, k = self.shape
        self.n, self.k = n, k
        self._reread_stored = reread_stored
        self.stored_scales = self.stored_zeros = None
        if reread_stored is None:
            self.stored_scales = qw.scales.clone()
            self.stored_zeros = None if qw.zeros is None else qw.zeros.clone()
        if qw.bits == 4:
            self._pack_int4(qw)
        else:
            self._pack_int8(qw)

    # ------------------------------------------------------------------------- int4
    def _pack_int4(self, qw: QuantizedWeight) -> None:
        e, n, k = self.shape
        g = self.group_size
        padded, self.kernel_group, self.n_pad = _int4_layout(n, g)
        self.group_pad = padded - g
        groups = k // g
        k_run = groups * padded
        self.act_dtype = torch.bfloat16
        self.packed = torch.empty(e, self.n_pad, k_run // 2, dtype=torch.uint8)
        reps = padded // self.kernel_group
        self.scale_zeros = torch.zeros(e, groups * reps, self.n_pad, 2, dtype=self.act_dtype)
        for i in range(e):  # one expert at a time: the int32 codes are 8x the packed bytes
            if self.n_pad == n and not self.group_pad:
                codes = _unpack_nibbles(qw.qweight[i]).to(torch.int32)
            else:
                codes = torch.full((self.n_pad, groups, padded), 8, dtype=torch.int32)
                codes[:n, :, :g] = _unpack_nibbles(qw.qweight[i]).view(n, groups, g)
            self.packed[i] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.view(self.n_pad, k_run), 2)
            s = qw.scales[i].float()
            z = (8.0 - qw.zeros[i].float()) * s
            sz = torch.stack((s, z), dim=-1).transpose(0, 1)  # [groups, n, 2]
            self.scale_zeros[i, :, :n] = sz.repeat_interleave(reps, dim=0).to(self.act_dtype)

    def _mm_int4(self, x: torch.Tensor, e: int) -> torch.Tensor:
        x = x.to(self.act_dtype)
        if self.group_pad:
            m, groups = x.shape[0], self.k // self.group_size
            xp = x.new_zeros(m, groups, self.group_size + self.group_pad)
            xp[:, :, : self.group_size] = x.view(m, groups, self.group_size)
            x = xp.view(m, -1)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed[e], self.kernel_group,
                                                         self.scale_zeros[e])
        return (y if self.n == self.n_pad else y[:, : self.n]).float()

    # ------------------------------------------------------------------------- int8
    def _pack_int8(self, qw: QuantizedWeight) -> None:
        e, n, k = self.shape
        g = self.group_size
        self.act_dtype = _int8_act_dtype(g)
        if g == k:
            self.codes = qw.qweight.contiguous()  # [E, N, K]: the stored tensor itself
            self.scales = qw.scales[..., 0].to(self.act_dtype).contiguous()  # [E, N]
        else:
            groups = k // g
            self.codes = qw.qweight.view(e, n, groups, g).permute(0, 2, 1, 3).contiguous()  # [E, K/G, N, G]
            self.scales = qw.scales.permute(0, 2, 1).to(self.act_dtype).contiguous()  # [E, K/G, N]

    def _mm_int8(self, x: torch.Tensor, e: int) -> torch.Tensor:
        x = x.to(self.act_dtype)
        if self.group_size == self.k:
            return torch.ops.aten._weight_int8pack_mm(_aligned(x), self.codes[e], self.scales[e]).float()
        groups = self.k // self.group_size
        xg = x.view(x.shape[0], groups, self.group_size).transpose(0, 1).contiguous()  # [K/G, M, G]
        out = torch.zeros(x.shape[0], self.n, dtype=torch.float32)
        for j in range(groups):
            out += torch.ops.aten._weight_int8pack_mm(_aligned(xg[j]), self.codes[e, j], self.scales[e, j]).float()
        return out

    def mm(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return self._mm_int4(x, e) if self.bits == 4 else self._mm_int8(x, e)

    def kernel_tensors(self) -> dict[str, torch.Tensor]:
        """What the kernels read: the packed codes and their scales (and offsets)."""
        if self.bits == 4:
            return {"packed": self.packed, "scale_zeros": self.scale_zeros}
        return {"codes": self.codes, "scales": self.scales}

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything held: the kernels' tensors and the stored fp16 scales (and zeros) when
        they are kept for ``to_quantized``."""
        kept = {"stored_scales": self.stored_scales, "stored_zeros": self.stored_zeros}
        return {**self.kernel_tensors(), **{k: t for k, t in kept.items() if t is not None}}

    @property
    def nbytes(self) -> int:
        """Bytes held (``tensors()``)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def read_nbytes(self) -> int:
        """Bytes one call over every expert reads (``kernel_tensors()``)."""
        return sum(t.numel() * t.element_size() for t in self.kernel_tensors().values())

    # ------------------------------------------------------------------------- back to the format
    def to_quantized(self) -> QuantizedWeight:
        """The weight in the checkpoint's format again (for ``state_dict`` and moving devices).

        Exact: codes are unpacked from the kernel's layout, scales and zeros are the stored ones
        (kept, or read again).
        """
        e, n, k = self.shape
        g = self.group_size
        scales, zeros = self._stored()
        if self.bits == 8:
            q = self.codes if g == k else self.codes.permute(0, 2, 1, 3).reshape(e, n, k)
            return QuantizedWeight(q.contiguous(), scales, None, 8, g, self.shape)
        groups = k // g
        padded = g + self.group_pad
        slots = int4_slots(self.n_pad, groups * padded)
        qweight = torch.empty(e, n, k // 2, dtype=torch.uint8)
        for i in range(e):
            nibbles = _unpack_nibbles(self.packed[i]).flatten()
            codes = torch.empty_like(nibbles)
            codes[slots] = nibbles
            codes = codes.view(self.n_pad, groups, padded)[:n, :, :g].reshape(n, k // 2, 2)
            qweight[i] = codes[..., 0] | (codes[..., 1] << 4)
        return QuantizedWeight(qweight, scales, zeros, 4, g, self.shape)

    def _stored(self) -> StoredScales:
        if self._reread_stored is None:
            return self.stored_scales, self.stored_zeros
        scales, zeros = self._reread_stored()
        groups = self.k // self.group_size
        want = (*self.shape[:2], groups)
        for name, t in (("scales", scales), ("zeros", zeros)):
            if (t is None) != (name == "zeros" and self.bits == 8) or (t is not None and tuple(t.shape) != want):
                raise MoEInputError(f"cpu experts: the {name} read again do not fit a weight of shape "
                                    f"{self.shape} (has the checkpoint changed since it was loaded?)")
        return scales, zeros


_SLOTS: dict[tuple[int, int], torch.Tensor] = {}


def int4_slots(n: int, k: int) -> torch.Tensor:
    """For the int4 packer at [n, k]: the source index (row * k + col) of every packed nibble
    (low nibble of byte 0, high nibble of byte 0, low of byte 1, ...).

    The packer's layout depends on the CPU's vector width, so it is learned, not assumed: the
    source indices are packed as codes, one hexadecimal digit at a time. Cached per shape.
    """
    key = (n, k)
    if key not in _SLOTS:
        index = torch.arange(n * k, dtype=torch.int64)
        slots = torch.zeros(n * k, dtype=torch.int64)
        for d in range(max(1, math.ceil(math.log(n * k, 16)))):
            digit = ((index >> (4 * d)) & 15).to(torch.int32).view(n, k)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, 2)
            slots |= _unpack_nibbles(packed).flatten().to(torch.int64) << (4 * d)
        _SLOTS[key] = slots
    return _SLOTS[key]


def moe_experts_cpu(hidden: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    w13: CpuWeight, w2: CpuWeight) -> torch.Tensor:
    """hidden [T, H], routing weights/ids [T, K], w13 [E, 2I, H], w2 [E, H, I] -> [T, H] in hidden's dtype.

    sum_k w_k * down(silu(x gate^T) * (x up^T)) over each token's K experts.
    """
    t, h, n_exp, inter, k = check_moe_inputs(hidden, weights, ids, w13, w2)
    flat = ids.reshape(-1)
    if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < n_exp):
        raise MoEInputError(f"moe: expert ids must lie in [0, {n_exp})")
    order = torch.argsort(flat, stable=True)  # pairs grouped by expert
    counts = torch.bincount(flat, minlength=n_exp).tolist()
    tok = order // k
    xs = hidden[tok].to(w13.act_dtype)  # [T*K, H], expert-major, converted once for every expert
    # NaN until written: a pair the loop missed would show in the output, not pass as stale memory
    rows = torch.full((t * k, h), float("nan"), dtype=torch.float32)
    start = 0
    for e, count in enumerate(counts):
        if not count:
            continue
        sl = slice(start, start + count)
        gu = w13.mm(xs[sl], e)  # [count, 2I] float32
        rows[sl] = w2.mm(F.silu(gu[:, :inter]) * gu[:, inter:], e)
        start += count
    rows *= weights.reshape(-1)[order].float()[:, None]
    out = torch.zeros(t, h, dtype=torch.float32)
    out.index_add_(0, tok, rows)
    return out.to(hidden.dtype)
