"""Ahead-of-time compile of every kernel with every shipped launch config, no GPU needed.

The interpreter runs kernels without resource limits, so a config needing more shared memory
than a laptop GPU has passes the CPU tests and fails on the card. This compiles each kernel
through Triton's real pipeline (``triton.compile(ASTSource, target=GPUTarget("cuda", cap, 32))``,
LLVM and the ptxas shipped in the triton wheel) at MolmoE's constants (top-8, G = 64, 64
experts) and reports the shared memory against configs.SMEM_LIMIT. Activations are bf16 from
sm_80 on and fp16 on sm_75 (Turing has no bf16 tensor cores).

Every pointer and integer argument is marked divisible by 16, as Triton's JIT specialises them at
MolmoE's real sizes (H = 2048, I = 1024, packed rows of 512-2048 bytes, torch's aligned buffers):
without that the compiled code is the worst case (no 128-bit loads, no cp.async pipelining) and
under-reports shared memory. Each result also says how the compiled PTX reads memory:
``load_bytes`` (the widest global load, 16 = 128-bit vectors) and ``async_copies`` (cp.async
instructions, present when the tile loop is software-pipelined through shared memory), and
``int_to_float`` (slow conversion instructions; the expert kernels should have none).

Run as ``python -m molmoe_lite.kernels.aot [--arch 86] [--bits 4 8] [--json] [-j 2]``; exit status 0
when everything compiles and fits, 1 otherwise, 3 when this machine cannot compile for CUDA at all.
Must run in a process without TRITON_INTERPRET=1: whether triton's own ``tl.max``/``tl.sum`` are
compiled or interpreted is fixed when triton is imported, so this entry point switches the
interpreter off before importing it (a test session that interprets calls it in a subprocess).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

# kernel key -> (module, kernel function); the four expert kernels take the config tables (the
# routing kernel and the decoder's fused norms are compiled too, at MolmoE's sizes)
EXPERT_KERNELS = {
    "gate_up_decode": ("moe_gemv", "_gate_up_gemv_kernel"),
    "down_decode": ("moe_gemv", "_down_gemv_kernel"),
    "gate_up_grouped": ("moe_grouped", "_gate_up_grouped_kernel"),
    "down_grouped": ("moe_grouped", "_down_grouped_kernel"),
}
TOOLCHAIN_EXIT = 3


def _ptr_types(act: str, bits: int) -> dict[str, str]:
    q = "*u8" if bits == 4 else "*i8"
    return {"x_ptr": act, "act_ptr": act, "out_ptr": act, "y_ptr": act, "logits_ptr": act,
            "qw_ptr": q, "s_ptr": "*fp16", "z_ptr": "*fp16", "w_ptr": "*fp32", "weights_ptr": "*fp32",
            "partial_ptr": "*fp32"}


# MolmoE's expert sizes, for the decode tiles the runtime picks at T = 1
HIDDEN, INTER, TOP_K = 2048, 1024, 8
# (rows, row length, programs along the pair/token axis at T = 1) of each decode kernel
DECODE_T1 = {"gate_up_decode": (INTER, HIDDEN, TOP_K), "down_decode": (HIDDEN, INTER, 1)}
# SM count of a typical card of each architecture (T4, A100, RTX 3060 Laptop, RTX 4060 Laptop,
# H100 SXM): the decode launch at T = 1 depends on it (moe_gemv.decode_tiles)
REFERENCE_SMS = {75: 40, 80: 108, 86: 30, 89: 24, 90: 132}


def _norm_jobs(cap: int, act: str) -> list[dict]:
    """The decoder's norms at d_model = 2048: norm and residual add + norm (on the fp32 residual),
    QK-norm + RoPE (heads of 128), and the k-norm + RoPE that writes k and v into their cache slot."""
    ptrs = {"x_ptr": "*fp32", "w_ptr": "*fp32", "out_ptr": act, "cos_ptr": "*fp32", "sin_ptr": "*fp32",
            "delta_ptr": act, "sum_ptr": "*fp32", "k_ptr": act, "v_ptr": act, "k_cache_ptr": act,
            "v_cache_ptr": act, "pos_ptr": "*i64"}
    kernels = {"rms_norm": ("_rms_norm_kernel", {}), "add_rms_norm": ("_add_rms_norm_kernel", {}),
               "rms_norm_rope": ("_rms_norm_rope_kernel", {"HEAD_DIM": 128, "x_ptr": act}),
               "rms_norm_rope_to_cache": ("_rms_norm_rope_to_cache_kernel", {"HEAD_DIM": 128})}
    jobs = []
    for name, (fn, extra) in kernels.items():
        const = {"PROD": "fp32", "BLOCK": HIDDEN, **{k: v for k, v in extra.items() if not k.endswith("_ptr")}}
        job_ptrs = {**ptrs, **{k: v for k, v in extra.items() if k.endswith("_ptr")}}
        jobs.append({"kernel": name, "module": "norms", "fn": fn, "cap": cap, "bits": 0, "shape": "table",
                     "ptrs": job_ptrs, "const": const, "scalars": {"eps": "fp32"}, "options": {"num_warps": 8}})
    return jobs


def _expert_jobs(cap: int, act: str, bits_list: list[int]) -> list[dict]:
    """The four expert kernels with the architecture's table, and the decode kernels also with
    the tiles ``decode_tiles`` picks at T = 1 on the architecture's reference card."""
    from .configs import CONFIGS
    from .moe_gemv import decode_tiles, expert_split

    jobs = []
    for key, (mod, fn) in EXPERT_KERNELS.items():
        cfg = CONFIGS[cap][key]
        for bits in bits_list:
            tiles = {"table": (cfg["BLOCK_N"], cfg["BLOCK_K"], 1)}
            if key in DECODE_T1:
                rows, k, programs = DECODE_T1[key]
                bn, bk = decode_tiles(cfg, rows, k, bits, programs, REFERENCE_SMS[cap])
                split = expert_split(cfg, TOP_K, -(-rows // bn), REFERENCE_SMS[cap]) if key == "down_decode" else 1
                tiles["T=1"] = (bn, bk, split)
            for shape, (bn, bk, split) in tiles.items():
                const = {"BITS": bits, "GROUP": 64, "BLOCK_N": bn, "BLOCK_K": bk}
                if key == "down_decode":
                    const["SPLIT"] = split
                if key != "down_grouped":
                    const["TOP_K"] = TOP_K
                if "grouped" in key:
                    const.update(BLOCK_M=cfg["BLOCK_M"], PRECISION="tf32")
                jobs.append({"kernel": key, "module": mod, "fn": fn, "cap": cap, "bits": bits, "shape": shape,
                             "ptrs": _ptr_types(act, bits), "const": const,
                             "options": {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}})
    return jobs


def job_list(archs: list[int], bits_list: list[int]) -> list[dict]:
    """Every (kernel, arch, bits, shape) to compile, with its constants and launch options.

    ``shape`` is "table" (the config as shipped) or, for the decode kernels, "T=1" (the tiles
    ``decode_tiles`` picks at batch 1 on the architecture's reference card).
    """
    jobs = []
    for cap in archs:
        act = "*fp16" if cap < 80 else "*bf16"
        jobs.append({"kernel": "topk_softmax", "module": "routing", "fn": "_topk_softmax_kernel", "cap": cap,
                     "bits": 0, "shape": "table", "ptrs": _ptr_types(act, 4),
                     "const": {"TOP_K": TOP_K, "BLOCK_TOP_K": 8, "BLOCK_E": 64, "RENORMALIZE": False},
                     "options": {"num_warps": 1}})
        jobs += _norm_jobs(cap, act)
        jobs.append({"kernel": "embedding", "module": "norms", "fn": "_embedding_kernel", "cap": cap, "bits": 0,
                     "shape": "table", "ptrs": {"ids_ptr": "*i64", "table_ptr": act, "new_ptr": act, "out_ptr": act},
                     "const": {"HAS_NEW": True, "BLOCK": HIDDEN}, "options": {"num_warps": 8}})
        jobs += _expert_jobs(cap, act, bits_list)
    return jobs


def compile_job(job: dict) -> dict:
    """Compile one job; returns the job's identity plus ``shared`` bytes or ``error``."""
    os.environ["TRITON_INTERPRET"] = "0"
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .configs import SMEM_LIMIT

    import triton.language as tl

    kernel = getattr(importlib.import_module(f"molmoe_lite.kernels.{job['module']}"), job["fn"])
    # dtype constants travel as names (jobs cross process boundaries)
    const = {k: getattr(tl, {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[v]) if k == "PROD" else v
             for k, v in job["const"].items()}
    sig = {}
    for name in kernel.arg_names:
        if name in job["const"]:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = job["ptrs"].get(name, "*i32")  # index buffers are int32
        else:
            sig[name] = job.get("scalars", {}).get(name, "i32")
    res = {k: job[k] for k in ("kernel", "cap", "bits", "shape")}
    res["tiles"] = {k: v for k, v in job["const"].items() if k.startswith("BLOCK_") or k == "SPLIT"}
    res["limit"] = SMEM_LIMIT[job["cap"]]
    # the JIT's specialisation at MolmoE's sizes: every runtime argument a multiple of 16 except
    # the token count
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.arg_names)
             if (sig[name].startswith("*") or sig[name] == "i32") and name != "T"}
    try:
        ck = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const, attrs=attrs),
                            target=GPUTarget("cuda", job["cap"], 32), options=job["options"])
    except Exception as exc:  # noqa: BLE001 - reported per job, the caller decides
        res["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return res
    res["shared"] = int(ck.metadata.shared)
    res["has_cubin"] = "cubin" in ck.asm
    res.update(ptx_summary(ck.asm.get("ptx", "")))
    return res


_LOAD_BYTES = {"b8": 1, "u8": 1, "s8": 1, "b16": 2, "u16": 2, "s16": 2, "f16": 2,
               "b32": 4, "u32": 4, "s32": 4, "f32": 4, "b64": 8, "u64": 8, "s64": 8, "f64": 8}


def ptx_summary(ptx: str) -> dict:
    """The widest global load in bytes (``ld.global.v4.b32`` = 16), the cp.async count, and the
    integer-to-float conversions (``cvt.rn.f32.u16`` etc.: 16 a clock per SM against 128 fp32
    adds, so the kernels build code values with bit tricks instead, quant_tiles)."""
    widest = 0
    for vec, elem in re.findall(r"ld\.global(?:\.[a-z_0-9:]+)*?(?:\.v(\d))?\.([bfsu]\d+)\s", ptx):
        widest = max(widest, int(vec or 1) * _LOAD_BYTES.get(elem, 0))
    return {"load_bytes": widest, "async_copies": len(re.findall(r"cp\.async\.c[ag]", ptx)),
            "int_to_float": len(re.findall(r"cvt\.rn(?:\.[a-z]+)*\.f(?:16|32)\.[us]\d+", ptx))}


def toolchain_problem() -> str | None:
    """None when a trivial compile for sm_80 works here, else why not."""
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        import triton
        import triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except Exception as exc:  # noqa: BLE001
        return f"triton does not import: {exc}"

    @triton.jit
    def _probe(p):
        tl.store(p, 1.0)

    try:
        triton.compile(ASTSource(fn=_probe, signature={"p": "*fp32"}), target=GPUTarget("cuda", 80, 32))
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"[:500]
    return None


def main(argv: list[str] | None = None) -> int:
    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported anywhere in this process
    from .configs import CONFIGS

    ap = argparse.ArgumentParser(prog="python -m molmoe_lite.kernels.aot", description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="*", default=sorted(CONFIGS), help="compute capabilities, e.g. 75 86")
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 8], choices=[4, 8])
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="compile in this many processes")
    args = ap.parse_args(argv)
    bad_arch = [a for a in args.arch if a not in CONFIGS]
    if bad_arch:
        ap.error(f"no shipped config for arch {bad_arch}; shipped: {sorted(CONFIGS)}")
    problem = toolchain_problem()
    if problem:
        print(f"cannot compile for CUDA here: {problem}", file=sys.stderr)
        return TOOLCHAIN_EXIT
    jobs = job_list(args.arch, args.bits)
    if args.jobs > 1:
        # spawn: fresh workers that import triton with the interpreter off, no forked threads
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(compile_job, jobs))
    else:
        results = [compile_job(j) for j in jobs]
    failed = 0
    for r in results:
        ok = "error" not in r and r["shared"] <= r["limit"]
        failed += not ok
        if args.json:
            print(json.dumps(r), flush=True)
        else:
            what = r.get("error") or (f"{r['shared']:>7} B shared (limit {r['limit']}), loads <= {r['load_bytes']} B, "
                                      f"{r['async_copies']} cp.async")
            print(f"sm_{r['cap']} {r['kernel']:<16} {r['shape']:<5} int{r['bits'] or '-'}  {'ok  ' if ok else 'FAIL'} {what}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
