"""The quantised weight format (version 1): layout, packing, rounding, dequantisation.

A weight ``W [..., N, K]`` (N outputs, K inputs, optional leading dims such as experts)
is quantised group-wise along K: each run of G consecutive inputs of one row shares a
scale (and, for int4, a zero point). G is capped at K (tiny models have K = 32 < 64) and
must then divide K.

Layout, format version 1 (``FORMAT_VERSION``):

  bits  tensor   shape             dtype    holds
  4     qweight  [..., N, K // 2]  uint8    two codes q in [0, 15] per byte
  4     scales   [..., N, K // G]  float16  step of each group
  4     zeros    [..., N, K // G]  float16  real-valued zero point of each group, in code units
  8     qweight  [..., N, K]       int8     codes q in [-127, 127]
  8     scales   [..., N, K // G]  float16  step of each group (G = K by default: per channel)

  int4: w[n, k] = (q[n, k] - zeros[n, k // G]) * scales[n, k // G]
  int8: w[n, k] = q[n, k] * scales[n, k // G]

int4 nibble order: input k of a row lives in byte k // 2, in the LOW nibble when k is even
and the HIGH nibble when k is odd (``byte = q[2j] | q[2j + 1] << 4``). Scales and zeros add
32 / G bits per weight to int4 (0.5 at G = 64, 4.5 bits in all); int8 adds 16 / G.

Rounding. ``method="rtn"``: int4 takes min/max per group, int8 absmax per group; codes are
then the nearest codes for the *stored* (float16) scale and zero. ``method="refit"`` (the
default) starts from that and from the range shrunk to 0.9x, and from each alternates 4
times: codes fixed -> least-squares refit of scale and offset per group (closed-form 2x2
normal equations; scale only for int8) -> stored values rounded to float16 -> nearest codes
again. Each group keeps its best iterate over both starts, so it is never worse than RTN.
Group errors come from per-group sums (sum q, sum q^2, sum q x), not a dequantised copy,
so an iteration is a few vectorised passes; the work runs in chunks of rows so temporaries
stay bounded.

Experts are stored stacked per layer for the kernels and the checkpoint:
``{prefix}.w13`` = [E, 2I, H] (rows 0..I-1 gate_proj, I..2I-1 up_proj of each expert) and
``{prefix}.w2`` = [E, H, I] (down_proj), each as ``.qweight``, ``.scales`` and (int4)
``.zeros`` with ``prefix = model.transformer.blocks.{i}.mlp.experts``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from molmoe_lite.quantize.layout import LLM_PREFIX, expert_key
from molmoe_lite.errors import MolmoeLiteError

FORMAT_VERSION = 1
DEFAULT_INT4_GROUP = 64
# Refit: from each start (range shrunk to r times min/max, or absmax for int8) alternate
# REFIT_ITERS times; each group keeps its best. Two starts x 4 beat one start x 20 on
# Student-t weights (0.1085 vs 0.1099 relative error, 1024x2048, G = 64).
REFIT_ITERS = 4
_REFIT_STARTS = (1.0, 0.9)

# Elements handled per chunk (2 MB per float32 temporary): bounds the temporaries for
# large stacks; measured fastest on the CPU (smaller: per-op overhead on the [c] vectors).
# On CUDA each chunk also costs a few host syncs and dozens of launches, so chunks are 8x
# larger there (16 MB per temporary): one chunk per expert matrix of MolmoE.
_CHUNK_ELEMS = 1 << 19
_CHUNK_ELEMS_CUDA = 1 << 22
_FP16_MAX = torch.finfo(torch.float16).max
# Smallest stored scale: the smallest normal float16, so a scale never loses relative
# precision to subnormals. Groups with a range below ~15x this (1e-3) get a coarser step.
_MIN_SCALE = torch.finfo(torch.float16).tiny

_QMAX = {4: 15, 8: 127}


# ``quant_method`` in a converted checkpoint's quantization_config: ours, and only ours, loads.
QUANT_METHOD = "molmoe-lite"
# Float dtypes by the names users give them (``--dtype``, ``dtype=``).
FLOAT_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

class QuantFormatError(MolmoeLiteError, ValueError):
    """A weight, a group size or a set of stored tensors that the format cannot take."""


@dataclass
class QuantizedWeight:
    """One quantised weight (or a stack of them) in format version 1.

    ``shape`` is the original float shape [..., N, K]; ``zeros`` is None for int8.
    """

    qweight: torch.Tensor  # int4: uint8 [..., N, K // 2]; int8: int8 [..., N, K]
    scales: torch.Tensor  # float16 [..., N, K // G]
    zeros: torch.Tensor | None  # float16 [..., N, K // G] (int4) or None (int8)
    bits: int
    group_size: int
    shape: tuple[int, ...]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [..., N, K] the codes stand for, computed in float32."""
        return dequantize(self, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of every stored tensor together."""
        total = self.qweight.numel() * self.qweight.element_size()
        total += self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            total += self.zeros.numel() * self.zeros.element_size()
        return total

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per original weight, scales and zeros included."""
        n = 1
        for s in self.shape:
            n *= s
        return 8.0 * self.nbytes / n

    def index(self, i: int) -> "QuantizedWeight":
        """The weight at position ``i`` of the first leading dim (e.g. one expert of a stack)."""
        if len(self.shape) < 3:
            raise QuantFormatError(f"index(): weight of shape {self.shape} has no leading dim")
        return QuantizedWeight(
            self.qweight[i],
            self.scales[i],
            None if self.zeros is None else self.zeros[i],
            self.bits,
            self.group_size,
            tuple(self.shape[1:]),
        )

    def to(self, device: torch.device | str) -> "QuantizedWeight":
        """A copy with every stored tensor on ``device``."""
        return QuantizedWeight(
            self.qweight.to(device),
            self.scales.to(device),
            None if self.zeros is None else self.zeros.to(device),
            self.bits,
            self.group_size,
            self.shape,
        )


# ---------------------------------------------------------------------------- packing


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Codes [..., K] (any integer dtype, values 0..15, K even) -> uint8 [..., K // 2].

    Even k -> low nibble, odd k -> high nibble of byte k // 2.
    """
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise QuantFormatError(f"pack_int4: codes must be an integer tensor, got {q.dtype}")
    if q.ndim == 0 or q.shape[-1] % 2:
        raise QuantFormatError(f"pack_int4: last dim must be even, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise QuantFormatError(
            f"pack_int4: codes must lie in [0, 15], got [{int(q.min())}, {int(q.max())}]"
        )
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 codes [..., K] (inverse of ``pack_int4``)."""
    if packed.dtype != torch.uint8:
        raise QuantFormatError(f"unpack_int4: expected uint8, got {packed.dtype}")
    out = torch.stack((packed & 0xF, packed >> 4), dim=-1)  # [..., K // 2, 2]
    return out.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


# ---------------------------------------------------------------------------- checks


def resolve_group_size(k: int, bits: int, group_size: int | None) -> int:
    """The group size used for K inputs: the default for ``bits`` when None, capped at K.

    Raises QuantFormatError when it is not a positive int or does not divide K.
    """
    if group_size is None:
        group_size = DEFAULT_INT4_GROUP if bits == 4 else k
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise QuantFormatError(f"group size must be a positive int, got {group_size!r}")
    g = min(group_size, k)
    if k % g:
        raise QuantFormatError(
            f"group size {group_size} does not divide the input size K = {k}; "
            f"use a group size that divides {k} (e.g. 32, 64 or 128 when they do)"
        )
    if bits == 4 and g % 2:
        raise QuantFormatError(f"int4 needs an even group size (two codes per byte), got {g}")
    return g


def _check_bits(bits: int) -> None:
    if bits not in _QMAX:
        raise QuantFormatError(f"bits must be 4 or 8, got {bits!r}")


# ---------------------------------------------------------------------------- rounding


def _store(s: torch.Tensor) -> torch.Tensor:
    """Scales as they will be stored (float16, clamped into its normal range), as float32."""
    return s.clamp(_MIN_SCALE, _FP16_MAX).to(torch.float16).float()


def _codes(x: torch.Tensor, inv_s: torch.Tensor, z: torch.Tensor | None, lo: int, hi: int):
    """Nearest codes for x [c, G] given 1/scale [c] and zero [c] (None: symmetric)."""
    q = x * inv_s[:, None]
    if z is not None:
        q += z[:, None]
    return q.round_().clamp_(lo, hi)


def _fit(x, s, z, iters, sx, sxx):
    """Alternate codes <-> least-squares (scale, zero) for groups x [c, G] from (s, z).

    ``z`` None means symmetric (int8): only the scale is refitted. Returns the best
    (err [c] float64, s [c], z [c] | None) seen per group; s and z are stored float16 values.
    """
    g = x.shape[1]
    sym = z is None
    lo, hi = (-_QMAX[8], _QMAX[8]) if sym else (0, _QMAX[4])
    best_err = torch.full_like(sxx, float("inf"))
    best_s, best_z = s, z
    for t in range(iters + 1):
        q = _codes(x, 1.0 / s, z, lo, hi)
        sqq = torch.linalg.vecdot(q, q, dim=1).double()
        sqx = torch.linalg.vecdot(q, x, dim=1).double()
        a = s.double()
        # ||a q + b - x||^2 from group sums, b = -z a (0 when symmetric).
        err = a * a * sqq - 2 * a * sqx + sxx
        if not sym:
            sq = q.sum(1).double()
            b = -z.double() * a
            err += 2 * a * b * sq + g * b * b - 2 * b * sx
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if not sym:
            best_z = torch.where(better, z, best_z)
        if t == iters or (t > 0 and not bool(better.any())):
            break
        # Least squares given the codes: a = <q,x>/<q,q>, or the 2x2 normal equations.
        if sym:
            a_new = sqx / sqq.clamp_min(1e-30)
            ok = (sqq > 0) & (a_new > 0)
        else:
            det = g * sqq - sq * sq
            a_new = (g * sqx - sq * sx) / det.clamp_min(1e-30)
            b_new = (sx - a_new * sq) / g
            ok = (det > 0) & (a_new > 0) & torch.isfinite(a_new)
            z_new = (-b_new / a_new).float().clamp(-_FP16_MAX, _FP16_MAX)
            z = torch.where(ok, z_new.to(torch.float16).float(), z)
        s = torch.where(ok, _store(a_new.float()), s)
    return best_err, best_s, best_z


def _quantize_groups(x: torch.Tensor, bits: int, iters: int):
    """Groups x [c, G] float32 -> (codes float32 [c, G], scales [c], zeros [c] | None).

    Scales and zeros returned are exactly the float16 values that will be stored.
    """
    qmax = _QMAX[bits]
    if bits == 8:
        amax = x.abs().amax(1)
        inits = [(_store(amax * (r / qmax)), None) for r in _REFIT_STARTS]
    else:
        xmin, xmax = x.amin(1), x.amax(1)
        mid, half = (xmin + xmax) / 2, (xmax - xmin) / 2
        # A constant group c has no range: step |c| and zero 8 - c / step put c exactly on code 8.
        const = half == 0
        inits = []
        for r in _REFIT_STARTS:
            s = _store(torch.where(const, xmax.abs(), 2 * r * half / qmax))
            z = torch.where(const, 8 - mid / s, -(mid - r * half) / s)
            inits.append((s, z.to(torch.float16).float()))
    if iters == 0:
        s, z = inits[0]
        return _codes(x, 1.0 / s, z, -qmax if bits == 8 else 0, qmax), s, z

    # Group sums are taken in float32 (a float64 sum would first copy the chunk to float64)
    # and combined in float64: the error formula subtracts nearly equal terms.
    sx = x.sum(1).double()
    sxx = torch.linalg.vecdot(x, x, dim=1).double()
    best = None
    for s, z in inits:
        err, s, z = _fit(x, s, z, iters, sx, sxx)
        if best is None:
            best = (err, s, z)
            continue
        better = err < best[0]
        best = (
            torch.where(better, err, best[0]),
            torch.where(better, s, best[1]),
            None if z is None else torch.where(better, z, best[2]),
        )
    _, s, z = best
    return _codes(x, 1.0 / s, z, -qmax if bits == 8 else 0, qmax), s, z


def quantize_weight(
    w: torch.Tensor,
    bits: int = 4,
    group_size: int | None = None,
    method: str = "refit",
    *,
    iters: int = REFIT_ITERS,
    name: str = "weight",
) -> QuantizedWeight:
    """Quantise a float weight [..., N, K] group-wise along K.

    ``group_size`` None means the default: 64 for int4, K (per output channel) for int8.
    ``method``: "refit" (least-squares refit of scale/zero, never worse than RTN per group)
    or "rtn". ``name`` is used in error messages (e.g. the checkpoint key).
    """
    _check_bits(bits)
    if method not in ("refit", "rtn"):
        raise QuantFormatError(f"{name}: method must be 'refit' or 'rtn', got {method!r}")
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        kind = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise QuantFormatError(f"{name}: expected a floating-point tensor, got {kind}")
    if w.ndim < 2 or w.numel() == 0:
        raise QuantFormatError(f"{name}: expected a non-empty [..., N, K] weight, got {tuple(w.shape)}")
    k = w.shape[-1]
    try:
        g = resolve_group_size(k, bits, group_size)
    except QuantFormatError as e:
        raise QuantFormatError(f"{name}: {e}") from None
    n_iter = iters if method == "refit" else 0

    groups = w.detach().reshape(-1, g)  # [R, G], R = numel // G (a view when contiguous)
    r = groups.shape[0]
    scales = torch.empty(r, dtype=torch.float16, device=w.device)
    zeros = torch.empty(r, dtype=torch.float16, device=w.device) if bits == 4 else None
    if bits == 4:
        qweight = torch.empty(r, g // 2, dtype=torch.uint8, device=w.device)
    else:
        qweight = torch.empty(r, g, dtype=torch.int8, device=w.device)

    step = max(1, (_CHUNK_ELEMS_CUDA if w.is_cuda else _CHUNK_ELEMS) // g)
    for i in range(0, r, step):
        x = groups[i : i + step].float()
        lo, hi = x.amin(), x.amax()
        if not (torch.isfinite(lo) and torch.isfinite(hi)):
            raise QuantFormatError(f"{name}: weight holds NaN or infinite values")
        if max(-float(lo), float(hi)) > _FP16_MAX:
            raise QuantFormatError(f"{name}: values beyond the float16 range cannot get float16 scales")
        q, s, z = _quantize_groups(x, bits, n_iter)
        if bits == 4:
            qb = q.to(torch.uint8)
            qweight[i : i + step] = qb[:, 0::2] | (qb[:, 1::2] << 4)
            zeros[i : i + step] = z.to(torch.float16)
        else:
            qweight[i : i + step] = q.to(torch.int8)
        scales[i : i + step] = s.to(torch.float16)

    lead = tuple(w.shape[:-1])
    qcols = k // 2 if bits == 4 else k
    return QuantizedWeight(
        qweight.reshape(*lead, qcols),
        scales.reshape(*lead, k // g),
        None if zeros is None else zeros.reshape(*lead, k // g),
        bits,
        g,
        tuple(w.shape),
    )


# ---------------------------------------------------------------------------- dequantisation


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight [..., N, K] of ``qw``, computed in float32 then cast to ``dtype``."""
    k, g = qw.shape[-1], qw.group_size
    if qw.bits == 4:
        q = unpack_int4(qw.qweight).float()
    elif qw.bits == 8:
        q = qw.qweight.float()
    else:
        raise QuantFormatError(f"dequantize: bits must be 4 or 8, got {qw.bits!r}")
    q = q.reshape(*qw.shape[:-1], k // g, g)  # [..., N, K // G, G]
    if qw.zeros is not None:
        q -= qw.zeros.float()[..., None]
    q *= qw.scales.float()[..., None]
    return q.reshape(qw.shape).to(dtype)


# ---------------------------------------------------------------------------- serialising


def _suffixes(bits: int) -> tuple[str, ...]:
    return ("qweight", "scales", "zeros") if bits == 4 else ("qweight", "scales")


def quantized_to_tensors(prefix: str, qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """``{prefix}.qweight``, ``{prefix}.scales`` and (int4) ``{prefix}.zeros``, contiguous."""
    out = {f"{prefix}.qweight": qw.qweight.contiguous(), f"{prefix}.scales": qw.scales.contiguous()}
    if qw.bits == 4:
        if qw.zeros is None:
            raise QuantFormatError(f"{prefix}: int4 weight without zeros")
        out[f"{prefix}.zeros"] = qw.zeros.contiguous()
    return out


def tensors_to_quantized(
    prefix: str,
    tensors: dict[str, torch.Tensor],
    bits: int,
    group_size: int | None = None,
) -> QuantizedWeight:
    """Rebuild a QuantizedWeight from stored tensors, checking dtypes and shapes.

    ``group_size`` None infers it from the scales (K // number of groups); when given it
    is capped at K like ``quantize_weight`` does and must match the stored scales.
    """
    _check_bits(bits)
    missing = [f"{prefix}.{s}" for s in _suffixes(bits) if f"{prefix}.{s}" not in tensors]
    if missing:
        raise QuantFormatError(f"{prefix}: missing quantised tensors {missing}")
    qweight, scales = tensors[f"{prefix}.qweight"], tensors[f"{prefix}.scales"]
    zeros = tensors[f"{prefix}.zeros"] if bits == 4 else None
    want_q = torch.uint8 if bits == 4 else torch.int8
    if qweight.dtype != want_q:
        raise QuantFormatError(f"{prefix}.qweight: expected {want_q} for int{bits}, got {qweight.dtype}")
    for nm, t in (("scales", scales), ("zeros", zeros)):
        if t is not None and t.dtype != torch.float16:
            raise QuantFormatError(f"{prefix}.{nm}: expected float16, got {t.dtype}")
    if qweight.ndim < 2:
        raise QuantFormatError(f"{prefix}.qweight: expected [..., N, K'], got {tuple(qweight.shape)}")
    k = qweight.shape[-1] * (2 if bits == 4 else 1)
    lead = tuple(qweight.shape[:-1])
    if tuple(scales.shape[:-1]) != lead or scales.shape[-1] == 0 or k % scales.shape[-1]:
        raise QuantFormatError(
            f"{prefix}.scales: shape {tuple(scales.shape)} does not fit qweight {tuple(qweight.shape)}"
        )
    g = k // scales.shape[-1]
    if group_size is not None:
        try:
            want_g = resolve_group_size(k, bits, group_size)
        except QuantFormatError as e:
            raise QuantFormatError(f"{prefix}: {e}") from None
        if want_g != g:
            raise QuantFormatError(
                f"{prefix}: stored scales give group size {g}, the config says {want_g}"
            )
    if zeros is not None and zeros.shape != scales.shape:
        raise QuantFormatError(
            f"{prefix}.zeros: shape {tuple(zeros.shape)} differs from scales {tuple(scales.shape)}"
        )
    return QuantizedWeight(qweight, scales, zeros, bits, g, lead + (k,))


# ---------------------------------------------------------------------------- expert stacks


def experts_prefix(layer: int) -> str:
    """Key prefix of layer ``layer``'s stacked experts (``.w13`` / ``.w2`` follow)."""
    return f"{LLM_PREFIX}.blocks.{layer}.mlp.experts"


def stack_layer_experts(
    get_tensor: Callable[[str], torch.Tensor], layer: int, n_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack one layer's experts: (w13 [E, 2I, H] = cat(gate, up) rows, w2 [E, H, I]).

    ``get_tensor`` maps a release key (``layout.expert_key``) to its tensor. Outputs are
    preallocated and filled expert by expert, so no list of copies is held.
    """
    w13 = w2 = None
    for e in range(n_experts):
        gate = get_tensor(expert_key(layer, e, "gate_proj"))  # [I, H]
        up = get_tensor(expert_key(layer, e, "up_proj"))  # [I, H]
        down = get_tensor(expert_key(layer, e, "down_proj"))  # [H, I]
        if w13 is None:
            i_, h = gate.shape
            w13 = torch.empty(n_experts, 2 * i_, h, dtype=gate.dtype)
            w2 = torch.empty(n_experts, *down.shape, dtype=down.dtype)
        half = w13.shape[1] // 2
        if gate.shape != (half, w13.shape[2]) or up.shape != gate.shape or down.shape != w2.shape[1:]:
            raise QuantFormatError(
                f"layer {layer} expert {e}: shapes gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                f"down {tuple(down.shape)} differ from expert 0's"
            )
        w13[e, :half] = gate
        w13[e, half:] = up
        w2[e] = down
    if w13 is None:
        raise QuantFormatError(f"layer {layer}: n_experts must be positive, got {n_experts}")
    return w13, w2


def _empty_stack(n_experts: int, rows: int, first: QuantizedWeight) -> QuantizedWeight:
    """Uninitialised stacked codes [E, rows, K] laid out like ``first`` (one expert's [N, K])."""

    def empty(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(n_experts, rows, *t.shape[1:], dtype=t.dtype, device=t.device)

    zeros = None if first.zeros is None else empty(first.zeros)
    shape = (n_experts, rows, first.shape[-1])
    return QuantizedWeight(empty(first.qweight), empty(first.scales), zeros, first.bits, first.group_size, shape)


def _put_rows(stack: QuantizedWeight, e: int, row: int, qw: QuantizedWeight) -> None:
    """Copy one expert's codes into rows [row, row + N) of expert ``e`` of ``stack``."""
    end = row + qw.shape[0]
    stack.qweight[e, row:end] = qw.qweight
    stack.scales[e, row:end] = qw.scales
    if qw.zeros is not None:
        stack.zeros[e, row:end] = qw.zeros


def quantize_expert_stack(
    n_experts: int,
    get_expert: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    bits: int = 4,
    group_size: int | None = None,
    method: str = "refit",
    name: Callable[[int, str], str] | str = "experts",
) -> tuple[QuantizedWeight, QuantizedWeight]:
    """(w13 [E, 2I, H], w2 [E, H, I]) from ``get_expert(e) -> (gate [I, H], up [I, H], down [H, I])``.

    Experts are read and quantised one at a time into preallocated stacks, so peak memory
    is one expert's floats plus the codes. Gate and up are quantised separately (groups
    run along H, so this equals quantising cat(gate, up)). ``name`` (a prefix, or
    ``(e, proj) -> key``) names tensors in errors.
    """
    key = name if callable(name) else (lambda e, proj: f"{name}.{e}.{proj}")
    w13 = w2 = None
    for e in range(n_experts):
        gate, up, down = get_expert(e)
        i_, h = gate.shape[-2:]
        if tuple(up.shape) != (i_, h) or tuple(down.shape) != (h, i_):
            raise QuantFormatError(
                f"{key(e, 'gate_proj')} (expert {e}): shapes gate {tuple(gate.shape)}, up {tuple(up.shape)}, "
                f"down {tuple(down.shape)} are not [I, H], [I, H], [H, I]"
            )
        qg = quantize_weight(gate, bits, group_size, method, name=key(e, "gate_proj"))
        qu = quantize_weight(up, bits, group_size, method, name=key(e, "up_proj"))
        qd = quantize_weight(down, bits, group_size, method, name=key(e, "down_proj"))
        if w13 is None:
            w13 = _empty_stack(n_experts, 2 * i_, qg)
            w2 = _empty_stack(n_experts, h, qd)
        elif w13.shape[1:] != (2 * i_, h):
            raise QuantFormatError(
                f"{key(e, 'gate_proj')} (expert {e}): shape [{i_}, {h}] differs from expert 0's {w13.shape[1:]}"
            )
        _put_rows(w13, e, 0, qg)
        _put_rows(w13, e, i_, qu)
        _put_rows(w2, e, 0, qd)
    if w13 is None:
        raise QuantFormatError(f"{key(0, '')}: n_experts must be positive, got {n_experts}")
    return w13, w2


def quantize_layer_experts(
    get_tensor: Callable[[str], torch.Tensor],
    layer: int,
    n_experts: int,
    bits: int = 4,
    group_size: int | None = None,
    method: str = "refit",
) -> tuple[QuantizedWeight, QuantizedWeight]:
    """Quantised (w13, w2) stacks of one layer of a release checkpoint, one expert at a time.

    Equal to quantising ``stack_layer_experts``'s outputs (rounding is per group), but the
    float stack is never built.
    """
    return quantize_expert_stack(
        n_experts,
        lambda e: tuple(get_tensor(expert_key(layer, e, p)) for p in ("gate_proj", "up_proj", "down_proj")),
        bits,
        group_size,
        method,
        name=lambda e, proj: expert_key(layer, e, proj),
    )
