"""``molmoe_lite.load``: a checkpoint folder (or hub id) to a ready ``MolmoE`` with its processor.

Method: read config.json ourselves (no remote code), build the model on the meta
device (no memory, no random init), check the checkpoint's keys and shapes against
the release layout in one pass (one error naming every problem), then stream the
tensors one at a time, each converted to its parameter's dtype and device, and
assign them into the model (``load_state_dict(assign=True)``): no tensor is held
twice. On CPU in float32 a ``pytorch_model.bin`` stays memory-mapped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from molmoe_lite.config import MolmoeConfig
from molmoe_lite.hub import resolve_model
from molmoe_lite.quantize.checkpoint import open_checkpoint, validate
from molmoe_lite.quantize.layout import expected_shapes

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(device: str | torch.device | None) -> torch.device:
    """CUDA when present, else CPU, unless the caller says otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on GPUs that have it, else float16 (Turing)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        try:
            return _DTYPES[str(dtype).lower()]
        except KeyError:
            raise ValueError(f"dtype {dtype!r} is not one of float32, bfloat16, float16") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load(
    path: str | Path,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
):
    """Load a MolmoE checkpoint folder (or hub id) for inference, processor attached."""
    from molmoe_lite.model.molmoe import MolmoE
    from molmoe_lite.processor import Processor

    folder = resolve_model(path)
    config = MolmoeConfig.from_pretrained(folder)
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    with torch.device("meta"):
        model = MolmoE(config, dtype=dtype)
    # the model chose each parameter's dtype (e.g. fp32 norms in a float16 model)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    with open_checkpoint(folder) as reader:
        validate(reader, expected_shapes(config.raw))
        # one tensor at a time: each is converted before the next is read
        state = {key: reader.get(key).to(device=device, dtype=dtypes[key]) for key in reader.keys()}
        model.load_state_dict(state, assign=True, strict=True)
    model.eval()
    model.processor = Processor.from_pretrained(folder)
    return model

