"""Guards for tests: fail when code creates what it must not.

``no_dense_experts`` watches every op (a torch dispatch mode) and fails if a
floating-point tensor shaped like dense expert weights appears: loading a quantised
checkpoint must never materialise one, however briefly.
"""

from __future__ import annotations

import contextlib

import torch

from molmoe_lite.errors import MolmoeLiteError


class DenseExpertError(MolmoeLiteError, RuntimeError):
    """A dense (float) expert tensor was created where only quantised ones may exist."""


@contextlib.contextmanager
def no_dense_experts(n_experts: int, d: int, hidden: int):
    """Fail if any op inside the block creates a floating-point tensor shaped like expert weights.

    Shapes watched: one expert's gate/up [I, H], fused gate+up [2I, H], and the stacked
    [E, 2I, H], [E, I, H], [E, H, I]. One expert's down [H, I] is not watched: the vision
    projector's w2 has that shape by design; any dense expert path creates gate/up too. Loading a quantised checkpoint must
    create none of them (they would mean a dense copy, however brief). Violations are
    collected and raised when the block ends, so code that wraps exceptions (a reader
    turning any failure into a CheckpointError) cannot hide them. Choose test sizes where
    no other weight of the model shares these shapes.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    watched = {
        (hidden, d), (2 * hidden, d),
        (n_experts, 2 * hidden, d), (n_experts, hidden, d), (n_experts, d, hidden),
    }
    seen: list[str] = []

    class _Guard(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if (
                    isinstance(t, torch.Tensor)
                    and t.device.type != "meta"  # shapes only, no memory
                    and t.is_floating_point()
                    and tuple(t.shape) in watched
                ):
                    seen.append(f"{func}: {tuple(t.shape)} {t.dtype}")
            return out

    try:
        with _Guard():
            yield
    finally:
        if seen:
            raise DenseExpertError(f"{len(seen)} dense expert-shaped tensors were created, first: {seen[0]}")
