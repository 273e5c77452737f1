"""The GPU targets, judged from one results folder: OUT/targets.json, and the table in OUT/targets.txt.

    python benchmarks/targets.py RESULTS_DIR

Kernels, from moe_bench.jsonl (one MoE layer, int4 = group 64):
  - T = 1: int4 reads weights at >= 60% of the measured copy bandwidth (``bw_fraction``);
  - T = 1: int4 is >= 3x faster than the best bf16 provider (bf16_loop, bf16_grouped_mm);
  - T = 1024: int4 takes <= 1.3x the best bf16 provider's time.
Runtime, from e2e.jsonl at batch 1 (memory: the memory-check records):
  - int4 decode reaches >= 50% of its bandwidth floor (``floor_fraction``);
  - int4 decode tokens/s >= 1.6x ours_bf16 and >= 3x nf4_dense;
  - the memory checks: int4 fits 6 GiB, int4_small fits 4.5 GiB.
Tests: the CUDA tests passed on a GPU, in a run not cut at its time limit (tests_summary.json).

Each target gets its measured value, bound and status: "pass", "fail", or "missing" (with the
record it needs) when the run did not produce that measurement; a missing one never counts as
passed. Reads the last usable record per key, like plot_results. Always exits 0: it reports.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plot_results import latest_records, load_records  # noqa: E402

BF16_KERNEL_PROVIDERS = ("bf16_loop", "bf16_grouped_mm")


def _target(area: str, name: str, value, bound: float, passed, need: str) -> dict:
    """One target's record; ``area`` is "tests", "kernel" or "runtime"."""
    if value is None:
        return {"area": area, "target": name, "bound": bound, "value": None, "status": "missing", "needs": need}
    return {"area": area, "target": name, "bound": bound, "value": round(float(value), 4),
            "status": "pass" if passed else "fail"}


def kernel_targets(records: list[dict]) -> list[dict]:
    us = {key: r["us"] for key, r in latest_records(records, ("provider", "T"), "T", "us").items()}
    frac = {key: r["bw_fraction"] for key, r in latest_records(records, ("provider", "T"), "T", "bw_fraction").items()}

    def best_bf16(t: int):
        times = [us[(p, t)] for p in BF16_KERNEL_PROVIDERS if (p, t) in us]
        return min(times) if times else None

    out = []
    f1 = frac.get(("int4", 1))
    out.append(_target("kernel", "T=1 int4: fraction of copy bandwidth", f1, 0.60, f1 is not None and f1 >= 0.60,
                       "moe_bench int4 T=1 with bw_fraction"))
    b1, i1 = best_bf16(1), us.get(("int4", 1))
    speedup = b1 / i1 if b1 and i1 else None
    out.append(_target("kernel", "T=1 int4: speed-up over the best bf16 provider", speedup, 3.0,
                       speedup is not None and speedup >= 3.0, "moe_bench int4 and a bf16 provider at T=1"))
    b1k, i1k = best_bf16(1024), us.get(("int4", 1024))
    ratio = i1k / b1k if b1k and i1k else None
    out.append(_target("kernel", "T=1024 int4: time over the best bf16 provider's", ratio, 1.3,
                       ratio is not None and ratio <= 1.3, "moe_bench int4 and a bf16 provider at T=1024"))
    return out


def runtime_targets(records: list[dict]) -> list[dict]:
    decode = latest_records([r for r in records if not r.get("memory_check")], ("provider", "batch"),
                            "batch", "decode_tokens_per_s")
    tps = {p: r["decode_tokens_per_s"] for (p, b), r in decode.items() if b == 1}
    int4 = decode.get(("int4", 1), {})
    floor = int4.get("floor_fraction")
    out = [_target("runtime", "int4 decode, batch 1: fraction of the bandwidth floor", floor, 0.50,
                   floor is not None and floor >= 0.50, "e2e int4 batch 1 with floor_fraction")]
    for other, bound in (("ours_bf16", 1.6), ("nf4_dense", 3.0)):
        ratio = tps["int4"] / tps[other] if "int4" in tps and tps.get(other) else None
        out.append(_target("runtime", f"int4 decode, batch 1: tokens/s over {other}", ratio, bound,
                           ratio is not None and ratio >= bound, f"e2e int4 and {other} at batch 1"))
    checks = {r["provider"]: r for r in records if r.get("memory_check") and isinstance(r.get("fits"), bool)}
    for provider, budget in (("int4", 6.0), ("int4_small", 4.5)):
        name, rec = f"{provider}: fits {budget} GiB (peak + CUDA context, GiB)", checks.get(provider)
        if rec is None:
            out.append(_target("runtime", name, None, budget, False, f"e2e memory check of {provider}"))
            continue
        # the check's own verdict (no out-of-memory under the capped allocator, and peak + context
        # within the budget); the peak is shown when it was measured
        peak = rec.get("peak_plus_context_gib")
        out.append({"area": "runtime", "target": name, "bound": budget,
                    "value": None if peak is None else round(float(peak), 4),
                    "status": "pass" if rec["fits"] else "fail", "error": rec.get("error")})
    return out


def tests_target(summary: dict | None) -> dict:
    if not summary or "tests" not in summary:
        return _target("tests", "CUDA tests: failures + errors", None, 0, False, "tests_summary.json")
    if str(summary.get("device", "")).startswith("cpu"):  # the CUDA-only tests all skipped
        return _target("tests", "CUDA tests: failures + errors", None, 0, False, "a test run on a GPU")
    if summary.get("interrupted"):  # the tests that did not run could fail
        return _target("tests", "CUDA tests: failures + errors", None, 0, False,
                       "a test run that finished (this one was cut at its time limit)")
    bad = summary.get("failures", 0) + summary.get("errors", 0)
    t = _target("tests", "CUDA tests: failures + errors", bad, 0, bad == 0 and summary["tests"] > 0, "")
    t["tests"], t["skipped"], t["failed"] = summary["tests"], summary.get("skipped", 0), summary.get("failed", [])
    return t


def judge(folder: Path) -> dict:
    def jsonl(name: str) -> list[dict]:
        return load_records(folder / name) if (folder / name).exists() else []

    summary_path = folder / "tests_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    moe, e2e = jsonl("moe_bench.jsonl"), jsonl("e2e.jsonl")
    targets = [tests_target(summary)] + kernel_targets(moe) + runtime_targets(e2e)
    devices = sorted({str(r["device"]) for r in moe + e2e if r.get("device")})
    counts = {s: sum(t["status"] == s for t in targets) for s in ("pass", "fail", "missing")}
    return {"folder": str(folder), "devices": devices, "targets": targets, **counts}


def format_table(result: dict) -> str:
    lines = [f"targets from {result['folder']} on {', '.join(result['devices']) or 'no device recorded'}:"]
    for t in result["targets"]:
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        note = f"  (needs {t['needs']})" if t["status"] == "missing" else (f"  ({t['error']})" if t.get("error") else "")
        lines.append(f"  {t['area']:<8} {t['status']:<7} {t['target']:<58} {value:>8} vs {t['bound']}{note}")
    lines.append(f"pass {result['pass']}, fail {result['fail']}, missing {result['missing']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="a gpu_check.sh results folder")
    args = ap.parse_args(argv)
    result = judge(args.folder)
    (args.folder / "targets.json").write_text(json.dumps(result, indent=2) + "\n")
    table = format_table(result)
    (args.folder / "targets.txt").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
