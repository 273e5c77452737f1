"""Ahead-of-time compile of every kernel with every shipped launch config, for sm_75/80/86/89/90.

The interpreter has no resource limits, so a config needing more shared memory than a laptop
GPU has would pass the CPU tests and fail on the card. kernels/aot.py compiles each kernel
through Triton's real compiler (GPUTarget, ptxas from the triton wheel, no GPU needed) at
MolmoE's constants and reports its shared memory; this test runs it once, in a subprocess
(the interpreter choice is fixed when triton is imported, and this session interprets), and
checks every (kernel, arch, bits) against the architecture's per-block limit.
Also: config-table sanity and the MOLMOE_LITE_KERNEL_CONFIG pin.
"""

import json
import os
import subprocess
import sys

import pytest

from molmoe_lite.kernels import aot, configs

ARCHS = sorted(configs.CONFIGS)
JOBS = [(j["kernel"], j["cap"], j["bits"]) for j in aot.job_list(ARCHS, [4, 8])]


@pytest.fixture(scope="module")
def aot_results():
    """(kernel, cap, bits) -> result dict, from one `python -m molmoe_lite.kernels.aot --json` run."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    # about 45 compiles at ~1-2 s each; two processes halve the wall time on this 2-core machine
    proc = subprocess.run([sys.executable, "-m", "molmoe_lite.kernels.aot", "--json", "-j", "2"],
                          env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == aot.TOOLCHAIN_EXIT:
        pytest.skip(f"ahead-of-time CUDA compile impossible here: {proc.stderr.strip()[-300:]}")
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[(r["kernel"], r["cap"], r["bits"])] = r
    assert results, f"aot produced no results (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return results


@pytest.mark.parametrize("kernel,cap,bits", JOBS, ids=[f"sm_{c}-{k}-int{b}" for k, c, b in JOBS])
def test_kernel_compiles_within_shared_memory(aot_results, kernel, cap, bits):
    r = aot_results.get((kernel, cap, bits))
    assert r is not None, "job missing from the aot output"
    assert "error" not in r, f"{kernel} int{bits} does not compile for sm_{cap}: {r.get('error')}"
    assert r["has_cubin"]
    assert r["shared"] <= configs.SMEM_LIMIT[cap], (
        f"{kernel} int{bits} on sm_{cap}: {r['shared']} B shared memory > limit {configs.SMEM_LIMIT[cap]} B")


def test_every_table_is_complete():
    for cap, table in configs.CONFIGS.items():
        assert set(configs.KERNELS) <= set(table), f"sm_{cap} misses a kernel"
        for key in configs.KERNELS:
            for p in ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages"):
                assert p in table[key], f"sm_{cap} {key} misses {p}"
            for p, v in table[key].items():
                if p.startswith("BLOCK_"):
                    assert v & (v - 1) == 0, f"sm_{cap} {key} {p}={v} is not a power of two"
            if "grouped" in key:
                assert table[key]["BLOCK_K"] >= 32  # int4 halves a K-step; tl.dot needs >= 16


def test_env_pins_a_config(monkeypatch):
    monkeypatch.setenv(configs.ENV_VAR, "sm_75")
    assert configs.get_config() == configs.CONFIGS[75]
    monkeypatch.setenv(configs.ENV_VAR, '{"down_decode": {"BLOCK_N": 32}, "decode_max_tokens": 2}')
    cfg = configs.get_config()
    assert cfg["down_decode"]["BLOCK_N"] == 32 and cfg["decode_max_tokens"] == 2
    assert cfg["gate_up_decode"] == configs.CONFIGS[80]["gate_up_decode"]  # the rest: off-CUDA default table
    assert configs.CONFIGS[80]["down_decode"]["BLOCK_N"] != 32  # the shipped table is not modified
    for bad, msg in [("sm_99", "unknown architecture"), ("{nope", "neither sm_XX nor valid JSON"),
                     ('{"gate": {}}', "unknown key"), ('{"down_decode": 3}', "must map to an object")]:
        monkeypatch.setenv(configs.ENV_VAR, bad)
        with pytest.raises(configs.KernelConfigError, match=msg):
            configs.get_config()
