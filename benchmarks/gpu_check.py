"""Small stages of ``gpu_check.sh``; each prints one JSON line and writes it to OUT/<stage>.json.

    python benchmarks/gpu_check.py STAGE [STAGE...] --out OUT

- ``env``: the device and software versions.
- ``bandwidth``: device-to-device copy of a 1 GiB buffer, timed with CUDA events; bytes
  counted as read + written, the ceiling every bandwidth fraction is taken against.
- ``tests-summary``: counts and failed test ids from the CUDA test run's junit XML.
- ``targets``: ``targets.py`` on OUT (targets.json, and the table in targets.txt).

Several stages run in one process, in the order given. Also here: ``time_us`` and
``measure_copy``, the timing helpers the benchmarks share.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

# torch is imported inside the stages that need it: the report stages run without it, in a second


def _write(out: Path, stage: str, record: dict) -> None:
    record = {"stage": stage, **record}
    (out / f"{stage.replace('-', '_')}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def stage_env(out: Path) -> None:
    import torch

    rec = {
        "device": _device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec.update(capability=f"sm_{p.major}{p.minor}", sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    _write(out, "env", rec)


def stage_tests_summary(out: Path) -> None:
    """Counts and failed ids from OUT/cuda_tests.xml; ``interrupted`` when the run was cut at its
    limit (pytest writes the report of the tests that ran; its log says KeyboardInterrupt)."""
    try:  # the env stage's device, so this stage needs no torch
        device = json.loads((out / "env.json").read_text())["device"]
    except (OSError, ValueError, KeyError):
        device = _device_name()
    xml = out / "cuda_tests.xml"
    if not xml.exists():
        _write(out, "tests-summary", {"device": device, "error": "no junit xml (the test run did not finish)"})
        return
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    log = out / "logs" / "cuda-tests.log"
    interrupted = log.exists() and "KeyboardInterrupt" in log.read_text(errors="replace")
    _write(out, "tests-summary", {"device": device, **counts, "failed": failed, "interrupted": interrupted})


def time_us(fn, rounds: int = 10, graph: bool = True) -> tuple[float, str, object]:
    """Median microseconds per call of ``fn`` over ``rounds`` CUDA-event timings, how it ran
    ("graph" or "eager"), and the callable that was timed.

    graph=True captures ``fn`` once in a CUDA graph (after a warm-up that compiles its kernels)
    and times replays: at batch 1 a Python-side Triton launch can take as long as the kernel it
    launches, so eager timing would measure the host, not the kernels. The runtime decodes the
    same way (fast_decode.StaticDecoder). Providers that sync with the host (the release's
    expert loop) cannot be captured: pass graph=False and they run as they would. A capture
    that fails anyway falls back to eager timing, and ``how`` says why (callers whose code
    must be capturable check it).
    """
    import torch

    fn()  # compile, allocate
    torch.cuda.synchronize()
    run, how = fn, "eager"
    if graph:
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # capture wants its warm-up on a side stream
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            run, how = g.replay, "graph"
        except RuntimeError as exc:  # something in fn syncs with the host: time it as it runs
            torch.cuda.synchronize()
            how = f"eager (capture failed: {str(exc).splitlines()[0][:120]})"
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2], how, run


def measure_copy(n: int = 2**30, iters: int = 20) -> dict:
    """Device-to-device copy of ``n`` bytes: ms per copy and GB/s counting read + written bytes."""
    import torch

    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_us(lambda: dst.copy_(src), iters, graph=False)[0] / 1e3
    return {"bytes": n, "ms": ms, "copy_gbps": 2 * n / ms / 1e6}


def stage_bandwidth(out: Path) -> None:
    _write(out, "bandwidth", {"device": _device_name(), **measure_copy()})


def stage_targets(out: Path) -> None:
    import targets  # beside this file

    targets.main([str(out)])


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


STAGES = {"env": stage_env, "bandwidth": stage_bandwidth, "tests-summary": stage_tests_summary,
          "targets": stage_targets}
NEEDS_GPU = {"bandwidth"}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="+", choices=list(STAGES), metavar="STAGE",
                    help=f"one or more of {', '.join(STAGES)}")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for stage in args.stages:
        if stage in NEEDS_GPU and not _cuda_available():
            _write(args.out, stage, {"device": _device_name(), "skipped": "no CUDA device"})
            continue
        STAGES[stage](args.out)


if __name__ == "__main__":
    main()
