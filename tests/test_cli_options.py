"""Every option of the ``molmoe-lite`` commands does what the Python API does with it.

The commands run in-process through ``molmoe_lite.cli.main`` (captured output), and each
``run`` answer is compared with the answer ``load(...).generate(...)`` gives for the same
settings, so an option the CLI dropped or mis-mapped shows as a different answer. The
installed entry point itself runs once, in a subprocess, as a user runs it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from molmoe_lite import load
from molmoe_lite.cli import main
from molmoe_lite.demo import demo_image

PROMPT = "Describe this image."


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli-images") / "scene.png"
    demo_image().save(path)
    return path


@pytest.fixture(scope="module")
def transparent_file(tmp_path_factory) -> Path:
    # a dark shape on a transparent background whose hidden colour is black: drop shows black,
    # composite a light background (contrasting with the shape)
    rgba = np.zeros((200, 300, 4), dtype=np.uint8)
    rgba[50:150, 80:220] = (60, 30, 40, 255)
    path = tmp_path_factory.mktemp("cli-images") / "cutout.png"
    Image.fromarray(rgba, "RGBA").save(path)
    return path


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def answer(folder, images, tokens=5, load_kw=None, **gen_kw) -> str:
    model = load(folder, device="cpu", **(load_kw or {}))
    return model.generate([str(i) for i in images] or None, PROMPT, max_new_tokens=tokens, **gen_kw)


@pytest.mark.parametrize(
    "flags, load_kw, gen_kw",
    [
        ([], {}, {}),
        (["--quantize", "int8"], {"quantize": "int8"}, {}),
        (["--quantize", "int4", "--preset", "small"], {"quantize": "int4", "preset": "small"}, {}),
        (["--dtype", "bfloat16"], {"dtype": "bfloat16"}, {}),
        (["--temperature", "0.8", "--top-p", "0.05", "--seed", "3"], {}, {"temperature": 0.8, "top_p": 0.05, "seed": 3}),
        (["--max-context", "1200"], {}, {"max_context": 1200}),
    ],
    ids=["defaults", "quantize-int8", "preset-small", "dtype-bf16", "sampling", "max-context"],
)
def test_run_answers_as_the_api_does(capsys, tiny_release, image_file, flags, load_kw, gen_kw):
    code, out, err = run_cli(capsys, "run", tiny_release, "--image", image_file, "--max-new-tokens", 5, *flags, PROMPT)
    assert code == 0, err
    assert out == answer(tiny_release, [image_file], load_kw=load_kw, **gen_kw) + "\n"


def test_run_seed_and_temperature_are_used(capsys, tiny_release):
    outs = set()
    for seed in (1, 2, 3):
        code, out, _ = run_cli(capsys, "run", tiny_release, "--max-new-tokens", 6, "--temperature", "1.0",
                               "--seed", seed, PROMPT)
        assert code == 0
        outs.add(out)
    assert len(outs) > 1


def test_run_transparent_modes(capsys, tiny_release, transparent_file):
    answers = {}
    for mode in ("composite", "drop"):
        code, out, err = run_cli(capsys, "run", tiny_release, "--image", transparent_file, "--max-new-tokens", 8,
                                 "--transparent", mode, PROMPT)
        assert code == 0, err
        answers[mode] = out
        assert out == answer(tiny_release, [transparent_file], tokens=8, transparent=mode) + "\n"
    assert answers["composite"] != answers["drop"]


def test_run_max_context_too_small_is_one_line(capsys, tiny_release):
    code, out, err = run_cli(capsys, "run", tiny_release, "--max-new-tokens", 5, "--max-context", 4, PROMPT)
    assert code == 2 and out == ""
    assert "max_context=4" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "points, with_image, message",
    [("points.txt", True, "unknown picture format '.txt'"), ("points", True, "unknown picture format"),
     ("missing/points.png", True, "does not exist"), (".", True, "is a folder"),
     ("points.png", False, "needs an --image")],
    ids=["text-extension", "no-extension", "missing-folder", "a-folder", "no-image"],
)
def test_run_bad_points_path_is_one_line_before_any_work(capsys, tmp_path, image_file, points, with_image,
                                                          message, monkeypatch):
    # checked before the model loads: the model folder does not even exist here
    monkeypatch.chdir(tmp_path)
    images = ["--image", image_file] if with_image else []
    code, out, err = run_cli(capsys, "run", tmp_path / "no-model", *images, "--points", points, PROMPT)
    assert code == 2 and out == ""
    assert message in err and "--points" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_quantize_options_reach_the_converted_folder(capsys, tiny_release, tmp_path, image_file):
    dst = tmp_path / "q"
    code, out, err = run_cli(capsys, "quantize", tiny_release, dst, "--bits", 4, "--group-size", 32,
                             "--include", "experts,attention", "--method", "rtn")
    assert code == 0, err
    assert "group size 32" in out and "method rtn" in out
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert (q["bits"], q["group_size"], q["method"], q["modules"]) == (4, 32, "rtn", ["experts", "attention"])

    code, out, err = run_cli(capsys, "inspect", dst, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["bits"] == 4 and info["quantization_config"]["group_size"] == 32
    assert info["kinds"]["attention"]["quantized"] and not info["kinds"]["lm_head"]["quantized"]
    # int4 g32: 4 bits + two fp16 numbers per 32 weights
    assert info["kinds"]["attention"]["bits_per_weight"] == pytest.approx(5.0)
    assert [p["preset"] for p in info["load_plans"]] == ["default", "small"]

    code, out, err = run_cli(capsys, "compare", tiny_release, dst, "--image", image_file, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["positions"] > 0 and 0.5 <= r["top1_agreement"] <= 1 and r["kl_mean"] >= 0


def test_inspect_json_of_a_float_release(capsys, tiny_release):
    code, out, err = run_cli(capsys, "inspect", tiny_release, "--json", "--context", 100)
    assert code == 0, err
    info = json.loads(out)
    assert info["bits"] is None and info["context"] == 100
    # 2 layers x K and V x 100 tokens x 64 channels x 2 bytes
    assert info["kv_cache_bytes"] == 2 * 2 * 100 * 64 * 2
    assert [(p["quantize"], p["preset"]) for p in info["load_plans"]] == [
        (None, "default"), ("int8", "default"), ("int4", "default"), ("int4", "small")]


def test_debug_shows_the_traceback_instead_of_one_line(capsys, tmp_path):
    from molmoe_lite.errors import MolmoeLiteError

    code, _, err = run_cli(capsys, "inspect", tmp_path / "missing")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "missing" in err
    with pytest.raises(MolmoeLiteError, match="missing"):
        main(["--debug", "inspect", str(tmp_path / "missing")])


def test_no_command_prints_the_help(capsys):
    code, out, _ = run_cli(capsys)
    assert code == 1
    assert "usage: molmoe-lite" in out and "quantize" in out and "inspect" in out


def test_the_installed_entry_point_runs(tiny_release, image_file):
    exe = Path(sys.executable).with_name("molmoe-lite")
    if not exe.exists():
        pytest.skip(f"no molmoe-lite script beside {sys.executable} (package not installed in this environment)")
    out = subprocess.run([str(exe), "run", str(tiny_release), "--image", str(image_file), "--max-new-tokens", "5",
                          PROMPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == answer(tiny_release, [image_file]) + "\n"


def test_a_reader_that_goes_away_ends_run_quietly(tiny_release):
    # `molmoe-lite run ... | head -c 1`: the closed pipe is not an error to report
    proc = subprocess.Popen([sys.executable, "-m", "molmoe_lite.cli", "run", str(tiny_release), "--max-new-tokens",
                             "200", PROMPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(1)  # the first piece has arrived
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "error" not in err and "Broken pipe" not in err and "Traceback" not in err, err
