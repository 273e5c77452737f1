"""A config.json with one field wrong: load, quantize and inspect refuse it at once, naming it.

Each case is a tiny release whose weights are untouched and whose config.json has one field
changed, as a hand-edit or a mix-up of files would. Every refusal must be a ``ConfigError``
naming the field, the value and what the checkpoint holds, and must come before anything is
built: each call runs under a wall-clock guard, so a loader that starts building ten million
layers fails the test instead of hanging the suite.
"""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest

import molmoe_lite
from molmoe_lite.config import ConfigError, MolmoeConfig
from molmoe_lite.errors import MolmoeLiteError
from molmoe_lite.quantize.convert import convert
from molmoe_lite.quantize.inspect import inspect_checkpoint

# Generous on a loaded 2-core machine: a correct refusal reads headers only (well under a
# second here); the cases it guards against ran for minutes.
GUARD_S = 20


class Overran(Exception):
    pass


@contextmanager
def wall_clock_guard(seconds: int = GUARD_S):
    """Raise Overran in this (main) thread if the block runs longer than ``seconds``."""

    def on_alarm(signum, frame):
        raise Overran(f"still running after {seconds} s: the config was not refused up front")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    from molmoe_lite.testing import write_tiny_release

    return write_tiny_release(tmp_path_factory.mktemp("cfg-release"), seed=0, fmt="bin")


def edited_copy(release: Path, dest: Path, vision: bool = False, **fields) -> Path:
    """``release`` with config.json fields replaced (weights and tokenizer linked, not copied)."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in release.iterdir():
        if f.name != "config.json":
            (dest / f.name).symlink_to(f)
    cfg = json.loads((release / "config.json").read_text())
    (cfg["vision_backbone"] if vision else cfg).update(fields)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def refused(call, *needles: str) -> str:
    """Run ``call`` under the guard; it must raise ConfigError whose message holds every needle."""
    with wall_clock_guard():
        with pytest.raises(ConfigError) as info:
            call()
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    assert "\n" not in message
    return message


# (field, value, vision field?, what the message must hold: field=value and the checkpoint's size)
ROWS = [
    ("n_layers", 10_000_000, False, ["n_layers=10000000", "holds 2 decoder blocks", "pytorch_model.bin"]),
    ("moe_num_experts", 1_000_000, False, ["moe_num_experts=1000000", "mlp.gate.weight", "[8, 64]"]),
    ("d_model", 1_000_000_000, False, ["d_model=1000000000", "ln_f.weight", "[64]"]),
    ("n_heads", 0, False, ["n_heads=0", "positive integer"]),
    # more of our own
    ("n_layers", 1, False, ["n_layers=1", "holds 2 decoder blocks"]),
    ("n_layers", -3, False, ["n_layers=-3", "positive integer"]),
    ("d_model", "64", False, ["d_model='64'", "positive integer"]),
    ("n_heads", 5, False, ["d_model=64", "not divisible by n_heads=5"]),
    ("head_dim", 8, False, ["head_dim=8", "n_heads=4", "d_model=64"]),
    ("moe_top_k", 9, False, ["moe_top_k=9", "moe_num_experts=8"]),
    ("embedding_size", 10**12, False, ["embedding_size=1000000000000", "wte.embedding", "[512, 64]"]),
    ("additional_vocab_size", 0, False, ["additional_vocab_size=0", "holds 16 rows"]),
    ("mlp_ratio", 1000, False, ["mlp_ratio x d_model / 2)=32000", "image_projector.w1.weight"]),
    ("image_num_layers", 10**6, True, ["image_num_layers=1000000", "holds 4 ViT blocks"]),
    ("image_emb_dim", 10**9, True, ["image_emb_dim=1000000000", "class_embedding", "[32]"]),
    ("image_patch_size", 0, True, ["image_patch_size=0", "positive integer"]),
    ("image_num_pos", 10, True, ["image_num_pos=10", "must be 577"]),
    ("image_mlp_dim", 65, True, ["image_mlp_dim=65", "feed_forward.w1.weight", "[64, 32]"]),
]
ROW_IDS = [f"{'vision.' if v else ''}{f}={val}" for f, val, v, _ in ROWS]


@pytest.mark.parametrize("field, value, vision, needles", ROWS, ids=ROW_IDS)
def test_load_refuses_a_wrong_size_up_front(release, tmp_path, field, value, vision, needles):
    folder = edited_copy(release, tmp_path / "m", vision=vision, **{field: value})
    message = refused(lambda: molmoe_lite.load(folder, device="cpu"), *needles)
    assert str(folder / "config.json") in message


@pytest.mark.parametrize("fmt", ["safetensors", "sharded"])
def test_safetensors_headers_are_checked_too(tmp_path, fmt):
    from molmoe_lite.testing import write_tiny_release

    src = write_tiny_release(tmp_path / "src", seed=0, fmt=fmt, max_shard_bytes=200_000)
    folder = edited_copy(src, tmp_path / "m", n_layers=10_000_000)
    refused(lambda: molmoe_lite.load(folder, device="cpu"), "n_layers=10000000", "holds 2 decoder blocks")


@pytest.mark.parametrize("field, value, vision, needles", [ROWS[0], ROWS[1], ROWS[2], ROWS[3]], ids=ROW_IDS[:4])
def test_quantize_refuses_and_writes_nothing(release, tmp_path, field, value, vision, needles):
    folder = edited_copy(release, tmp_path / "m", vision=vision, **{field: value})
    out = tmp_path / "out"
    refused(lambda: convert(folder, out, bits=4, method="rtn", progress=False), *needles)
    assert not out.exists()


@pytest.mark.parametrize("field, value, vision, needles", [ROWS[0], ROWS[1], ROWS[2], ROWS[3]], ids=ROW_IDS[:4])
def test_inspect_refuses(release, tmp_path, field, value, vision, needles):
    folder = edited_copy(release, tmp_path / "m", vision=vision, **{field: value})
    refused(lambda: inspect_checkpoint(folder), *needles)


def test_the_cli_gives_one_line_and_exit_2(release, tmp_path, capsys):
    from molmoe_lite.cli import main

    folder = edited_copy(release, tmp_path / "m", n_layers=10_000_000)
    for args in (["inspect", str(folder)], ["quantize", str(folder), str(tmp_path / "q")],
                 ["run", str(folder), "hi"]):
        with wall_clock_guard():
            code = main(args)
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "n_layers=10000000" in lines[0], (args, err)
    assert not (tmp_path / "q").exists()


def test_a_quantised_checkpoint_with_a_bad_block_is_refused(release, tmp_path):
    quant = tmp_path / "q"
    convert(release, quant, bits=4, method="rtn", progress=False)
    cfg = json.loads((quant / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    cfg["moe_num_experts"] = 1_000_000
    (quant / "config.json").write_text(json.dumps(cfg))
    message = refused(lambda: molmoe_lite.load(quant, device="cpu"), "quantization_config.bits=3")
    cfg["quantization_config"]["bits"] = 4
    (quant / "config.json").write_text(json.dumps(cfg))
    refused(lambda: molmoe_lite.load(quant, device="cpu"), "moe_num_experts=1000000", "[8, 64]")
    assert isinstance(ConfigError(message), MolmoeLiteError)


def test_another_models_weights_beside_a_molmoe_config_are_named_as_such(release, tmp_path, capsys):
    # a mix-up of files: the config is MolmoE's, the weights another model's
    import torch

    from molmoe_lite.cli import main
    from molmoe_lite.quantize.checkpoint import CheckpointError

    folder = tmp_path / "m"
    folder.mkdir()
    for f in release.iterdir():
        if f.name != "pytorch_model.bin":
            (folder / f.name).symlink_to(f)
    torch.save({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)}, folder / "pytorch_model.bin")
    needles = [str(folder / "pytorch_model.bin"), "holds none of MolmoE's tensors", "decoder.bias, encoder.weight"]
    for call in (lambda: molmoe_lite.load(folder, device="cpu"), lambda: inspect_checkpoint(folder),
                 lambda: convert(folder, tmp_path / "out", progress=False)):
        with wall_clock_guard(), pytest.raises(CheckpointError) as info:
            call()
        assert all(n in str(info.value) for n in needles), str(info.value)
    assert not (tmp_path / "out").exists()
    assert main(["run", str(folder), "hi"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "holds none of MolmoE's tensors" in err


def test_every_problem_of_one_config_is_named_at_once(release, tmp_path):
    folder = edited_copy(release, tmp_path / "m", n_layers=3, moe_num_experts=16)
    refused(lambda: molmoe_lite.load(folder, device="cpu"), "n_layers=3", "moe_num_experts=16")


def test_the_unchanged_tiny_release_passes(release):
    config = MolmoeConfig.from_checkpoint(release)
    assert (config.n_layers, config.moe_num_experts, config.d_model) == (2, 8, 64)


def test_the_real_release_config_passes(real_release_dir):
    config = MolmoeConfig.from_pretrained(real_release_dir)
    assert (config.n_layers, config.moe_num_experts, config.d_model) == (16, 64, 2048)
