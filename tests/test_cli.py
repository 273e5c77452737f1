"""The ``molmoe-lite`` command, through a subprocess as a user runs it."""

import os
import subprocess
import sys

import pytest


def _cli(*args, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run(
        [sys.executable, "-m", "molmoe_lite.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=env,
    )


def test_help_explains_the_commands():
    out = _cli("--help")
    assert out.returncode == 0
    for word in ("run", "demo", "MolmoE"):
        assert word in out.stdout
    run_help = _cli("run", "--help")
    assert "--image" in run_help.stdout and "hub id" in run_help.stdout


def test_every_argument_of_every_command_has_help():
    import argparse

    from molmoe_lite.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    silent = [f"{name} {action.dest}" for name, sub in commands.choices.items() for action in sub._actions
              if not isinstance(action, argparse._HelpAction) and not action.help]
    assert not silent, f"arguments without a --help line: {silent}"


def test_demo_writes_its_checkpoint_once_and_answers(tmp_path):
    env = {"MOLMOE_LITE_CACHE": str(tmp_path)}
    first = _cli("demo", "--max-new-tokens", "5", env_extra=env)
    assert first.returncode == 0, first.stderr
    assert "random" in first.stderr
    assert "tokens/s" in first.stderr  # the stats line
    floats = [p for p in tmp_path.glob("demo-tiny-v*") if not p.name.endswith("-int4")]
    quants = list(tmp_path.glob("demo-tiny-v*-int4"))
    assert len(floats) == 1 and (floats[0] / "pytorch_model.bin").exists()
    # the demo runs the int4 conversion of the float checkpoint (the quantised path)
    assert len(quants) == 1 and (quants[0] / "model.safetensors.index.json").exists()
    assert str(quants[0]) in first.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary build folders must be gone"
    stamps = {p: p.stat().st_mtime_ns for p in (floats[0] / "pytorch_model.bin", quants[0] / "config.json")}
    second = _cli("demo", "--max-new-tokens", "5", env_extra=env)
    assert second.returncode == 0, second.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items()), "the cached checkpoints were rewritten"
    # greedy decoding of the same cached model: the same answer both times
    assert first.stdout == second.stdout


def test_demo_with_a_damaged_cache_says_how_to_rebuild_it(tmp_path, monkeypatch, capsys):
    from molmoe_lite.cli import main
    from molmoe_lite.demo import demo_checkpoint, demo_quantized

    monkeypatch.setenv("MOLMOE_LITE_CACHE", str(tmp_path))
    float_folder = demo_checkpoint()
    shard = next(demo_quantized(float_folder).glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:1000])  # a cache file cut short (disk full, a crash)
    assert main(["demo", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert shard.name in err and f"delete {float_folder} and {float_folder}-int4" in err


def test_run_streams_an_answer_for_an_image_file(tiny_release, tmp_path):
    from molmoe_lite.demo import demo_image

    img = tmp_path / "scene.png"
    demo_image().save(img)
    out = _cli("run", str(tiny_release), "--image", str(img), "--max-new-tokens", "4", "Describe this image.")
    assert out.returncode == 0, out.stderr
    # the streamed answer is the API's answer for the same image file, then one newline
    from molmoe_lite import load

    model = load(tiny_release, device="cpu")
    assert out.stdout == model.generate(str(img), "Describe this image.", max_new_tokens=4) + "\n"


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda tmp, rel: ["run", str(tmp / "nope"), "hi"], "no such folder"),
        (lambda tmp, rel: ["run", str(rel), "--image", str(tmp / "missing.png"), "hi"], "missing.png"),
        (lambda tmp, rel: ["run", str(rel), "--image", str(rel / "config.json"), "hi"], "config.json"),
    ],
    ids=["missing-model-folder", "missing-image", "not-an-image"],
)
def test_bad_input_gives_one_clear_line(tiny_release, tmp_path, make_args, message):
    out = _cli(*make_args(tmp_path, tiny_release))
    assert out.returncode == 2
    assert message in out.stderr
    assert "Traceback" not in out.stderr
