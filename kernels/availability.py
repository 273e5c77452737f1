"""Whether the Triton kernels run for a tensor: the one rule the whole package follows.

The kernels can run on a CUDA tensor when triton imports, and on any tensor under Triton's
CPU interpreter (``TRITON_INTERPRET=1``, how the CPU tests run them). A compiled kernel given
CPU pointers would crash, so the answer depends on the tensor's device, never on whether a
GPU is merely present.

Callers pass their own setting: False runs the torch code, True asks for the kernels (an
error where they cannot run), None leaves the choice to the rule. Runtime modules (norms,
quantised experts and linears, patched experts) choose the kernels by default on CUDA only,
so a CPU model stays on the torch code even under the interpreter unless a test forces the
kernels; the kernel API (``fused_moe`` and friends) chooses them wherever they can run.
This module imports neither triton nor any kernel module.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from molmoe_lite.errors import MolmoeLiteError

HAS_TRITON = importlib.util.find_spec("triton") is not None


class KernelsUnavailableError(MolmoeLiteError, RuntimeError):
    """The Triton kernels were asked for where they cannot run."""


def interpreter_enabled() -> bool:
    """True when Triton's CPU interpreter is switched on (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernels_available(device: torch.device) -> bool:
    """Whether the kernels can run on ``device``: CUDA with triton, or anywhere under the interpreter."""
    if not HAS_TRITON:
        return False
    return interpreter_enabled() or (device.type == "cuda" and torch.cuda.is_available())


def use_kernels(tensor: torch.Tensor, setting: bool | None = None, *, on_cpu_by_default: bool = False) -> bool:
    """Whether the kernels run for ``tensor``, given a caller's ``setting``.

    False: never. True: yes, or KernelsUnavailableError where they cannot run. None: where
    they can run, but off CUDA only when ``on_cpu_by_default`` (the kernel API's choice; the
    runtime modules keep the CPU on the torch code).
    """
    if setting is False:
        return False
    available = kernels_available(tensor.device)
    if setting is True and not available:
        why = "triton is not installed" if not HAS_TRITON else "TRITON_INTERPRET=1 was not set before triton was imported"
        raise KernelsUnavailableError(
            f"the Triton kernels cannot run on a {tensor.device.type} tensor here ({why}); "
            "move the model to a CUDA device or let the torch code run")
    if setting is True:
        return True
    return available and (tensor.device.type == "cuda" or on_cpu_by_default)
