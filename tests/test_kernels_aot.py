"""Ahead-of-time compile of every kernel with every shipped launch config, for sm_75/80/86/89/90.

The interpreter has no resource limits, so a config needing more shared memory than a laptop
GPU has would pass the CPU tests and fail on the card. kernels/aot.py compiles each kernel
through Triton's real compiler (GPUTarget, ptxas from the triton wheel, no GPU needed) at
MolmoE's constants and reports its shared memory; this test runs it once, in a subprocess
(the interpreter choice is fixed when triton is imported, and this session interprets), and
checks every (kernel, arch, bits) against the architecture's per-block limit, and how the PTX
reads memory: the decode kernels (as shipped and as launched at T = 1) with 128-bit weight loads,
the grouped kernels software-pipelined through cp.async where the architecture has it.
Also: config-table sanity, decode_tiles, and the MOLMOE_LITE_KERNEL_CONFIG pin.
"""

import json
import os
import subprocess
import sys

import pytest

from molmoe_lite.kernels import aot, configs
from molmoe_lite.kernels.moe_gemv import decode_tiles

ARCHS = sorted(configs.CONFIGS)
JOBS = [(j["kernel"], j["cap"], j["bits"], j["shape"]) for j in aot.job_list(ARCHS, [4, 8])]
IDS = [f"sm_{c}-{k}-{s}-int{b}" for k, c, b, s in JOBS]


@pytest.fixture(scope="module")
def aot_results():
    """(kernel, cap, bits, shape) -> result dict, from one `python -m molmoe_lite.kernels.aot --json` run."""
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
            results[(r["kernel"], r["cap"], r["bits"], r["shape"])] = r
    assert results, f"aot produced no results (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return results


@pytest.mark.parametrize("kernel,cap,bits,shape", JOBS, ids=IDS)
def test_kernel_compiles_within_shared_memory(aot_results, kernel, cap, bits, shape):
    r = aot_results.get((kernel, cap, bits, shape))
    assert r is not None, "job missing from the aot output"
    assert "error" not in r, f"{kernel} int{bits} does not compile for sm_{cap}: {r.get('error')}"
    assert r["has_cubin"]
    assert r["shared"] <= configs.SMEM_LIMIT[cap], (
        f"{kernel} int{bits} on sm_{cap}: {r['shared']} B shared memory > limit {configs.SMEM_LIMIT[cap]} B")
    if "decode" in kernel:
        # batch-1 decode is a weight stream: every thread's share of a tile is one 128-bit load
        assert r["load_bytes"] == 16, f"{kernel} {shape} {r['tiles']}: widest load {r['load_bytes']} B, want 16"
    if kernel in aot.EXPERT_KERNELS:  # codes become floats by bit tricks, not 1/8-rate conversions
        assert r["int_to_float"] == 0, f"{kernel} int{bits} on sm_{cap}: {r['int_to_float']} int->float cvt"
    if "grouped" in kernel and cap >= 80:  # cp.async exists from sm_80 on
        assert r["async_copies"] > 0, f"{kernel} int{bits} on sm_{cap}: tile loop not pipelined (no cp.async)"


def test_ptx_summary_reads_load_widths():
    ptx = """ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p1 ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd2 + 0 ];
    ld.global.b16 %rs1, [ %rd3 + 0 ];
    cp.async.cg.shared.global [ %r7 + 0 ], [ %rd4 + 0 ], 0x10, %r8;
    cp.async.ca.shared.global [ %r9 + 0 ], [ %rd5 + 0 ], 0x4, %r10;"""
    assert aot.ptx_summary(ptx) == {"load_bytes": 16, "async_copies": 2, "int_to_float": 0}
    assert aot.ptx_summary("ld.global.b16 %rs1, [ %rd3 + 0 ];\ncvt.rn.f32.u16 %f1, %rs1;\n"
                           "cvt.rn.f32.s32 %f2, %r1;\ncvt.f32.bf16 %f3, %rs2;") == {
        "load_bytes": 2, "async_copies": 0, "int_to_float": 2}


DOWN_CFG = {"BLOCK_N": 8, "BLOCK_K": 512}  # shapes of the shipped sm_80+ decode tables
GATE_UP_CFG = {"BLOCK_N": 16, "BLOCK_K": 256}


@pytest.mark.parametrize("name,cfg,rows,k,bits,programs,sms,want", [
    ("cpu-keeps-table", DOWN_CFG, 2048, 1024, 4, 1, None, (8, 512)),
    ("small-matrix-clips", DOWN_CFG, 24, 40, 4, 1, None, (8, 64)),
    ("h100-down-T1", DOWN_CFG, 2048, 1024, 4, 1, 132, (4, 1024)),  # 256 -> 512 programs
    ("h100-gate_up-T1", GATE_UP_CFG, 1024, 2048, 4, 8, 132, (8, 512)),  # 512 -> 1024 programs
    ("h100-gate_up-T4", GATE_UP_CFG, 1024, 2048, 4, 32, 132, (16, 256)),  # 2048 programs: table kept
    ("laptop-down-T1", DOWN_CFG, 2048, 1024, 4, 1, 24, (8, 512)),
    ("row-caps-block_k", DOWN_CFG, 2048, 512, 8, 1, 132, (4, 512)),
    ("pinned-exactly", {**DOWN_CFG, "fill_sms": 0}, 2048, 1024, 4, 1, 132, (8, 512)),
])
def test_decode_tiles_trade_block_n_for_block_k(name, cfg, rows, k, bits, programs, sms, want):
    bn, bk = decode_tiles(cfg, rows, k, bits, programs, sms)
    assert (bn, bk) == want
    if sms and cfg.get("fill_sms", 1):  # enough programs, or BLOCK_N at its floor
        assert programs * -(-rows // bn) >= 4 * sms or bn == 4


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
    for bad, msg in [("sm_99", "unknown architecture"), ("{nope", "neither sm_XX"),
                     ('{"gate": {}}', "unknown key"), ('{"down_decode": 3}', "must map to an object")]:
        monkeypatch.setenv(configs.ENV_VAR, bad)
        with pytest.raises(configs.KernelConfigError, match=msg):
            configs.get_config()
