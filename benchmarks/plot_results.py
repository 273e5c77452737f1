"""PNG plots of a benchmark results folder (what ``gpu_check.sh`` writes).

    python benchmarks/plot_results.py RESULTS_DIR [--out DIR]

Reads, when present:
  moe_bench.jsonl  the kernel suite (one MoE layer per provider x T) ->
                   moe_time.png (microseconds per layer against T, log-log) and
                   moe_bw_fraction.png (fraction of measured copy bandwidth against T, log-x)
  e2e.jsonl        the end-to-end benchmark (provider x batch) ->
                   e2e_decode.png (decode tokens/s per provider, one bar per batch size,
                   labelled with the bandwidth-floor fraction)

Records that were skipped, failed or lack the plotted value are left out; when a file holds
several runs (it is appended to), the last record of each provider x T (or x batch) wins.
Needs matplotlib, which is NOT a dependency of molmoe-lite (benchmarks/ is not installed
with the package either): without it the script says so and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def load_records(path: Path) -> list[dict]:
    """JSON lines of ``path``; unreadable lines are reported and skipped."""
    records = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            print(f"{path}:{n}: not JSON, skipped", file=sys.stderr)
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


def _usable(rec: dict, *fields: str) -> bool:
    return not rec.get("skipped") and not rec.get("error") and all(
        isinstance(rec.get(f), (int, float)) and not isinstance(rec.get(f), bool) for f in fields
    )


def latest_records(records: list[dict], key_fields: tuple[str, ...], *value_fields: str) -> dict[tuple, dict]:
    """The last usable record per key (a file appended to by several runs)."""
    out: dict[tuple, dict] = {}
    for rec in records:
        if _usable(rec, *value_fields):
            out[tuple(rec.get(k) for k in key_fields)] = rec
    return out


def _device(records: list[dict]) -> str:
    names = sorted({str(r["device"]) for r in records if r.get("device")})
    return ", ".join(names) or "unknown device"


def plot_kernel_suite(records: list[dict], out: Path, plt) -> list[Path]:
    """Time and bandwidth fraction against T, one line per provider."""
    written = []
    title = f"MoE layer (E=64, top-8, H=2048, I=1024) on {_device(records)}"
    for field, name, ylabel, logy in (
        ("us", "moe_time.png", "microseconds per layer", True),
        ("bw_fraction", "moe_bw_fraction.png", "fraction of measured copy bandwidth", False),
    ):
        latest = latest_records(records, ("provider", "T"), "T", field)
        if not latest:
            continue
        fig, ax = plt.subplots(figsize=(8, 5))
        for provider in sorted({p for p, _ in latest}):
            pts = sorted((t, rec[field]) for (p, t), rec in latest.items() if p == provider)
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ts = sorted({t for _, t in latest})
        ax.set_xticks(ts, [str(t) for t in ts])
        ax.minorticks_off()
        if logy:
            ax.set_yscale("log")
        else:
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
            ax.set_ylim(0, max(1.1, 1.05 * max(rec[field] for rec in latest.values())))
        ax.set_xlabel("tokens T (log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_e2e(records: list[dict], out: Path, plt) -> list[Path]:
    """Decode tokens/s per provider, a bar per batch size (memory-check records left out)."""
    latest = latest_records([r for r in records if not r.get("memory_check")], ("provider", "batch"),
                     "batch", "decode_tokens_per_s")
    if not latest:
        return []
    providers = list(dict.fromkeys(p for p, _ in latest))  # first-seen order
    batches = sorted({b for _, b in latest})
    width = 0.8 / len(batches)
    fig, ax = plt.subplots(figsize=(9, 5))
    for i, b in enumerate(batches):
        xs, ys, labels = [], [], []
        for j, p in enumerate(providers):
            rec = latest.get((p, b))
            if rec is None:
                continue
            xs.append(j + (i - (len(batches) - 1) / 2) * width)
            ys.append(rec["decode_tokens_per_s"])
            frac = rec.get("floor_fraction", rec.get("bw_fraction"))
            labels.append(f"{ys[-1]:.0f}" + (f"\n{frac:.0%}" if isinstance(frac, (int, float)) else ""))
        bars = ax.bar(xs, ys, width, label=f"batch {b}")
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    ax.set_xticks(range(len(providers)), providers, rotation=15)
    ax.set_ylabel("decode tokens/s (all rows)")
    ax.set_title(f"MolmoE-1B decode, random weights, on {_device(list(latest.values()))}\n"
                 "(labels: tokens/s and fraction of the bandwidth floor)", fontsize=10)
    ax.margins(y=0.15)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out / "e2e_decode.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="folder holding moe_bench.jsonl and/or e2e.jsonl")
    ap.add_argument("--out", type=Path, default=None, help="where the PNGs go (default: the results folder)")
    args = ap.parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot_results: matplotlib is not installed (it is not a molmoe-lite dependency); "
              "`pip install matplotlib` to make the plots", file=sys.stderr)
        return 1
    if not args.results.is_dir():
        print(f"plot_results: {args.results} is not a folder", file=sys.stderr)
        return 1
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in (("moe_bench.jsonl", plot_kernel_suite), ("e2e.jsonl", plot_e2e)):
        path = args.results / name
        if not path.exists():
            print(f"plot_results: no {name} in {args.results}", file=sys.stderr)
            continue
        made = plot(load_records(path), out, plt)
        if not made:
            print(f"plot_results: {path} has no usable records", file=sys.stderr)
        written += made
    for path in written:
        print(path)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
