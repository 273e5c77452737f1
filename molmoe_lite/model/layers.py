"""Small building blocks of the OLMoE decoder: RMSNorm and rotary position embeddings.

RMSNorm follows the release bit for bit: normalise in fp32, cast back to the input
dtype, then multiply by the weight (the weight multiplies *after* the cast, so a
fp32 weight on a fp16 input yields fp32, which the fp16 path relies on).

RoPE is the rotate-half ("llama", not interleaved) form with the angles, sin/cos and
the rotation itself computed in fp32 whatever the compute dtype, as the release does
(``rope_full_precision``). Angles come from explicit ``position_ids`` so left padding
works; nothing is cached in buffers, so modules built on the meta device need no
re-initialisation after ``load_state_dict(assign=True)``.

Shape legend: B batch, L new tokens, S keys so far, H heads, D head dim, d model width.
"""

from __future__ import annotations

import torch
from torch import nn


def use_fused_kernels(flag: bool | None, x: torch.Tensor) -> bool:
    """A module's ``use_kernels`` setting for input x, decided by the package's one rule
    (``molmoe_lite.kernels.availability.use_kernels``): None means the Triton kernels on CUDA
    and the torch code elsewhere; True forces them (an error where they cannot run)."""
    from molmoe_lite.kernels.availability import use_kernels

    return use_kernels(x, flag)


class RMSNorm(nn.Module):
    """``weight * (x / sqrt(mean(x^2) + eps))``, weight only (no bias).

    On CUDA (``use_kernels`` None) or when ``use_kernels`` is True it runs as one fused Triton
    kernel (``molmoe_lite.kernels.norms``: the same roundings, one launch instead of eight),
    and ``rope`` fuses the rotary embedding that follows the QK-norms too.
    """

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))  # [dim]
        self.use_kernels: bool | None = None

    def _fused(self, x: torch.Tensor) -> bool:
        return use_fused_kernels(self.use_kernels, x)

    def forward(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """[..., dim] -> [..., dim], in out_dtype (default: x's and the weight's promoted dtype)."""
        if self._fused(x):
            from molmoe_lite.kernels.norms import rms_norm

            return rms_norm(x, self.weight, self.eps, out_dtype)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        out = normed.to(x.dtype) * self.weight
        return out if out_dtype is None else out.to(out_dtype)

    def add_forward(self, x: torch.Tensor, delta: torch.Tensor | None,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add before a norm: (x + delta, self(x + delta)); delta None: (x, self(x)).
        One kernel for both on a GPU."""
        if delta is None:
            return x, self(x, out_dtype)
        if self._fused(x):
            from molmoe_lite.kernels.norms import rms_norm

            return rms_norm(x, self.weight, self.eps, out_dtype, delta=delta)
        x = x + delta
        return x, self(x, out_dtype)

    def rope_to_cache(self, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> bool:
        """Fused path only: one step's k [B, 1, N] normed and rotated (cos, sin [B, 1, D]: each
        row's own position), and v [B, 1, N], written into row b's slot ``slots[b]`` ([B] long)
        of the caches [B, N/D, max_len, D] in one launch. Returns False (and does nothing) where
        the torch code runs instead."""
        if not self._fused(k) or k.shape[1] != 1:
            return False
        from molmoe_lite.kernels.norms import rms_norm_rope_to_cache

        rms_norm_rope_to_cache(k, v, self.weight, self.eps, cos, sin, k_cache, v_cache, slots)
        return True

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_heads: int,
             out_dtype: torch.dtype) -> torch.Tensor:
        """x [B, L, n_heads*D] -> the normed, rotated heads [B, n_heads, L, D] in out_dtype:
        ``apply_rope(self(x).to(out_dtype).view(B, L, n_heads, D).transpose(1, 2), cos, sin)``."""
        B, L, _ = x.shape
        D = cos.shape[-1]
        if self._fused(x):
            from molmoe_lite.kernels.norms import rms_norm

            y = rms_norm(x, self.weight, self.eps, out_dtype, rope=(cos, sin))
            return y.view(B, L, n_heads, D).transpose(1, 2)
        return apply_rope(self(x, out_dtype).view(B, L, n_heads, D).transpose(1, 2), cos, sin)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1 | x2] -> [-x2 | x1] over the last dim (halves, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, L, D] in fp32 for integer positions [B, L].

    Frequency j (j < D/2) is ``theta ** (-2j / D)``; both halves of the head share it.
    """
    device = position_ids.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = position_ids.float()[..., None] * inv_freq  # [B, L, D/2]
    angles = torch.cat((angles, angles), dim=-1)  # [B, L, D]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, L, D] by the angles (cos, sin [B, L, D]); fp32 math, result in x's dtype."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, L, D]: shared by all heads
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def assign_state_dict(
    module: nn.Module,
    state: dict[str, torch.Tensor],
    device: torch.device | str | None = None,
    strict: bool = True,
) -> None:
    """Load ``state`` into a (typically meta-device) module with ``assign=True``, no double copies.

    ``assign=True`` keeps the incoming tensor's dtype, so each tensor is first cast to the
    dtype the module chose for that parameter (e.g. fp32 norms in a fp16 model) and moved
    to ``device`` (default: the parameter's device, unless that is meta, then the tensor's).
    """
    params = dict(module.named_parameters())
    ready = {}
    for key, tensor in state.items():
        target = params.get(key)
        if target is None:  # left for load_state_dict to report as unexpected
            ready[key] = tensor
            continue
        dev = device if device is not None else (tensor.device if target.is_meta else target.device)
        ready[key] = tensor.to(device=dev, dtype=target.dtype)
    module.load_state_dict(ready, strict=strict, assign=True)
