"""Launch sweep of the two decode kernels on a GPU: which tiles read MolmoE's experts fastest.

The built-in launch tables (kernels/configs.py) were chosen without a GPU. This times each
decode kernel alone (gate+up with SwiGLU, and down with the top-k sum) at MolmoE's shapes for
candidate (BLOCK_N, BLOCK_K, num_warps) and, for the down kernel, EXPERT_SPLIT (how many
programs share a token's experts, moe_gemv.expert_split), so one GPU run tells the next session
which table entry to ship without spending more GPU time.

Candidates: the shipped launch at each T (``shipped: true`` in its records), its other expert
splits, then every tile that gives each thread one 128-bit int4 load
(BLOCK_N * BLOCK_K / 2 = 16 * 32 * num_warps); the down kernel first; at most
--max-candidates per kernel and bits; each launched exactly as given (``fill_sms: 0``) at
every T. Method: 16 layers' expert weights are resident (the 50 MB L2 of an H100 cannot hold
them), one pass launches the kernel once per layer, passes are captured in a CUDA graph and
replayed (``gpu_check.time_us``). Bytes read: the codes, scales and zeros of the experts the
tokens picked, plus activations in and out; ``bw_fraction`` is against the device's copy
bandwidth (OUT/bandwidth.json when gpu_check wrote it, else measured here).

Writes OUT/decode_sweep.jsonl (one record per candidate and T, appended as measured, so a run
cut short still reports), prints the best candidate per (kernel, bits, T), and writes the chosen
launch per kernel (the least total time over every bits and T it was measured at) with where
and when it was measured to OUT/<device-name>.json: copied into kernels/launch_configs/, the
runtime uses it on GPUs of that name (or pin it first: MOLMOE_LITE_KERNEL_CONFIG=OUT/<file>). Starts no new
candidate after --budget-s seconds (first launches compile, which is most of the cost).
``--smoke``: tiny shapes under the Triton interpreter on the CPU, two candidates, no timing.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE or not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _synthetic import random_expert_stack  # noqa: E402

LAYERS = 16
TOKENS = (1, 4)
BITS = (4, 8)


def candidates(rows: int, k: int, shipped: tuple[int, int, int, int],
               splits: tuple[int, ...] = (1,)) -> list[tuple[int, int, int, int]]:
    """(BLOCK_N, BLOCK_K, num_warps, EXPERT_SPLIT): the shipped launch first, then its tiles with
    every other split in ``splits`` (the down kernel's), then every tile with one 128-bit int4
    load per thread that fits the matrix, with the shipped split."""
    out = [shipped]
    out += [(*shipped[:3], s) for s in splits if s != shipped[3]]
    for warps in (4, 8, 2):
        for bn in (4, 8, 16, 32):
            bk = 16 * 32 * warps * 2 // bn
            cand = (bn, bk, warps, shipped[3])
            if bn <= rows and 64 <= bk <= k and cand not in out:
                out.append(cand)
    return out


def _expert_bytes(qw) -> int:
    return qw.nbytes // qw.shape[0]


def sweep(args) -> list[dict]:
    from molmoe_lite.kernels.configs import get_config
    from molmoe_lite.kernels.launch import device_sms
    from molmoe_lite.kernels.moe_gemv import decode_tiles, down_gemv, expert_split, gate_up_gemv

    cuda = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda:
        e, k_top, h, inter, layers, dtype = 64, 8, 2048, 1024, LAYERS, torch.bfloat16
        name = torch.cuda.get_device_name()
        copy_gbps = _copy_gbps(args.out)
    else:
        e, k_top, h, inter, layers, dtype = 8, 2, 64, 32, 1, torch.float32
        name, copy_gbps = "cpu (interpreter smoke test)", None
    table, sms = get_config(dev), device_sms(dev)
    out_path = args.out / "decode_sweep.jsonl"
    started = time.monotonic()
    results = []
    gen = torch.Generator(device=dev).manual_seed(0)
    inputs = {}
    for t in TOKENS:
        # distinct experts per token (as the router gives), random across tokens
        ids = torch.stack([torch.randperm(e, device=dev, generator=gen)[:k_top] for _ in range(t)]).to(torch.int32)
        inputs[t] = {"x": torch.randn(t, h, device=dev, generator=gen).to(dtype), "ids": ids,
                     "weights": torch.rand(t, k_top, device=dev, generator=gen),
                     "act": torch.randn(t * k_top, inter, device=dev, generator=gen).to(dtype),
                     "used": len(torch.unique(ids))}
    for bits in BITS:
        group = 64 if bits == 4 else None  # int8: per channel, as the converter writes it
        stacks = {"down_decode": [random_expert_stack(bits, e, h, inter, dev, gen, group) for _ in range(layers)],
                  "gate_up_decode": [random_expert_stack(bits, e, 2 * inter, h, dev, gen, group)
                                     for _ in range(layers)]}
        # the down kernel first: the expert split is the most open question
        for kname, ws in stacks.items():
            down = kname == "down_decode"
            rows, kdim = (h, inter) if down else (inter, h)
            base = table[kname]
            shipped = {}
            for t in TOKENS:
                programs = t if down else t * k_top
                bn, bk = decode_tiles(base, rows, kdim, bits, programs, sms)
                split = expert_split(base, k_top, programs * -(-rows // bn), sms) if down else 1
                shipped[t] = (bn, bk, base["num_warps"], split)
            cands = []
            for t in TOKENS:  # every T's shipped launch, its split variants, then the other tiles
                cands += [c for c in candidates(rows, kdim, shipped[t], (1, 2, 4, 8) if down and k_top > 1 else (1,))
                          if c not in cands]
            for bn, bk, warps, split in cands[: args.max_candidates if cuda else 2]:
                cfg = {**base, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "fill_sms": 0}
                if down:
                    cfg["EXPERT_SPLIT"] = split
                for t, inp in inputs.items():
                    if time.monotonic() - started > args.budget_s:
                        print(f"sweep: budget of {args.budget_s:.0f} s spent, stopping", file=sys.stderr)
                        return results
                    # weights of the picked experts, plus act and x: one read and one written either way
                    nbytes = inp["used"] * _expert_bytes(ws[0]) + inp["act"].nbytes + inp["x"].nbytes
                    launch = (functools.partial(_launch_down, down_gemv, inp, dtype) if down
                              else functools.partial(_launch_gate_up, gate_up_gemv, inp))
                    rec = {"kernel": kname, "bits": bits, "T": t, "BLOCK_N": bn, "BLOCK_K": bk,
                           "num_warps": warps, "EXPERT_SPLIT": split if down else None,
                           "num_stages": base["num_stages"], "shipped": (bn, bk, warps, split) == shipped[t],
                           "bytes": nbytes, "device": name}
                    rec.update(_measure(launch, cfg, ws, nbytes, copy_gbps, cuda))
                    results.append(rec)
                    with out_path.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
        del stacks
        if cuda:
            torch.cuda.empty_cache()
    return results


def _launch_down(down_gemv, inp: dict, dtype: torch.dtype, cfg: dict, w) -> torch.Tensor:
    return down_gemv(inp["act"], inp["weights"], inp["ids"], w, dtype, cfg)


def _launch_gate_up(gate_up_gemv, inp: dict, cfg: dict, w) -> torch.Tensor:
    return gate_up_gemv(inp["x"], inp["ids"], w, cfg)


def _measure(launch, cfg: dict, ws: list, nbytes: int, copy_gbps: float | None, cuda: bool) -> dict:
    def one_pass():
        for w in ws:
            launch(cfg, w)

    try:
        if not cuda:
            one_pass()  # the interpreter: checks the launch path only
            return {"us": None, "gbps": None, "bw_fraction": None}
        from gpu_check import time_us

        us = time_us(one_pass, rounds=10, graph=True)[0] / len(ws)
    except Exception as exc:  # noqa: BLE001 - a candidate that does not compile or launch is a result too
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}
    gbps = nbytes / (us * 1e-6) / 1e9
    return {"us": us, "gbps": gbps, "bw_fraction": gbps / copy_gbps if copy_gbps else None}


def _copy_gbps(out: Path) -> float:
    bw = out / "bandwidth.json"
    if bw.exists():
        rec = json.loads(bw.read_text())
        if rec.get("copy_gbps"):
            return rec["copy_gbps"]
    from gpu_check import measure_copy

    return measure_copy()["copy_gbps"]


def best_per_case(results: list[dict]) -> list[dict]:
    """The fastest candidate per (kernel, bits, T), with the shipped one's time beside it."""
    best: dict[tuple, dict] = {}
    shipped: dict[tuple, float] = {}
    for r in results:
        if r.get("us") is None:
            continue
        key = (r["kernel"], r["bits"], r["T"])
        if r["shipped"]:
            shipped[key] = r["us"]
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    return [{**r, "shipped_us": shipped.get(key)} for key, r in best.items()]


LAUNCH_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "EXPERT_SPLIT")


def chosen_table(results: list[dict]) -> dict:
    """Per kernel, the launch with the least total time over every (bits, T) case measured for
    that kernel; launches missing a case (an error, the budget) are not compared. Each entry is
    launched exactly as measured (``fill_sms: 0``)."""
    cases: dict[str, set] = {}
    times: dict[tuple, dict] = {}
    for r in results:
        cases.setdefault(r["kernel"], set()).add((r["bits"], r["T"]))
        if r.get("us") is not None:
            launch = tuple((k, r[k]) for k in LAUNCH_KEYS if r.get(k) is not None)
            times.setdefault((r["kernel"], launch), {})[(r["bits"], r["T"])] = r["us"]
    table = {}
    for kernel, want in cases.items():
        complete = {launch: sum(t.values()) for (kname, launch), t in times.items() if kname == kernel and set(t) == want}
        if complete:
            table[kernel] = {**dict(min(complete, key=complete.get)), "fill_sms": 0}
    return table


def launch_config_record(results: list[dict], device: str, capability: int) -> dict:
    """The JSON the runtime reads (kernels/configs.py): the chosen table, with where and when."""
    import torch
    import triton

    return {"device": device, "capability": capability,
            "measured": {"when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         "where": platform.node(), "by": "benchmarks/sweep_decode.py",
                         "torch": torch.__version__, "triton": triton.__version__,
                         "cases": sorted({f"T={r['T']} int{r['bits']}" for r in results})},
            "table": chosen_table(results)}


def write_launch_config(results: list[dict], out: Path, device: str, capability: int) -> Path | None:
    from molmoe_lite.kernels.configs import device_file_name

    record = launch_config_record(results, device, capability)
    if not record["table"]:
        return None
    path = out / device_file_name(device)
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/latest"), help="folder for decode_sweep.jsonl")
    ap.add_argument("--budget-s", type=float, default=35.0, help="start no candidate after this many seconds")
    ap.add_argument("--max-candidates", type=int, default=8, help="launches tried per kernel and bits (default %(default)s)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter), no timing")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.smoke and not torch.cuda.is_available():
        print(json.dumps({"stage": "decode-sweep", "skipped": "no CUDA device (use --smoke on the CPU)"}))
        return 0
    results = sweep(args)
    for r in best_per_case(results):
        print("BEST " + json.dumps(r))
    config = None
    if not args.smoke:
        major, minor = torch.cuda.get_device_capability()
        config = write_launch_config(results, args.out, torch.cuda.get_device_name(), 10 * major + minor)
    print(json.dumps({"stage": "decode-sweep", "records": len(results),
                      "errors": sum("error" in r for r in results), "out": str(args.out / "decode_sweep.jsonl"),
                      "launch_config": str(config) if config else None}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
