"""CPU smoke tests of the benchmark scripts in benchmarks/ (not installed with the package).

bench_e2e.py: a clean skip record without CUDA, its whole logic on the tiny config with
``--smoke``, and the bandwidth floor's byte count against a count written out from the
config, and its time budget stopping the provider under way; plot_results.py: PNGs from
synthetic records when matplotlib is importable, a clear message when it is not;
gpu_check.py: the env, bandwidth and tests-summary stages; sweep_decode.py:
its launch path on tiny shapes under the interpreter and the choice of the best candidate;
targets.py: each target judged pass / fail / missing from synthetic records; gpu_check.sh: its
worst-case time, a limit on every command, the archive it leaves, and the pytest behaviour on
an interrupt its test stages rely on; bench_serve.py: one flat record per concurrency
from a real server on the tiny model; bench_cpu.py: the prefill floor's count of work, the
split of the time to first token, and a whole run on a tiny int4 checkpoint;
cpu_prefill_candidates.py: its smoke run.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(args, cwd=ROOT, timeout=120, **kw):
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **kw)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------
# bench_e2e.py
# ---------------------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_bench_e2e_without_cuda_prints_a_skip_record(tmp_path):
    res = _run([BENCH / "bench_e2e.py", "--out", tmp_path])
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout.strip().splitlines()[-1])
    assert "no CUDA" in printed["skipped"]
    assert _records(tmp_path / "e2e.jsonl") == [printed]


def test_bench_e2e_help_names_every_provider():
    res = _run([BENCH / "bench_e2e.py", "--help"])
    assert res.returncode == 0, res.stderr
    for provider in ("release_bf16_loop", "ours_bf16", "int8", "int4", "int4_small", "nf4_dense"):
        assert provider in res.stdout


def test_bench_e2e_rejects_an_unknown_provider(tmp_path):
    res = _run([BENCH / "bench_e2e.py", "--out", tmp_path, "--providers", "int4,int3"])
    assert res.returncode == 2
    assert "int3" in res.stderr


def test_bench_e2e_time_budget_stops_the_running_provider(tmp_path, monkeypatch):
    """When the budget runs out the provider under way is stopped, not only the later ones skipped."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_e2e

    def fake_run_provider(provider, *args):
        if provider == "int8":
            time.sleep(120)  # a provider that would outlast the stage

    monkeypatch.setattr(bench_e2e, "build_model", lambda *a, **k: None)
    monkeypatch.setattr(bench_e2e, "run_provider", fake_run_provider)
    start = time.perf_counter()
    code = bench_e2e.main(["--smoke", "--out", str(tmp_path), "--time-budget", "8", "--providers", "int4,int8,nf4_dense"])
    assert code == 0 and time.perf_counter() - start < 60
    recs = _records(tmp_path / "e2e.jsonl")
    assert [(r["provider"], r["skipped"].split(":")[0]) for r in recs] == [("int8", "stopped"), ("nf4_dense", "not started")]
    assert "time budget of 8 s ran out" in recs[0]["skipped"]


def test_bench_e2e_smoke_records_every_provider_and_batch(tmp_path):
    """The full measuring logic on the tiny config on the CPU (numbers themselves meaningless)."""
    res = _run([BENCH / "bench_e2e.py", "--smoke", "--out", tmp_path, "--steps", "2", "--warmup-steps", "1",
                "--ttft-repeats", "1", "--batches", "1,2"], timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = _records(tmp_path / "e2e.jsonl")
    by_key = {(r["provider"], r["batch"]): r for r in recs if "batch" in r}
    bnb = True
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        bnb = False
    expected = ["release_bf16_loop", "ours_bf16", "int8", "int4", "int4_small"] + (["nf4_dense"] if bnb else [])
    errors = [r for r in recs if r.get("error")]
    assert not errors, errors
    for provider in expected:
        for batch in (1, 2):
            r = by_key[(provider, batch)]
            assert r["decode_tokens_per_s"] > 0 and r["us"] > 0 and r["ttft_s"] > 0
            # tokens/s counts every row: batch * steps / (steps * us)
            assert r["decode_tokens_per_s"] == pytest.approx(batch / (r["us"] * 1e-6), rel=1e-6)
            assert r["bytes_per_step"] == r["weight_bytes_per_step"] + r["kv_bytes_per_step"]
            assert r["prompt_tokens"] > 1000  # one 1920x1080 image: ~1,200 tokens
    # fewer bits, fewer weight bytes per step (same model, same batch)
    w = {p: by_key[(p, 1)]["weight_bytes_per_step"] for p in expected}
    assert w["int4"] < w["int8"] < w["ours_bf16"] == w["release_bf16_loop"]
    assert w["int4_small"] < w["int4"]
    assert by_key[("int4", 1)]["decode_path"].startswith("static")
    assert by_key[("release_bf16_loop", 1)]["decode_path"] == "release-style eager loop"


@pytest.mark.parametrize("preset", ["default", "small"])
def test_memory_check_builds_what_load_builds(monkeypatch, tiny_release, preset):
    """The memory check measures a model built directly quantised: it must hold the same tensors
    (names, shapes, dtypes, CPU or not) as load() of an int4 checkpoint with that preset."""
    monkeypatch.syspath_prepend(str(BENCH))
    from _synthetic import build_model, make_config

    from molmoe_lite import load

    built = build_model(make_config("tiny"), "cpu", torch.float32, quantized=("experts",), bits=4, group_size=64,
                        small=preset == "small")
    loaded = load(tiny_release, device="cpu", dtype="float32", quantize="int4", preset=preset)
    b, ld = built.state_dict(), loaded.state_dict()
    assert b.keys() == ld.keys()
    assert all((b[k].shape, b[k].dtype, b[k].device) == (ld[k].shape, ld[k].dtype, ld[k].device) for k in b)


@pytest.mark.parametrize("batch", [1, 4, 64], ids=["batch1", "batch4", "batch64_nearly_all"])
def test_decode_weight_bytes_counts_attention_router_topk_experts_and_lm_head(monkeypatch, batch):
    """The floor's weight bytes, against the same count written out from the config (full size, meta)."""
    monkeypatch.syspath_prepend(str(BENCH))
    from _synthetic import decode_weight_bytes, kv_bytes_per_token, make_config

    from molmoe_lite.model.molmoe import MolmoE

    cfg = make_config("full")
    with torch.device("meta"):
        model = MolmoE(cfg, dtype=torch.bfloat16)
    d, n_layers, n_exp, k, hid = cfg.d_model, cfg.n_layers, cfg.moe_num_experts, cfg.moe_top_k, cfg.expert_hidden
    qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
    # experts read per layer: top_k at batch 1; the expected union of B independent uniform picks after
    used = k if batch == 1 else n_exp * (1 - (1 - k / n_exp) ** batch)
    q_width, kv_width = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_layer = d * qkv + q_width * d + n_exp * d  # att_proj, attn_out, router (bf16)
    norms = d + q_width + kv_width + d  # attn/q/k norms, ff_norm: fp32 in every compute dtype
    expert_bytes = int(2 * n_exp * 3 * d * hid * used / n_exp)  # bf16
    elems = n_layers * per_layer + cfg.embedding_size * d + batch * d  # lm_head, embedding rows
    got, n_used = decode_weight_bytes(model, batch)
    assert n_used == round(used, 1)
    assert got == 2 * elems + 4 * (n_layers * norms + d) + n_layers * expert_bytes  # + ln_f
    assert kv_bytes_per_token(model) == 2 * n_layers * cfg.n_kv_heads * cfg.head_dim * 2


def test_prompt_flops_counts_the_matmuls_a_prefill_runs(monkeypatch, tiny_model):
    """bench_cpu's time-to-first-token floor: its count of the prompt's work equals, part by part,
    what torch's FlopCounterMode sees in a real prefill of the tiny model. The counter does not
    see the CPU's fused attention, so the attention scores (ViT: every crop's tokens against each
    other; decoder: causal, half of T x T) are the one term written out here."""
    monkeypatch.syspath_prepend(str(BENCH))
    from bench_cpu import prompt_flops
    from torch.utils.flop_counter import FlopCounterMode

    from molmoe_lite.demo import demo_image

    model = tiny_model
    inputs = model.processor.process(images=demo_image(), text="Describe this image.")
    batch = {k: v[None] for k, v in inputs.items()}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**batch, logits_at="last")
    counts = {name: sum(c.values()) for name, c in counter.get_flop_counts().items()}
    cfg, v = model.config, model.config.vision
    crops, tokens = int(inputs["images"].shape[0]), int(inputs["input_ids"].shape[0])
    assert crops > 1 and counts["MolmoE.model.vision_backbone"] > 0
    blocks = max(i % v.num_layers for i in cfg.vit_layers) + 1
    per_crop = 1 + v.grid[0] * v.grid[1]
    scores = {"vision": crops * blocks * 4 * per_crop**2 * v.num_heads * v.head_dim,
              "decoder_other": cfg.n_layers * 2 * tokens**2 * cfg.n_heads * cfg.head_dim}
    experts = sum(counts[f"MolmoE.model.transformer.blocks.{i}.mlp.experts"] for i in range(cfg.n_layers))
    assert experts > 0
    counted = {"vision": counts["MolmoE.model.vision_backbone"], "experts": experts,
               "decoder_other": counts["MolmoE.model.transformer"] + counts["MolmoE.lm_head"] - experts}
    flops = prompt_flops(cfg, crops, tokens)
    assert {part: flops[part] - scores.get(part, 0) for part in flops} == counted


def test_prompt_timer_times_the_prompt_and_not_the_decode_steps(monkeypatch, tiny_model):
    """bench_cpu's split of the time to first token: the vision backbone once and each layer's
    experts once (the prompt's calls), none of the later decode steps' calls; the parts add
    up to the time to first token."""
    monkeypatch.syspath_prepend(str(BENCH))
    from bench_cpu import PromptTimer

    from molmoe_lite.demo import demo_image

    model = tiny_model
    inputs = model.processor.process(images=demo_image(), text="Describe this image.")
    timer = PromptTimer(model)
    model.generate_from_batch({k: v[None] for k, v in inputs.items()}, {"max_new_tokens": 4, "eos_token_id": -1})
    ttft = model.last_stats.ttft_s
    parts = timer.parts(ttft)
    assert timer.calls == {"vision": 1, "experts": model.config.n_layers}
    assert parts["vision"] > 0 and parts["experts"] > 0 and parts["decoder_other"] > 0
    assert sum(parts.values()) == pytest.approx(ttft)
    model.generate_from_batch({k: v[None] for k, v in inputs.items()}, {"max_new_tokens": 2, "eos_token_id": -1})
    assert timer.calls == {"vision": 1, "experts": model.config.n_layers}  # the hooks are gone


def test_bench_cpu_on_a_tiny_int4_checkpoint_prints_its_record(tiny_release, tmp_path):
    """bench_cpu.py end to end on a converted tiny checkpoint (the CPU kernels' path): one JSON
    record whose time to first token is split into parts that add up to it, the experts'
    part timed (the hooks found the quantised experts), and the decode it asked for."""
    from molmoe_lite.quantize.convert import convert

    folder = tmp_path / "int4"
    convert(tiny_release, folder, bits=4, method="rtn", progress=False)
    res = _run([BENCH / "bench_cpu.py", "--checkpoint", folder, "--new-tokens", "4"], timeout=300)
    assert res.returncode == 0, res.stderr
    record = json.loads(res.stdout.strip().splitlines()[-1])
    assert record["new_tokens"] == 4 and record["prompt_tokens"] > 0
    parts = record["ttft_parts_s"]
    assert set(parts) == set(record["prompt_tflop"]) == set(record["ttft_parts_floor_s"])
    assert parts["vision"] > 0 and parts["experts"] > 0
    assert sum(parts.values()) == pytest.approx(record["ttft_s"], abs=0.02)  # each part rounded to 0.01
    assert 0 < record["fraction_of_floor"] and 0 < record["ttft_fraction_of_floor"]


def test_cpu_prefill_candidates_smoke_checks_every_candidate():
    """The script checks each candidate against a float32 reference before timing it (an assert
    in the script): the smoke run passes those checks and prints every measurement."""
    res = _run([BENCH / "cpu_prefill_candidates.py", "--smoke", "--repeats", "1"])
    assert res.returncode == 0, res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["measure"] for r in records] == ["expert_rows", "expert_rows", "expert_layer", "vit_linear"]
    assert 0 < records[-1]["int8_relative_error"] < 0.05


# ---------------------------------------------------------------------------------------
# plot_results.py
# ---------------------------------------------------------------------------------------
def _write_synthetic_results(folder: Path) -> None:
    with open(folder / "moe_bench.jsonl", "w") as f:
        for i, provider in enumerate(["int4", "int8", "bf16_loop"]):
            for t in [1, 2, 4, 64, 1024]:
                us = (i + 1) * 50.0 * (1 + t / 64)
                f.write(json.dumps({"provider": provider, "bits": 4, "T": t, "us": us, "gbps": 1e3,
                                    "bw_fraction": 0.5 / (i + 1), "device": "synthetic"}) + "\n")
        f.write(json.dumps({"provider": "nf4_loop", "T": 1, "skipped": "no bitsandbytes"}) + "\n")
    with open(folder / "e2e.jsonl", "w") as f:
        for i, provider in enumerate(["ours_bf16", "int4", "nf4_dense"]):
            for batch in (1, 4):
                f.write(json.dumps({"provider": provider, "batch": batch, "decode_tokens_per_s": 100.0 * (i + 1) * batch,
                                    "floor_fraction": 0.1 * (i + 1), "device": "synthetic"}) + "\n")
        f.write(json.dumps({"provider": "int4", "batch": 1, "memory_check": True, "fits": True}) + "\n")
        f.write(json.dumps({"provider": "int8", "error": "RuntimeError: boom"}) + "\n")
        f.write("not json\n")


def test_plot_results_writes_pngs(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    monkeypatch.syspath_prepend(str(BENCH))
    import plot_results

    _write_synthetic_results(tmp_path)
    assert plot_results.main([str(tmp_path)]) == 0
    for name in ("moe_time.png", "moe_bw_fraction.png", "e2e_decode.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_plot_results_keeps_the_last_usable_record_per_key(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import plot_results

    recs = [{"provider": "a", "T": 1, "us": 1.0}, {"provider": "a", "T": 1, "us": 2.0},
            {"provider": "a", "T": 1, "us": 3.0, "skipped": "x"}, {"provider": "a", "T": 1, "us": None},
            {"provider": "b", "T": 1, "error": "e", "us": 9.0}]
    latest = plot_results.latest_records(recs, ("provider", "T"), "T", "us")
    assert latest == {("a", 1): {"provider": "a", "T": 1, "us": 2.0}}


def test_plot_results_without_matplotlib_says_so(tmp_path):
    """matplotlib is not a dependency: its absence is a clear message and status 1."""
    _write_synthetic_results(tmp_path)
    code = ("import sys, runpy; sys.modules['matplotlib'] = None; "
            f"sys.argv = ['plot_results.py', {str(tmp_path)!r}]; "
            f"runpy.run_path({str(BENCH / 'plot_results.py')!r}, run_name='__main__')")
    res = _run(["-c", code])
    assert res.returncode == 1
    assert "matplotlib is not installed" in res.stderr and "not a molmoe-lite dependency" in res.stderr
    assert not list(tmp_path.glob("*.png"))


# ---------------------------------------------------------------------------------------
# gpu_check.py
# ---------------------------------------------------------------------------------------
def test_gpu_check_env_and_bandwidth_stages_in_one_process(tmp_path):
    res = _run([BENCH / "gpu_check.py", "env", "bandwidth", "--out", tmp_path],
               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, res.stderr
    rec = json.loads((tmp_path / "env.json").read_text())
    assert rec["stage"] == "env" and rec["torch"] == torch.__version__ and rec["device"]
    bandwidth = json.loads((tmp_path / "bandwidth.json").read_text())
    assert [json.loads(line) for line in res.stdout.strip().splitlines()[-2:]] == [rec, bandwidth]
    if not torch.cuda.is_available():
        assert bandwidth["skipped"] == "no CUDA device"


@pytest.mark.parametrize("interrupted", [False, True], ids=["finished", "cut_at_its_limit"])
def test_gpu_check_tests_summary_counts_failures_and_notices_a_cut(tmp_path, interrupted):
    (tmp_path / "env.json").write_text(json.dumps({"device": "NVIDIA H200"}))
    (tmp_path / "cuda_tests.xml").write_text(
        '<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_b" name="test_skip"><skipped/></testcase>'
        "</testsuite></testsuites>")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "cuda-tests.log").write_text(
        "..F\n!!!!!!! KeyboardInterrupt !!!!!!!\n" if interrupted else "..F\n1 failed, 1 passed\n")
    res = _run([BENCH / "gpu_check.py", "tests-summary", "--out", tmp_path])
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "tests_summary.json").read_text())
    assert (summary["tests"], summary["failures"], summary["skipped"]) == (3, 1, 1)
    assert summary["failed"] == ["tests.test_a::test_bad"] and summary["device"] == "NVIDIA H200"
    assert summary["interrupted"] is interrupted


def _plan() -> str:
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--plan"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_gpu_check_sh_worst_case_is_under_8_minutes():
    """The plan's worst case (every stage cut at its limit and killed after its grace) stays under
    8 minutes, and equals the stage table's sum, so no stage is left out of it."""
    plan = _plan()
    limits = {name: int(s) for name, s in re.findall(r"^\s+(\S+)\s+(\d+) s$", plan, re.M)}
    worst, grace, setup = map(int, re.search(r"worst case: (\d+) s .* (\d+) s of grace per stage, (\d+) s of setup",
                                             plan).groups())
    assert worst < 8 * 60, plan
    assert worst == setup + sum(limits.values()) + grace * (len(limits) - 1)  # pack is not interrupted first
    assert {"cuda-tests", "moe-bench", "e2e", "decode-sweep", "report", "pack"} <= limits.keys()
    assert f"at most {worst // 60} min {worst % 60} s" in (ROOT / "README.md").read_text()  # what the README promises


def test_gpu_check_sh_runs_every_command_under_a_stage_limit():
    """No Python or pytest command of the script runs without a time limit, and every stage it runs
    has a limit in the plan."""
    text = (BENCH / "gpu_check.sh").read_text()
    code = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    planned = set(re.findall(r"^\s+(\S+)\s+\d+ s$", _plan(), re.M))
    for i, ln in enumerate(code):
        if '"$PYTHON"' in ln or '"${PYTEST[@]}"' in ln:
            head = ln if "run_stage" in ln or "timeout" in ln else code[i - 1]  # a continued line
            assert "run_stage" in head or re.search(r"timeout \d+", head), f"no time limit on: {ln}"
    stages = {m.group(1) for ln in code for m in [re.match(r"\s*(?:run_stage|skip_stage) (\S+) ", ln)] if m}
    assert stages and stages <= planned, stages - planned
    assert "kernels.aot" not in text  # it checks nothing GPU-specific: it runs on the CPU, in CI


def test_gpu_check_sh_leaves_one_archive_and_a_summary(tmp_path):
    """A run (here only the report stage, on whatever machine runs the tests) leaves exactly two files
    in OUT_DIR: the archive of the work folder and the summary, however its stages ended."""
    import tarfile

    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path)}
    res = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(out), "--only", "report"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 0, res.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) == 2 and files[0].endswith("-summary.txt") and files[1].endswith(".tar.gz"), files
    with tarfile.open(out / files[1]) as tar:
        names = tar.getnames()
    folder = files[1][len("gpu-check-"):-len(".tar.gz")]
    for name in ("stages.txt", "summary.txt", "targets.json", "targets.txt", "tests_summary.json", "logs/report.log"):
        assert f"{folder}/{name}" in names, names
    summary = (out / files[0]).read_text()
    assert re.search(r"^report\s+\d+ s of\s+\d+ s  ok$", summary, re.M), summary
    assert "pass 0, fail 0, missing 9" in summary  # nothing measured: nothing passes


def test_pytest_writes_its_junit_report_when_timeout_interrupts_it(tmp_path):
    """What the script's test stages rely on: `timeout -s INT` cuts pytest and the report of the
    tests that ran is still written."""
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_quick():\n    pass\n\n"
                                           "def test_hangs():\n    time.sleep(120)\n")
    res = subprocess.run(["timeout", "-s", "INT", "-k", "60", "20", sys.executable, "-m", "pytest", "-q",
                          "-p", "no:cacheprovider", "--junitxml", str(tmp_path / "report.xml"), "test_slow.py"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 124, res.stdout[-2000:]
    xml = (tmp_path / "report.xml").read_text()
    assert 'name="test_quick"' in xml


# ---------------------------------------------------------------------------------------
# sweep_decode.py
# ---------------------------------------------------------------------------------------
def test_sweep_decode_smoke_launches_every_kernel_bits_and_batch(tmp_path):
    res = _run([BENCH / "sweep_decode.py", "--smoke", "--out", tmp_path], timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    recs = _records(tmp_path / "decode_sweep.jsonl")
    assert not [r for r in recs if "error" in r]
    cases = {(r["kernel"], r["bits"], r["T"]) for r in recs}
    assert cases == {(k, b, t) for k in ("gate_up_decode", "down_decode") for b in (4, 8) for t in (1, 4)}
    assert all(sum(r["shipped"] for r in recs if (r["kernel"], r["bits"], r["T"]) == c) == 1 for c in cases)
    assert json.loads(res.stdout.strip().splitlines()[-1])["records"] == len(recs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the skip path is for machines without CUDA")
def test_sweep_decode_without_cuda_says_so(tmp_path):
    res = _run([BENCH / "sweep_decode.py", "--out", tmp_path])
    assert res.returncode == 0 and "no CUDA" in res.stdout
    assert not (tmp_path / "decode_sweep.jsonl").exists()


def test_sweep_decode_candidates_and_best(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import sweep_decode

    cands = sweep_decode.candidates(2048, 1024, (8, 512, 4, 2), (1, 2, 4, 8))
    assert cands[:4] == [(8, 512, 4, 2), (8, 512, 4, 1), (8, 512, 4, 4), (8, 512, 4, 8)]
    assert len(set(cands)) == len(cands)
    assert all(bn * bk // 2 == 16 * 32 * w for bn, bk, w, _ in cands)  # one 128-bit int4 load per thread
    assert all(bk <= 1024 for _, bk, _, _ in cands) and {s for *_, s in cands[4:]} == {2}
    recs = [{"kernel": "down_decode", "bits": 4, "T": 1, "us": 9.0, "shipped": True},
            {"kernel": "down_decode", "bits": 4, "T": 1, "us": 7.0, "shipped": False, "BLOCK_N": 4},
            {"kernel": "down_decode", "bits": 4, "T": 1, "error": "no compile", "shipped": False},
            {"kernel": "down_decode", "bits": 8, "T": 1, "us": None, "shipped": True}]
    best = sweep_decode.best_per_case(recs)
    assert best == [{**recs[1], "shipped_us": 9.0}]


def test_sweep_decode_writes_the_chosen_launches_per_device(tmp_path, monkeypatch):
    """Per kernel, the launch with the least total time over every (bits, T) case it was measured
    at; a launch missing a case is not compared; the file is what the runtime reads."""
    monkeypatch.syspath_prepend(str(BENCH))
    import sweep_decode

    from molmoe_lite.kernels import configs

    def rec(kernel, bits, t, bn, us, split=None):
        return {"kernel": kernel, "bits": bits, "T": t, "BLOCK_N": bn, "BLOCK_K": 4096 // bn, "num_warps": 4,
                "num_stages": 2, "EXPERT_SPLIT": split, "us": us, "shipped": False}

    recs = [rec("down_decode", b, t, 8, 10.0, split=1) for b in (4, 8) for t in (1, 4)]
    recs += [rec("down_decode", b, t, 4, 9.0, split=2) for b in (4, 8) for t in (1, 4)]  # fastest overall
    recs += [rec("down_decode", 4, 1, 16, 1.0, split=1)]  # fastest once, but measured at one case only
    recs += [rec("gate_up_decode", 4, 1, 16, 5.0), rec("gate_up_decode", 4, 1, 32, 6.0),
             {**rec("gate_up_decode", 4, 1, 8, None), "error": "no compile"}]
    table = sweep_decode.chosen_table(recs)
    assert table == {"down_decode": {"BLOCK_N": 4, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 2,
                                     "EXPERT_SPLIT": 2, "fill_sms": 0},
                     "gate_up_decode": {"BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 2,
                                        "fill_sms": 0}}
    path = sweep_decode.write_launch_config(recs, tmp_path, "NVIDIA Test GPU", 90)
    assert path == tmp_path / "nvidia-test-gpu.json"
    record = json.loads(path.read_text())
    assert record["device"] == "NVIDIA Test GPU" and record["capability"] == 90
    assert record["measured"]["when"] and record["measured"]["where"]
    assert configs.read_measured(path) == table
    assert sweep_decode.write_launch_config([rec("down_decode", 4, 1, 8, None)], tmp_path, "X", 90) is None


# ---------------------------------------------------------------------------------------
# targets.py
# ---------------------------------------------------------------------------------------
def _write_jsonl(path: Path, recs: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_targets_judges_each_target(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import targets

    (tmp_path / "tests_summary.json").write_text(json.dumps({"tests": 200, "failures": 0, "errors": 0, "skipped": 3,
                                                             "device": "NVIDIA H100 80GB HBM3"}))
    _write_jsonl(tmp_path / "moe_bench.jsonl", [
        {"provider": "int4", "T": 1, "us": 10.0, "bw_fraction": 0.65, "device": "H100"},
        {"provider": "bf16_loop", "T": 1, "us": 90.0},
        {"provider": "bf16_grouped_mm", "T": 1, "us": 25.0},  # the best bf16: 2.5x, short of 3x
        {"provider": "int4", "T": 1024, "us": 120.0},
        {"provider": "bf16_grouped_mm", "T": 1024, "us": 100.0},  # 1.2x <= 1.3
        {"provider": "int4", "T": 1024, "us": 500.0, "error": "a later failed record is not used"},
    ])
    _write_jsonl(tmp_path / "e2e.jsonl", [
        {"provider": "int4", "batch": 1, "decode_tokens_per_s": 200.0, "floor_fraction": 0.45},
        {"provider": "ours_bf16", "batch": 1, "decode_tokens_per_s": 100.0},
        {"provider": "int4", "batch": 4, "decode_tokens_per_s": 600.0, "floor_fraction": 0.9},
        {"provider": "int4", "memory_check": True, "fits": True, "peak_plus_context_gib": 5.2},
        {"provider": "int4_small", "memory_check": True, "fits": False, "peak_plus_context_gib": 4.5,
         "error": "OutOfMemoryError: ..."},
    ])
    assert targets.main([str(tmp_path)]) == 0
    result = json.loads((tmp_path / "targets.json").read_text())
    assert (tmp_path / "targets.txt").read_text() == targets.format_table(result) + "\n"
    assert {t["area"] for t in result["targets"]} == {"tests", "kernel", "runtime"}
    status = {t["target"]: t["status"] for t in result["targets"]}
    assert status == {
        "CUDA tests: failures + errors": "pass",
        "T=1 int4: fraction of copy bandwidth": "pass",
        "T=1 int4: speed-up over the best bf16 provider": "fail",
        "T=1024 int4: time over the best bf16 provider's": "pass",
        "int4 decode, batch 1: fraction of the bandwidth floor": "fail",
        "int4 decode, batch 1: tokens/s over ours_bf16": "pass",
        "int4 decode, batch 1: tokens/s over nf4_dense": "missing",
        "int4: fits 6.0 GiB (peak + CUDA context, GiB)": "pass",
        "int4_small: fits 4.5 GiB (peak + CUDA context, GiB)": "fail",
    }
    by_name = {t["target"]: t for t in result["targets"]}
    assert by_name["T=1 int4: speed-up over the best bf16 provider"]["value"] == 2.5
    assert by_name["T=1024 int4: time over the best bf16 provider's"]["value"] == 1.2
    assert (result["pass"], result["fail"], result["missing"]) == (5, 3, 1)


def test_targets_on_an_empty_folder_says_missing_never_pass(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import targets

    result = targets.judge(tmp_path)
    assert result["pass"] == 0 and result["fail"] == 0 and result["missing"] == len(result["targets"]) == 9
    # a CPU run's test summary (CUDA tests all skipped) is no evidence either
    (tmp_path / "tests_summary.json").write_text(json.dumps({"tests": 224, "failures": 0, "errors": 0,
                                                             "device": "cpu (x86_64)"}))
    assert targets.judge(tmp_path)["targets"][0]["status"] == "missing"
    # nor is a GPU run cut at its time limit: the tests that did not run could fail
    (tmp_path / "tests_summary.json").write_text(json.dumps({"tests": 100, "failures": 0, "errors": 0,
                                                             "device": "NVIDIA H200", "interrupted": True}))
    assert targets.judge(tmp_path)["targets"][0]["status"] == "missing"


# ---------------------------------------------------------------------------------------
# bench_serve.py
# ---------------------------------------------------------------------------------------
def test_bench_serve_prints_one_flat_record_per_concurrency(tmp_path):
    pytest.importorskip("openai")
    pytest.importorskip("starlette")
    out = tmp_path / "serve.jsonl"
    res = _run([BENCH / "bench_serve.py", "--concurrency", "1,3", "--requests", "1", "--max-tokens", "2",
                "--max-context", "512", "--out", out], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    printed = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert printed == _records(out)
    assert [r["concurrency"] for r in printed] == [1, 3] and [r["requests"] for r in printed] == [1, 3]
    for r in printed:
        assert all(not isinstance(v, (dict, list)) for v in r.values())  # flat
        assert 1 <= r["completion_tokens"] <= 2 * r["requests"]
        assert r["tokens_per_s"] > 0 and 0 < r["latency_p50_s"] <= r["latency_p99_s"]
    assert printed[0]["speedup_vs_1"] == 1.0
