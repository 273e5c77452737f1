"""molmoe-lite: MolmoE-1B in our own code, with quantised experts and fused MoE kernels.

Public names are exported lazily so that ``import molmoe_lite.quantize`` (the converter)
pulls in neither the model code nor triton.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load": "molmoe_lite.api",
    "MolmoeLiteError": "molmoe_lite.errors",
    "MolmoE": "molmoe_lite.model.molmoe",
    "MolmoeConfig": "molmoe_lite.config",
    "Processor": "molmoe_lite.processor",
    "parse_points": "molmoe_lite.points",
    "patch": "molmoe_lite.patching",
    "register_experts_implementation": "molmoe_lite.patching",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'molmoe_lite' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:  # pragma: no cover
    from molmoe_lite.api import load
    from molmoe_lite.config import MolmoeConfig
    from molmoe_lite.errors import MolmoeLiteError
    from molmoe_lite.model.molmoe import MolmoE
    from molmoe_lite.patching import patch, register_experts_implementation
    from molmoe_lite.points import parse_points
    from molmoe_lite.processor import Processor
