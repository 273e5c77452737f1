"""The streaming converter (quantize.convert), its planned shard writer and `inspect`.

Tiny random checkpoints (molmoe_lite.testing) are converted on the CPU. Checked: bin and
sharded-safetensors sources give byte-identical outputs; the output reads back through the
format module and matches quantising the source directly; config/tokenizer files; every
kind of bad input gives a clear error naming the file and leaves no DST; the planned
writer writes the same bytes as ShardedSafetensorsWriter; inspect's sizes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from molmoe_lite.quantize import convert as convert_mod
from molmoe_lite.quantize.checkpoint import CheckpointError, open_checkpoint
from molmoe_lite.quantize.convert import ConvertError, convert
from molmoe_lite.quantize.format import QuantFormatError, quantize_weight, tensors_to_quantized
from molmoe_lite.quantize.config_check import ConfigError
from molmoe_lite.quantize.inspect import format_report, inspect_checkpoint, kv_cache_bytes
from molmoe_lite.quantize.layout import expected_shapes, expert_hidden_size, expert_key
from molmoe_lite.quantize.planned_writer import PlannedShardWriter
from molmoe_lite.quantize.writer import OutputError, ShardedSafetensorsWriter
from molmoe_lite.testing import random_state_dict, save_release_checkpoint, tiny_config_dict, write_config, write_tiny_release

# Relative Frobenius error of a whole dequantised matrix vs its source (Gaussian-like random
# weights): int4-g64 refit measures ~0.08-0.09 here, int8 per-channel ~0.006.
REL_BOUND = {4: 0.12, 8: 0.01}
SMALL_SHARD = 64 * 1024  # forces several output shards on the tiny model (~0.4 MB)


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Path:
    """Tiny release as pytorch_model.bin, with a processor_config.json that carries an auto_map."""
    folder = write_tiny_release(tmp_path_factory.mktemp("src-bin"), seed=3, fmt="bin")
    (folder / "processor_config.json").write_text(
        json.dumps({"auto_map": {"AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
                    "processor_class": "MolmoProcessor"}, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def state(release) -> dict[str, torch.Tensor]:
    return random_state_dict(json.loads((release / "config.json").read_text()), seed=3)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _no_leftovers(parent: Path, name: str) -> None:
    assert not (parent / name).exists(), f"{name} was left behind"
    temps = [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]
    assert not temps, f"temporary folders left behind: {temps}"


def _release_from_state(folder: Path, state, cfg=None, fmt="bin") -> Path:
    cfg = cfg or tiny_config_dict()
    write_config(cfg, folder)
    save_release_checkpoint(state, folder, fmt)
    return folder


# ---------------------------------------------------------------------------- good input


def test_bin_and_sharded_sources_give_identical_bytes(release, tmp_path):
    sharded = write_tiny_release(tmp_path / "src-sharded", seed=3, fmt="sharded", max_shard_bytes=100_000)
    shutil.copy(release / "processor_config.json", sharded / "processor_config.json")
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    before = (release / "pytorch_model.bin").read_bytes()
    a = convert(release, tmp_path / "a", progress=False, max_shard_bytes=SMALL_SHARD)
    # The .bin is mapped MAP_SHARED (see checkpoint._load_bin): the source must stay untouched.
    assert (release / "pytorch_model.bin").read_bytes() == before
    b = convert(sharded, tmp_path / "b", progress=False, max_shard_bytes=SMALL_SHARD)
    assert (a.source_format, b.source_format) == ("bin", "sharded-safetensors")
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len([n for n in fa if n.endswith(".safetensors")]) >= 3
    assert sorted(fa) == sorted(fb)
    differing = [n for n in fa if fa[n] != fb[n]]
    assert not differing, f"files differ between bin and sharded sources: {differing}"


@pytest.mark.parametrize(
    "bits,group_size,include",
    [
        (4, 64, ("experts",)),
        (4, 32, ("experts", "attention", "lm_head")),
        (8, None, ("experts",)),
        (8, 32, ("experts", "attention", "lm_head")),
    ],
    ids=["int4-g64-experts", "int4-g32-all", "int8-channel-experts", "int8-g32-all"],
)
def test_output_reads_back_close_to_source(release, state, tmp_path, bits, group_size, include):
    cfg = json.loads((release / "config.json").read_text())
    dst = tmp_path / "q"
    summary = convert(release, dst, bits=bits, group_size=group_size, include=include, progress=False,
                      max_shard_bytes=SMALL_SHARD)
    n_layers, n_exp, h = cfg["n_layers"], cfg["moe_num_experts"], expert_hidden_size(cfg)

    with open_checkpoint(dst) as r:
        out = {k: r.get(k) for k in r.keys()}
    quantised = {k for k in expected_shapes(cfg) if ".mlp.experts." in k}
    if "attention" in include:
        quantised |= {k for k in state if k.endswith((".att_proj.weight", ".attn_out.weight"))}
    if "lm_head" in include:
        quantised.add("lm_head.weight")

    # Unquantised tensors: exactly the source cast to bfloat16; quantised ones: no `.weight` left.
    for key, w in state.items():
        if key in quantised:
            assert key not in out, f"{key} should have been replaced by its quantised tensors"
        else:
            assert out[key].dtype == torch.bfloat16 and torch.equal(out[key], w.to(torch.bfloat16)), key

    for layer in range(n_layers):
        prefix = f"model.transformer.blocks.{layer}.mlp.experts"
        w13 = tensors_to_quantized(f"{prefix}.w13", out, bits, group_size)
        w2 = tensors_to_quantized(f"{prefix}.w2", out, bits, group_size)
        assert w13.shape == (n_exp, 2 * h, cfg["d_model"]) and w2.shape == (n_exp, cfg["d_model"], h)
        src13 = torch.stack([torch.cat((state[expert_key(layer, e, "gate_proj")],
                                        state[expert_key(layer, e, "up_proj")])) for e in range(n_exp)])
        src2 = torch.stack([state[expert_key(layer, e, "down_proj")] for e in range(n_exp)])
        for name, qw, src in (("w13", w13, src13), ("w2", w2, src2)):
            for e in range(n_exp):
                err = float((qw.index(e).dequantize() - src[e]).norm() / src[e].norm())
                assert err <= REL_BOUND[bits], f"layer {layer} {name} expert {e}: rel error {err:.4f}"
        # The stored codes are the format's own quantisation of each source matrix.
        e = n_exp - 1
        direct = quantize_weight(state[expert_key(layer, e, "up_proj")], bits, group_size)
        assert torch.equal(w13.index(e).qweight[h:], direct.qweight)
        assert torch.equal(w13.index(e).scales[h:], direct.scales)

    for key in sorted(quantised - {k for k in quantised if ".mlp.experts." in k}):
        prefix = key[: -len(".weight")]
        qw = tensors_to_quantized(prefix, out, bits, group_size)
        err = float((qw.dequantize() - state[key]).norm() / state[key].norm())
        assert err <= REL_BOUND[bits], f"{key}: rel error {err:.4f}"

    assert set(summary.rel_errors) >= {"gate_proj", "up_proj", "down_proj"}
    assert all(0 < v <= REL_BOUND[bits] for v in summary.rel_errors.values()), summary.rel_errors
    assert summary.output_bytes == sum(p.stat().st_size for p in dst.iterdir())
    assert summary.output_bytes < summary.source_bytes
    assert summary.tensors_quantized == 2 * n_layers + len(quantised) - 3 * n_exp * n_layers


def test_config_and_side_files(release, tmp_path):
    dst = tmp_path / "q"
    summary = convert(release, dst, bits=4, include="experts,attention", progress=False)
    src_cfg = json.loads((release / "config.json").read_text())
    out_cfg = json.loads((dst / "config.json").read_text())
    assert "auto_map" in src_cfg and "auto_map" not in out_cfg
    q = out_cfg.pop("quantization_config")
    assert q == {"quant_method": "molmoe-lite", "format_version": 1, "bits": 4, "group_size": 64,
                 "scheme": "asymmetric", "method": "refit", "modules": ["experts", "attention"],
                 "dtype": "bfloat16"}
    src_cfg.pop("auto_map")
    assert out_cfg == src_cfg
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "generation_config.json", "preprocessor_config.json"):
        assert (dst / name).read_bytes() == (release / name).read_bytes(), name
    proc = json.loads((dst / "processor_config.json").read_text())
    assert proc == {"processor_class": "MolmoProcessor"}
    assert "processor_config.json" in summary.files_copied
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_progress_bar_and_summary_text(release, tmp_path, capsys):
    summary = convert(release, tmp_path / "q", progress=True)
    err = capsys.readouterr().err
    assert "quantise int4" in err and "100%" in err
    text = str(summary)
    assert "gate_proj" in text and "MB/s" in text and "->" in text


def test_summary_notes_a_source_without_tokenizer(release, state, tmp_path):
    # the output of a weights-and-config-only source cannot answer: say so, and what to do
    assert "tokenizer" not in str(convert(release, tmp_path / "full", progress=False))
    bare = _release_from_state(tmp_path / "bare", state)
    text = str(convert(bare, tmp_path / "q", progress=False))
    assert f"note: {bare} has no tokenizer.json; copy the release's into {tmp_path / 'q'}" in text


def test_non_empty_dst_needs_force(release, tmp_path):
    dst = tmp_path / "q"
    dst.mkdir()
    (dst / "keep.txt").write_text("old")
    # the way out is named as the CLI spells it and as Python does
    with pytest.raises(OutputError, match=r"not empty \(pass --force, or force=True, to replace it\)"):
        convert(release, dst, progress=False)
    assert (dst / "keep.txt").read_text() == "old"
    convert(release, dst, force=True, progress=False)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors.index.json").exists()


def test_dst_inside_src_refused(release):
    with pytest.raises(OutputError, match="source folder"):
        convert(release, release / "quantised", progress=False)
    assert not (release / "quantised").exists()


# ---------------------------------------------------------------------------- bad input


def _truncated_bin(folder, state):
    _release_from_state(folder, state)
    path = folder / "pytorch_model.bin"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return "pytorch_model.bin"


def _missing_expert(folder, state):
    s = dict(state)
    del s[expert_key(1, 5, "down_proj")]
    _release_from_state(folder, s)
    return expert_key(1, 5, "down_proj")


def _wrong_shape(folder, state):
    s = dict(state)
    key = expert_key(0, 2, "gate_proj")
    s[key] = torch.randn(s[key].shape[0] + 1, s[key].shape[1])
    _release_from_state(folder, s)
    return key


def _not_molmoe(folder, state):
    _release_from_state(folder, state, cfg=tiny_config_dict(model_type="llama"))
    return "config.json"


def _missing_field(folder, state):
    cfg = tiny_config_dict()
    del cfg["moe_num_experts"]
    _release_from_state(folder, state, cfg=cfg)
    return "moe_num_experts"


def _non_tensor_pickle(folder, state):
    write_config(tiny_config_dict(), folder)
    torch.save({**state, "note": "a string, not a tensor"}, folder / "pytorch_model.bin")
    return "note"


def _no_checkpoint(folder, state):
    write_config(tiny_config_dict(), folder)
    return "no checkpoint found"


def _already_quantised(folder, state):
    release = _release_from_state(folder.parent / "release", state)
    convert(release, folder, progress=False)
    return "already quantised (int4 by molmoe-lite)"


def _bad_group_size(folder, state):
    _release_from_state(folder, state)
    return "group size 48"


@pytest.mark.parametrize(
    "make,error,kwargs",
    [
        (_truncated_bin, CheckpointError, {}),
        (_missing_expert, CheckpointError, {}),
        (_wrong_shape, CheckpointError, {}),
        (_not_molmoe, ConvertError, {}),
        (_missing_field, ConvertError, {}),
        (_non_tensor_pickle, CheckpointError, {}),
        (_no_checkpoint, CheckpointError, {}),
        (_bad_group_size, ConvertError, {"group_size": 48}),
        (_already_quantised, ConvertError, {}),
    ],
    ids=["truncated-bin", "missing-expert", "wrong-shape", "not-molmoe", "missing-config-field",
         "non-tensor-pickle", "no-weights", "bad-group-size", "already-quantised"],
)
def test_bad_input_clear_error_and_no_dst(state, tmp_path, make, error, kwargs):
    src = tmp_path / "src"
    src.mkdir()
    expected = make(src, state)
    with pytest.raises(error) as info:
        convert(src, tmp_path / "dst", progress=False, **kwargs)
    msg = str(info.value)
    assert expected in msg, msg
    assert str(src) in msg or "group size" in msg, f"message does not name the file: {msg}"
    _no_leftovers(tmp_path, "dst")


@pytest.mark.parametrize(
    "kwargs,match",
    [({"bits": 3}, "bits"), ({"include": "experts,mlp"}, "unknown module"),
     ({"include": ("attention",)}, "must contain 'experts'"), ({"dtype": "int8"}, "dtype"),
     ({"method": "gptq"}, "method"), ({"device": "tpu"}, "device must be 'cpu' or 'cuda', got 'tpu'")],
    ids=["bits-3", "unknown-include", "no-experts", "bad-dtype", "bad-method", "unknown-device"],
)
def test_bad_options(release, tmp_path, kwargs, match):
    with pytest.raises(ConvertError, match=match):
        convert(release, tmp_path / "dst", progress=False, **kwargs)
    _no_leftovers(tmp_path, "dst")


def test_dst_not_writable(release, tmp_path, monkeypatch):
    # Tests run as root, for whom every folder is writable: simulate a read-only parent.
    parent = tmp_path / "readonly"
    parent.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == parent else real_access(p, mode, **kw))
    with pytest.raises(OutputError) as info:
        convert(release, parent / "dst", progress=False)
    assert str(parent) in str(info.value) and "not writable" in str(info.value)
    assert list(parent.iterdir()) == []


def test_not_enough_disk_space(release, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OutputError, match="not enough free disk space"):
        convert(release, tmp_path / "dst", progress=False)
    _no_leftovers(tmp_path, "dst")


@pytest.mark.parametrize("existing", [False, True], ids=["fresh-dst", "force-over-existing-dst"])
def test_exception_half_way_leaves_no_dst(release, tmp_path, monkeypatch, existing):
    dst = tmp_path / "dst"
    if existing:
        dst.mkdir()
        (dst / "previous.txt").write_text("previous output")
    real = convert_mod.quantize_layer_experts
    calls = []

    def failing(get_tensor, layer, *args, **kwargs):
        calls.append(layer)
        if layer == 1:  # after layer 0's shards were partly written
            raise RuntimeError("simulated failure in layer 1")
        return real(get_tensor, layer, *args, **kwargs)

    monkeypatch.setattr(convert_mod, "quantize_layer_experts", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        convert(release, dst, force=existing, progress=False, max_shard_bytes=SMALL_SHARD)
    assert calls == [0, 1]
    if existing:
        assert [p.name for p in dst.iterdir()] == ["previous.txt"]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dst.")]
    else:
        _no_leftovers(tmp_path, "dst")


def _nan_expert(folder, state):
    s = dict(state)
    key = expert_key(1, 3, "up_proj")
    s[key] = s[key].clone()
    s[key][0, 0] = float("nan")
    _release_from_state(folder, s)
    return key


@pytest.mark.parametrize(
    "existing,dst_parts,left",
    [
        ([], ("new", "deeper", "dst"), []),
        (["kept"], ("kept", "deeper", "dst"), ["kept"]),
    ],
    ids=["two-missing-parents", "missing-parent-under-an-existing-folder"],
)
def test_failure_removes_the_parent_folders_it_created(state, tmp_path, existing, dst_parts, left):
    """A conversion that fails (a NaN weight, found while quantising) after the missing parent
    folders of dst were made takes away those folders, and only those."""
    src = tmp_path / "src"
    src.mkdir()
    key = _nan_expert(src, state)
    for name in existing:
        (tmp_path / name).mkdir()
        (tmp_path / name / "note.txt").write_text("not ours")
    with pytest.raises(QuantFormatError, match="NaN") as info:
        convert(src, tmp_path.joinpath(*dst_parts), progress=False)
    assert key in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", *left])
    for name in left:
        assert [p.name for p in (tmp_path / name).iterdir()] == ["note.txt"]


# ---------------------------------------------------------------------------- planned writer


def test_planned_writer_matches_sharded_writer(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for i, (dtype, shape) in enumerate([(torch.float32, (7, 5)), (torch.uint8, (33,)), (torch.float16, (4, 9)),
                                        (torch.bfloat16, (300, 20)), (torch.int8, (2, 3, 4)),
                                        (torch.float32, (0,)), (torch.float16, (1000,))]):
        t = torch.randn(shape, generator=gen) * 20
        tensors[f"t{i}.{'z' if i % 2 else 'a'}"] = t.to(dtype)
    limit = 8000  # several shards, one tensor larger than the limit
    with ShardedSafetensorsWriter(tmp_path / "ref", max_shard_bytes=limit) as w:
        for k, t in tensors.items():
            w.add(k, t)
        w.finish()
    plan = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    pw = PlannedShardWriter(tmp_path / "new", plan, max_shard_bytes=limit)
    for k in reversed(list(tensors)):  # any write order
        pw.write(k, tensors[k])
    pw.finish()
    ref, new = _files(tmp_path / "ref"), _files(tmp_path / "new")
    assert len(ref) >= 4 and sorted(ref) == sorted(new)
    assert all(ref[n] == new[n] for n in ref), [n for n in ref if ref[n] != new[n]]


def test_planned_writer_rejects_unplanned_and_incomplete(tmp_path):
    pw = PlannedShardWriter(tmp_path, [("a", torch.float32, (2,)), ("b", torch.float16, (3,))])
    with pytest.raises(OutputError, match="not in the plan"):
        pw.write("c", torch.zeros(2))
    with pytest.raises(OutputError, match="plan says"):
        pw.write("a", torch.zeros(3))
    pw.write("a", torch.zeros(2))
    with pytest.raises(OutputError, match="written twice"):
        pw.write("a", torch.zeros(2))
    with pytest.raises(OutputError, match="never written: b"):
        pw.finish()
    pw.abort()
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- inspect


def test_inspect_sizes(release, tmp_path):
    dst = tmp_path / "q"
    convert(release, dst, bits=4, include=("experts", "lm_head"), progress=False, max_shard_bytes=SMALL_SHARD)
    info = inspect_checkpoint(dst, context=1000, batch=3)
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert info["weights_bytes"] == index["metadata"]["total_size"]
    assert info["tensors"] == len(index["weight_map"])
    assert info["quantization_config"]["bits"] == 4
    cfg = tiny_config_dict()
    n_exp = cfg["moe_num_experts"]
    # Tiny: 2 layers x (w13, w2) x (qweight, scales, zeros); experts stand for 2*8*3*32*64 weights.
    experts = info["kinds"]["experts"]
    assert experts["tensors"] == 12 and experts["quantized"]
    assert experts["weights"] == 2 * n_exp * 3 * 32 * 64
    # int4: 4 bits + 32/G for scales and zeros; w13 has G = 64 (K = 64), w2 G = 32 (K = 32).
    assert experts["bits_per_weight"] == pytest.approx((2 * (4 + 0.5) + (4 + 1.0)) / 3)
    assert info["kinds"]["lm_head"]["quantized"] and not info["kinds"]["attention"]["quantized"]
    # KV cache by hand: 2 layers * (K, V) * batch 3 * 1000 tokens * 4 kv heads * 16 dims * 2 bytes.
    assert info["kv_cache_bytes"] == 2 * 2 * 3 * 1000 * 4 * 16 * 2
    report = format_report(info)
    assert "int4" in report and "experts" in report and "KV cache" in report


def test_inspect_release_config_kv_cache(real_release_dir, tmp_path):
    # The real config (16 layers, 16 heads, d_model 2048 -> head_dim 128).
    cfg = json.loads((real_release_dir / "config.json").read_text())
    assert kv_cache_bytes(cfg, 4096) == 512 * 1024**2  # 16 * 2 * 4096 * 16 * 128 * 2 bytes
    # with a weights file that does not hold those sizes, inspect refuses to size anything
    shutil.copy(real_release_dir / "config.json", tmp_path / "config.json")
    # (one decoder tensor: a file with none at all is another model's, refused as such)
    save_release_checkpoint({"lm_head.weight": torch.zeros(2, 2),
                             "model.transformer.blocks.0.attn.q_norm.weight": torch.zeros(2)}, tmp_path, "safetensors")
    with pytest.raises(ConfigError, match=r"n_layers=16 but model.safetensors holds 1 decoder blocks"):
        inspect_checkpoint(tmp_path, context=4096)


def test_inspect_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        inspect_checkpoint(tmp_path)


def test_inspect_a_missing_folder_or_a_file(tmp_path):
    # the path itself is the problem, not a config.json inside it
    with pytest.raises(CheckpointError, match=r"nope: no such folder$"):
        inspect_checkpoint(tmp_path / "nope")
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"model.bin: is a file; pass the folder"):
        inspect_checkpoint(tmp_path / "model.bin")


def test_format_errors_are_value_errors():
    # The CLI catches ValueError / OSError: every converter error class must be one of them.
    assert issubclass(ConvertError, ValueError) and issubclass(OutputError, OSError)
    assert issubclass(QuantFormatError, ValueError)
