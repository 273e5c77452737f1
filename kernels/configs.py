"""Launch configurations per GPU: built-in tables per architecture, measured tables shipped as
data, and an environment variable that pins one.

Each architecture gets a table {kernel name: {block sizes, num_warps, num_stages}} sized to its
per-block shared-memory limit: the grouped kernels pipeline their tiles through shared memory
(num_stages copies), the GEMV-style decode kernels use almost none. ``aot.py`` compiles every
kernel with every table for every architecture and checks the shared memory it reports.

Measured tables: the launch sweep (``benchmarks/sweep_decode.py``) writes a JSON file per
device, ``{"device", "capability", "measured": {when, where, ...}, "table": {kernel: launch}}``;
shipped as ``launch_configs/<device-name>.json`` inside this package (the name lower-cased,
runs of other characters as one "-": ``nvidia-h200.json``), it is merged over the
architecture's table when the running GPU has that name. Without one, the built-in tables run.

Pinning: ``MOLMOE_LITE_KERNEL_CONFIG`` is an architecture name (``sm_80``: that built-in table
on any device, no measured file), the path of a sweep's JSON file (its table merged over the
detected one), or a JSON object of per-kernel overrides merged over the detected table, e.g.
``{"down_decode": {"BLOCK_N": 16}, "decode_max_tokens": 4}``. The decode kernels' tiles are
adapted to the GPU's SM count at launch (moe_gemv.decode_tiles) unless the table says
``"fill_sms": 0``, e.g. ``{"down_decode": {"BLOCK_N": 4, "BLOCK_K": 1024, "fill_sms": 0}}``, and the
down kernel splits a token's experts over programs on big GPUs (moe_gemv.expert_split) unless
it sets ``"EXPERT_SPLIT"``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from pathlib import Path

import torch
from molmoe_lite.errors import MolmoeLiteError

ENV_VAR = "MOLMOE_LITE_KERNEL_CONFIG"
MEASURED_DIR = Path(__file__).resolve().parent / "launch_configs"

KERNELS = ("gate_up_decode", "down_decode", "gate_up_grouped", "down_grouped")

# opt-in dynamic shared memory per block (bytes), CUDA programming guide, "compute capabilities"
SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class KernelConfigError(MolmoeLiteError, ValueError):
    """A bad value of MOLMOE_LITE_KERNEL_CONFIG."""


def _table(dec_gu, dec_dn, grp_gu, grp_dn, decode_max_tokens):
    return {"gate_up_decode": dec_gu, "down_decode": dec_dn, "gate_up_grouped": grp_gu,
            "down_grouped": grp_dn, "decode_max_tokens": decode_max_tokens}


# Decode: GEMV-style, one program per pair x BLOCK_N rows; BLOCK_N is small so that at T = 1
# there are several programs per SM (H=2048 / 8 = 256 programs for down) and all SMs read weights
# (moe_gemv.decode_tiles trades BLOCK_N for BLOCK_K further on big GPUs). A tile is sized so
# that each thread's share of an int4 step is 16 bytes (BLOCK_N * BLOCK_K / 2 = 16 * 32 * num_warps):
# one 128-bit load, which aot.py checks in the compiled PTX.
# Grouped: tensor-core tiles; BLOCK_K >= 32 because int4 splits a K-step into even/odd halves and
# tl.dot needs an inner size of at least 16.
CONFIGS = {
    75: _table(
        {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 1},
        {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 2, "num_stages": 1},
        {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
        8),
    80: _table(
        {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        8),
    86: _table(
        {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 2},
        8),
    89: _table(
        {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2},
        {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
        8),
    90: _table(
        {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3},
        {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
        8),
}

# Nearest shipped table for an unlisted capability (e.g. sm_87 Orin -> 86, sm_100+ -> 90).
def _nearest_arch(cap: int) -> int:
    known = sorted(CONFIGS)
    below = [a for a in known if a <= cap]
    return below[-1] if below else known[0]


def _check_table(over: object, where: str) -> dict:
    """A table of per-kernel overrides: known keys, kernels mapped to objects."""
    if not isinstance(over, dict):
        raise KernelConfigError(f"{where}: JSON must be an object, got {type(over).__name__}")
    for key, val in over.items():
        if key not in KERNELS and key != "decode_max_tokens":
            raise KernelConfigError(f"{where}: unknown key {key!r}; known: {', '.join(KERNELS)}, decode_max_tokens")
        if key in KERNELS and not isinstance(val, dict):
            raise KernelConfigError(f"{where}: {key} must map to an object of launch parameters")
    return over


def device_file_name(device_name: str) -> str:
    """``NVIDIA GeForce RTX 4060 Laptop GPU`` -> ``nvidia-geforce-rtx-4060-laptop-gpu.json``."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-") + ".json"


def read_measured(path: Path) -> dict:
    """The table of a sweep's JSON file (checked like a pin)."""
    try:
        record = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KernelConfigError(f"{path}: not a readable launch-config JSON file ({exc})") from None
    if not isinstance(record, dict) or "table" not in record:
        raise KernelConfigError(f"{path}: a launch-config file needs a 'table' object")
    return _check_table(record["table"], str(path))


def measured_table(name: str | None) -> dict:
    """The shipped measured table for a GPU of that name, or {} (the built-in tables run)."""
    if not name:
        return {}
    path = MEASURED_DIR / device_file_name(name)
    return read_measured(path) if path.is_file() else {}


def _parse_env(value: str) -> tuple[int | None, dict]:
    """(pinned architecture or None, overrides) from the environment variable's value."""
    value = value.strip()
    if value.startswith("sm_"):
        try:
            arch = int(value[3:])
        except ValueError:
            arch = -1
        if arch not in CONFIGS:
            raise KernelConfigError(
                f"{ENV_VAR}={value!r}: unknown architecture; shipped: {', '.join(f'sm_{a}' for a in CONFIGS)}")
        return arch, {}
    if value.endswith(".json") and not value.startswith("{"):
        return None, read_measured(Path(value))
    try:
        over = json.loads(value)
    except json.JSONDecodeError as exc:
        raise KernelConfigError(f"{ENV_VAR}: neither sm_XX, a .json file nor valid JSON ({exc})") from None
    return None, _check_table(over, ENV_VAR)


def _merge(table: dict, over: dict) -> None:
    for key, val in over.items():
        if isinstance(val, dict):
            table[key].update(val)
        else:
            table[key] = int(val)


@functools.lru_cache(maxsize=None)
def _resolved(cap: int, name: str | None, env_value: str) -> dict:
    arch, over = _parse_env(env_value) if env_value else (None, {})
    if arch is not None:  # a pinned architecture: its built-in table as it is
        return copy.deepcopy(CONFIGS[arch])
    table = copy.deepcopy(CONFIGS[_nearest_arch(cap)])
    _merge(table, measured_table(name))
    _merge(table, over)
    return table


@functools.lru_cache(maxsize=None)
def _cuda_identity(index: int) -> tuple[int, str]:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor, torch.cuda.get_device_name(index)


def device_identity(device: torch.device | None = None) -> tuple[int, str | None]:
    """(compute capability as an int, 86 for sm_86; the GPU's name) of a CUDA device; off CUDA
    (the interpreter path) (80, None)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return _cuda_identity(device.index if device.index is not None else torch.cuda.current_device())
    return 80, None


def get_config(device: torch.device | None = None) -> dict:
    """The launch table for ``device``: the architecture's, the measured file for the device's
    name over it, then MOLMOE_LITE_KERNEL_CONFIG."""
    return _resolved(*device_identity(device), os.environ.get(ENV_VAR, ""))
