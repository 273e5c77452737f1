"""Quantised modules of the runtime: expert stacks and plain linears in the v1 format.

``QuantizedExperts`` replaces a layer's float experts: it holds the stacked, fused
``w13`` (gate+up, [E, 2I, H]) and ``w2`` (down, [E, H, I]) tensors of
``molmoe_lite.quantize.format`` as buffers, under the same keys the converter writes
(``...mlp.experts.w13.qweight`` etc.), and is called like the dense experts,
``experts(h, weights, ids)``. ``QuantizedLinear`` does the same for one matrix
(attention projections, lm_head). Both run the Triton kernels on CUDA. On the CPU the
experts run torch's int4/int8 CPU kernels (``kernels/cpu_experts.py``) on a copy repacked
once into those kernels' layout; ``load()`` repacks each layer as it is read and releases the
stored-format tensors (``state_dict()`` rebuilds them on demand); modules built otherwise
repack on their first CPU call and keep them. Linears on the CPU run those kernels for short
calls (decode steps) and the pure-torch reference (dequantise, float matmul) for long ones.
"""

from __future__ import annotations


import torch
from torch import nn

from molmoe_lite.kernels.availability import use_kernels
from molmoe_lite.kernels.cpu_experts import CpuWeight, moe_experts_cpu
from molmoe_lite.kernels.fused_moe import moe_experts, quantized_linear, topk_softmax
from molmoe_lite.kernels.reference import route
from molmoe_lite.quantize.format import QuantizedWeight, quantize_weight, resolve_group_size
from molmoe_lite.errors import UsageError


class QuantizedTensor(nn.Module):
    """Buffers ``qweight``, ``scales`` (and ``zeros`` for int4) of one (stacked) weight [..., N, K]."""

    def __init__(self, shape: tuple[int, ...], bits: int, group_size: int | None, device=None):
        super().__init__()
        *lead, n, k = shape
        g = resolve_group_size(k, bits, group_size)
        self.shape = tuple(shape)
        self.bits = bits
        self.group_size = g
        if bits == 4:
            self.register_buffer("qweight", torch.empty(*lead, n, k // 2, dtype=torch.uint8, device=device))
            self.register_buffer("zeros", torch.empty(*lead, n, k // g, dtype=torch.float16, device=device))
        elif bits == 8:
            self.register_buffer("qweight", torch.empty(*lead, n, k, dtype=torch.int8, device=device))
            self.zeros = None
        else:
            raise UsageError(f"bits must be 4 or 8, got {bits}")
        self.register_buffer("scales", torch.empty(*lead, n, k // g, dtype=torch.float16, device=device))
        self.cpu_weight: CpuWeight | None = None

    def use_cpu_layout(self, qw: QuantizedWeight | None = None, release: bool = True,
                       reread_stored=None) -> CpuWeight:
        """Repack ``qw`` (default: this module's tensors) for the CPU kernels; ``release`` drops
        the stored-format buffers (``load()`` does; a first CPU call on a module built otherwise,
        e.g. by ``patch``, keeps them). The packed tensors are no buffers (a dtype cast of the
        model must not touch them); without the buffers ``state_dict()`` rebuilds the stored
        format from them, with the stored scales kept or, given ``reread_stored`` (see
        ``CpuWeight``), read again from the checkpoint."""
        self.cpu_weight = CpuWeight(qw if qw is not None else self.weight(), reread_stored)
        if release:
            self.qweight = self.scales = None
            if self.bits == 4:
                self.zeros = None
        return self.cpu_weight

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.cpu_weight is not None and self.qweight is None:
            qw = self.cpu_weight.to_quantized()
            destination[prefix + "qweight"], destination[prefix + "scales"] = qw.qweight, qw.scales
            if qw.zeros is not None:
                destination[prefix + "zeros"] = qw.zeros

    @classmethod
    def from_weight(cls, qw: QuantizedWeight) -> "QuantizedTensor":
        with torch.device("meta"):
            mod = cls(qw.shape, qw.bits, qw.group_size)
        mod.set_weight(qw)
        return mod

    def set_weight(self, qw: QuantizedWeight) -> None:
        """Take the tensors of ``qw`` as this module's buffers (no copy)."""
        self.qweight, self.scales = qw.qweight, qw.scales
        if qw.bits == 4:
            self.zeros = qw.zeros

    def weight(self) -> QuantizedWeight:
        if self.cpu_weight is not None and self.qweight is None:
            return self.cpu_weight.to_quantized()
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, int{self.bits}, group_size={self.group_size}"


class QuantizedExperts(nn.Module):
    """All experts of one MoE layer, quantised; ``forward(h [T,H], weights [T,K], ids [T,K]) -> [T,H]``.

    ``use_kernels``: None runs the Triton kernels on CUDA and the CPU kernels on the CPU
    (repacking on first use when ``load()`` has not); True forces the Triton kernels (tests run
    them on the CPU under TRITON_INTERPRET=1); False forces the pure-torch reference. See
    ``molmoe_lite.kernels.availability.use_kernels``.
    """

    def __init__(self, n_experts: int, d: int, hidden: int, bits: int, group_size: int | None, device=None):
        super().__init__()
        self.w13 = QuantizedTensor((n_experts, 2 * hidden, d), bits, group_size, device)  # gate rows, then up
        self.w2 = QuantizedTensor((n_experts, d, hidden), bits, group_size, device)
        self.use_kernels: bool | None = None

    @classmethod
    def from_weights(cls, w13: QuantizedWeight, w2: QuantizedWeight) -> "QuantizedExperts":
        e, two_i, d = w13.shape
        with torch.device("meta"):
            mod = cls(e, d, two_i // 2, w13.bits, w13.group_size)
        mod.w13 = QuantizedTensor.from_weight(w13)
        mod.w2 = QuantizedTensor.from_weight(w2)
        return mod

    def route(self, logits: torch.Tensor, top_k: int, renormalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Router logits [T, E] -> (weights fp32 [T, K], ids [T, K]): softmax over all experts in
        fp32 and top-k, ties to the lowest id. With the kernels, one launch that reads the
        logits in their dtype and writes what the expert kernels read (fp32 weights, int32
        ids): torch's softmax, top-k and casts would be four or five small launches per layer
        in every decode step. MoE blocks call this when their experts module has it."""
        if use_kernels(logits, self.use_kernels):
            return topk_softmax(logits.contiguous(), top_k, renormalize)
        return route(logits, top_k, renormalize)

    def use_cpu_layout(self, release: bool = True) -> None:
        """Repack both weights for the CPU kernels (see QuantizedTensor.use_cpu_layout)."""
        for t in (self.w13, self.w2):
            if t.cpu_weight is None:
                t.use_cpu_layout(release=release)

    def forward(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.use_kernels is None and h.device.type == "cpu":
            self.use_cpu_layout(release=False)  # built outside load(): its tensors stay as they are
            return moe_experts_cpu(h, weights, ids, self.w13.cpu_weight, self.w2.cpu_weight)
        return moe_experts(h, weights, ids, self.w13.weight(), self.w2.weight(),
                           use_kernels=use_kernels(h, self.use_kernels))


# On the CPU, a quantised linear called with at most this many rows (decode steps, small
# batches) runs the CPU kernel, which reads the packed weight once but dequantises it again for
# every few rows; more rows (a prompt, the ViT) dequantise the weight once and run a float
# matmul. Measured on a 2-core AVX-512 VM, int4 [6144, 2048]: 1 row 0.9 ms (kernel) against
# 42 ms (dequantise + matmul), 32 rows 12.0 against 51.5 ms, 128 rows 48 against 67 ms, 750
# rows 206 against 140 ms.
CPU_KERNEL_MAX_ROWS = 32


class QuantizedLinear(QuantizedTensor):
    """A linear layer whose weight [N, K] is quantised (keys ``<name>.qweight`` etc.); an optional
    float ``bias`` (the ViT's linears have one) is added after the quantised matmul.

    On the CPU (``use_kernels`` None) calls of up to CPU_KERNEL_MAX_ROWS rows run the CPU kernels
    of ``kernels/cpu_experts.py`` on a copy repacked at the first such call (the stored tensors
    stay: longer calls dequantise them); elsewhere as ``QuantizedExperts``.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, device=None,
                 bias: bool = False, dtype: torch.dtype | None = None):
        super().__init__((out_features, in_features), bits, group_size, device)
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), requires_grad=False) if bias else None
        self.use_kernels: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., K] -> [..., N]
        flat = x.reshape(-1, self.in_features)
        if self.use_kernels is None and x.device.type == "cpu" and flat.shape[0] <= CPU_KERNEL_MAX_ROWS:
            y = self._cpu_kernel_weight().mm(flat, 0).to(x.dtype)
        else:
            y = quantized_linear(flat, self.weight(), use_kernels=use_kernels(x, self.use_kernels))
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _cpu_kernel_weight(self) -> CpuWeight:
        """The weight repacked for the CPU kernels, as a stack of one; the stored buffers stay
        (longer calls use them) and stand in for the kernels' copy of the scales."""
        if self.cpu_weight is None:
            qw = self.weight()
            zeros = None if qw.zeros is None else qw.zeros[None]
            stack = QuantizedWeight(qw.qweight[None], qw.scales[None], zeros, qw.bits, qw.group_size, (1, *qw.shape))
            # a bound method, not a closure: a deep copy of the module then reads its own buffers
            self.cpu_weight = CpuWeight(stack, reread_stored=self._stored_as_stack)
        return self.cpu_weight

    def _stored_as_stack(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.scales[None], None if self.zeros is None else self.zeros[None]

    @classmethod
    def like(cls, linear: nn.Linear, bits: int, group_size: int | None) -> "QuantizedLinear":
        """An empty (meta) quantised twin of ``linear``: same sizes, bias and bias dtype."""
        bias = linear.bias is not None
        return cls(linear.in_features, linear.out_features, bits, group_size, "meta", bias=bias,
                   dtype=linear.bias.dtype if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None,
                    method: str = "refit") -> "QuantizedLinear":
        qw = quantize_weight(linear.weight.detach(), bits=bits, group_size=group_size, method=method)
        mod = cls.like(linear, bits, qw.group_size)
        mod.set_weight(qw)
        if linear.bias is not None:
            mod.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return mod


def held_tensors(module: nn.Module, read_only: bool = False) -> list[torch.Tensor]:
    """Every tensor ``module`` holds, each once: parameters, buffers, and the CPU kernels' packed
    expert weights (kept beside the buffers, so ``parameters()`` misses them). ``read_only``: what
    a forward reads, so of a weight with a CPU copy only the tensors its kernels read (not the
    stored-format buffers or fp16 copies kept for ``state_dict``)."""
    tensors = list(module.parameters()) + list(module.buffers())
    copies: list[torch.Tensor] = []
    stored: set[int] = set()  # buffers a CPU copy stands in for when reading
    for sub in module.modules():
        packed = getattr(sub, "cpu_weight", None)
        if packed is not None:
            copies += list((packed.kernel_tensors() if read_only else packed.tensors()).values())
            if read_only:
                stored.update(id(t) for t in sub.buffers(recurse=False))
    unique: dict[int, torch.Tensor] = {}
    for t in tensors:
        if id(t) not in stored:
            unique.setdefault(id(t), t)
    for t in copies:  # may be the very buffers (an int8 copy can share its codes)
        unique.setdefault(id(t), t)
    return list(unique.values())
