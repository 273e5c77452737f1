"""Checkpoint IO: reading every release layout back exactly, refusing bad files with clear errors,
writing sharded safetensors deterministically, and building outputs atomically.

Round trips compare against the state dict that was written (torch.equal: bit-exact) and,
for our safetensors writer, against the safetensors library's own reader.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch

from molmoe_lite.quantize.checkpoint import (
    CheckpointError,
    MissingKeyError,
    open_checkpoint,
    validate,
)
from molmoe_lite.quantize.layout import expected_shapes
from molmoe_lite.quantize.writer import (
    OutputError,
    ShardedSafetensorsWriter,
    atomic_output_dir,
    check_free_space,
)
from molmoe_lite.testing import random_state_dict, save_release_checkpoint, tiny_config_dict


@pytest.fixture(scope="module")
def cfg() -> dict:
    return tiny_config_dict()


@pytest.fixture(scope="module")
def state(cfg) -> dict[str, torch.Tensor]:
    return random_state_dict(cfg, seed=1234)


def _nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def _save_sharded_bin(state: dict[str, torch.Tensor], folder: Path, n_shards: int) -> list[Path]:
    """A pytorch_model.bin.index.json layout (transformers' sharded torch.save output)."""
    keys = list(state)
    per = -(-len(keys) // n_shards)
    weight_map, files = {}, []
    for i in range(n_shards):
        name = f"pytorch_model-{i + 1:05d}-of-{n_shards:05d}.bin"
        part = {k: state[k] for k in keys[i * per : (i + 1) * per]}
        torch.save(part, folder / name)
        files.append(folder / name)
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": _nbytes(state)}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return files


def _write(state, folder: Path, layout: str, shard_bytes: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "sharded-bin":
        _save_sharded_bin(state, folder, 3)
    else:
        save_release_checkpoint(state, folder, layout, max_shard_bytes=shard_bytes)


# --- round trips -------------------------------------------------------------------------

LAYOUTS = [
    ("bin", "bin"),
    ("safetensors", "safetensors"),
    ("sharded", "sharded-safetensors"),
    ("sharded-bin", "sharded-bin"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout,fmt", LAYOUTS, ids=[a for a, _ in LAYOUTS])
def test_round_trip_identical(tmp_path, cfg, layout, fmt, dtype):
    state = random_state_dict(cfg, seed=7, dtype=dtype)
    shard_bytes = _nbytes(state) // 4  # forces >= 3 shards (4 or 5 with packing slack)
    _write(state, tmp_path, layout, shard_bytes)
    with open_checkpoint(tmp_path) as reader:
        assert reader.format == fmt
        assert sorted(reader.keys()) == sorted(state)
        assert len(reader) == len(state)
        for key, ref in state.items():
            assert key in reader
            assert reader.shape(key) == tuple(ref.shape), key
            assert reader.dtype(key) == dtype, key
            assert torch.equal(reader.get(key), ref), key
        seen = {}
        for key, t in reader.items():
            assert key not in seen, f"items() yielded {key} twice"
            seen[key] = t
            assert torch.equal(t, state[key]), key
        assert set(seen) == set(state)
        validate(reader, expected_shapes(cfg))  # the tiny checkpoint is a complete layout
    if layout == "sharded":
        shards = sorted(tmp_path.glob("model-*-of-*.safetensors"))
        assert len(shards) >= 3, [p.name for p in shards]
        assert not list(tmp_path.glob("*.partial"))
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == _nbytes(state)
        assert set(index["weight_map"].values()) == {p.name for p in shards}


def test_bin_order_and_memory_mapped(tmp_path, state):
    """The .bin keeps the release's key order and its tensors are backed by the mapped file."""
    save_release_checkpoint(state, tmp_path, "bin")
    path = (tmp_path / "pytorch_model.bin").resolve()
    with open_checkpoint(tmp_path) as reader:
        assert reader.keys() == list(state)
        t = reader.get("lm_head.weight")
        maps = Path("/proc/self/maps")
        if not maps.exists():
            pytest.skip("no /proc/self/maps to confirm the mapping on this OS")
        assert str(path) in maps.read_text(), "pytorch_model.bin is not memory-mapped"
        assert torch.equal(t, state["lm_head.weight"])


EDGE_TENSORS = {
    # named edge cases: every element size, so alignment of later tensors is exercised
    "odd_fp16": lambda g: torch.randn(3, 5, generator=g).half(),
    "bf16": lambda g: torch.randn(7, generator=g).bfloat16(),
    "fp64": lambda g: torch.randn(2, 3, generator=g).double(),
    "int8": lambda g: torch.randint(-128, 127, (9,), generator=g, dtype=torch.int8),
    "uint8_packed": lambda g: torch.randint(0, 255, (3, 3), generator=g, dtype=torch.uint8),
    "bool": lambda g: torch.rand(5, generator=g) > 0.5,
    "int64": lambda g: torch.randint(-(2**40), 2**40, (3,), generator=g),
    "scalar": lambda g: torch.tensor(3.5),
    "empty": lambda g: torch.zeros(0, 4),
    "transposed_view": lambda g: torch.randn(4, 6, generator=g).t(),  # non-contiguous
    "row_of_bigger": lambda g: torch.randn(8, 8, generator=g)[3],  # view into a larger storage
}


def test_writer_matches_safetensors_library(tmp_path):
    """Our serialiser's files read back through safetensors itself, every dtype and edge."""
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    tensors = {k: f(g) for k, f in EDGE_TENSORS.items()}
    writer = ShardedSafetensorsWriter(tmp_path, single_file=True, metadata={"note": "x"})
    for k, t in tensors.items():
        writer.add(k, t)
    assert writer.finish() == [tmp_path / "model.safetensors"]
    # Layout: 8-byte little-endian header size, space-padded JSON header, every tensor's data
    # aligned to its element size (readers may map the data without copying).
    raw = (tmp_path / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert n % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt", "note": "x"}
    for k, t in tensors.items():
        begin, end = header[k]["data_offsets"]
        assert end - begin == t.numel() * t.element_size(), k
        assert (8 + n + begin) % t.element_size() == 0, f"{k} misaligned"
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for k, t in tensors.items():
        assert loaded[k].dtype == t.dtype and torch.equal(loaded[k], t), k
    with open_checkpoint(tmp_path) as reader:
        for k, t in tensors.items():
            assert reader.dtype(k) == t.dtype and torch.equal(reader.get(k), t), k


def test_sharded_writer_big_tensor_gets_own_shard(tmp_path):
    g = torch.Generator().manual_seed(1)
    small = [torch.randn(16, generator=g) for _ in range(3)]  # 64 B each
    big = torch.randn(100, generator=g)  # 400 B > the 128 B limit
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=128)
    writer.add("a", small[0])
    writer.add("big", big)
    writer.add("b", small[1])
    writer.add("c", small[2])
    files = writer.finish()
    index = json.loads(files[-1].read_text())
    wm = index["weight_map"]
    assert len(files) == 4  # [a], [big], [b, c], index
    assert wm["a"] != wm["big"] != wm["b"] and wm["b"] == wm["c"]
    with open_checkpoint(tmp_path) as reader:
        assert torch.equal(reader.get("big"), big)


def test_safetensors_output_deterministic(tmp_path, state):
    """Same tensors, same order -> same bytes, whatever order the metadata dict was built in."""
    outs = []
    for i, meta in enumerate([{"b": "2", "a": "1", "z": "0"}, {"z": "0", "a": "1", "b": "2"}]):
        folder = tmp_path / f"run{i}"
        w = ShardedSafetensorsWriter(folder, max_shard_bytes=_nbytes(state) // 3, metadata=meta)
        for k, t in state.items():
            w.add(k, t.clone())  # fresh memory each run
        outs.append(w.finish(metadata={"quant": "none"}))
    names = [[p.name for p in files] for files in outs]
    assert names[0] == names[1]
    for a, b in zip(*outs):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_writer_refuses_bad_input(tmp_path):
    w = ShardedSafetensorsWriter(tmp_path)
    with pytest.raises(CheckpointError, match="no tensors"):
        w.finish()
    w.add("x", torch.zeros(2))
    with pytest.raises(CheckpointError, match="'x' added twice"):
        w.add("x", torch.zeros(2))
    with pytest.raises(CheckpointError, match="'y'.*list"):
        w.add("y", [1, 2])
    with pytest.raises(CheckpointError, match="metadata must map str -> str"):
        ShardedSafetensorsWriter(tmp_path, metadata={"n": 3})


def test_writer_abort_leaves_no_partial_files(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedSafetensorsWriter(tmp_path, max_shard_bytes=64) as w:
            for i in range(5):
                w.add(f"t{i}", torch.zeros(16))  # 64 B each: one shard per tensor
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --- validate ----------------------------------------------------------------------------


def test_validate_names_missing_unexpected_misshaped(tmp_path, cfg, state):
    bad = dict(state)
    del bad["lm_head.weight"]
    bad["model.transformer.extra.weight"] = torch.zeros(3)
    key = "model.transformer.blocks.1.mlp.gate.weight"
    bad[key] = torch.zeros(5, 7)
    save_release_checkpoint(bad, tmp_path, "safetensors")
    with open_checkpoint(tmp_path) as reader, pytest.raises(CheckpointError) as err:
        validate(reader, expected_shapes(cfg))
    msg = str(err.value)
    assert str(tmp_path / "model.safetensors") in msg
    assert "1 missing: lm_head.weight" in msg
    assert "1 unexpected: model.transformer.extra.weight" in msg
    n_exp = cfg["moe_num_experts"]
    assert f"{key} (expected [{n_exp}, {cfg['d_model']}], found [5, 7])" in msg


def test_validate_caps_long_lists(tmp_path, cfg, state):
    dropped = [k for k in state if ".experts." in k][:15]
    save_release_checkpoint({k: t for k, t in state.items() if k not in dropped}, tmp_path, "bin")
    with open_checkpoint(tmp_path) as reader, pytest.raises(CheckpointError) as err:
        validate(reader, expected_shapes(cfg))
    msg = str(err.value)
    assert "15 missing" in msg and "... and 5 more" in msg
    assert sum(k in msg for k in dropped) == 10


# --- bad files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layout,file,keep,reason",
    [
        ("bin", "pytorch_model.bin", 0.5, "cannot load"),
        ("bin", "pytorch_model.bin", 0.0, "empty"),
        ("safetensors", "model.safetensors", -5, "not a valid safetensors"),  # data cut short
        ("safetensors", "model.safetensors", 20, "not a valid safetensors"),  # header cut short
    ],
    ids=["bin-half", "bin-empty", "safetensors-tail", "safetensors-header"],
)
def test_truncated_file(tmp_path, state, layout, file, keep, reason):
    save_release_checkpoint(state, tmp_path, layout)
    path = tmp_path / file
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=reason) as err:
        open_checkpoint(tmp_path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "index_text,reason",
    [
        ('{"weight_map": {"a": "x.safetensors",', "not valid JSON"),
        ('{"metadata": {}}', 'no "weight_map"'),
        ('{"weight_map": []}', 'no "weight_map"'),
        ('{"weight_map": {}}', "is empty"),
        ('{"weight_map": {"a": 3}}', "expected a shard file name"),
        ('{"weight_map": {"a": "../elsewhere.safetensors"}}', "lies outside"),
        ('{"weight_map": {"a": "/tmp/abs.safetensors"}}', "lies outside"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
    ids=["truncated-json", "no-weight-map", "weight-map-list", "empty-map", "non-str-shard",
         "path-escape", "absolute-path", "binary"],
)
def test_corrupt_index(tmp_path, index_text, reason):
    index = tmp_path / "model.safetensors.index.json"
    if isinstance(index_text, bytes):
        index.write_bytes(index_text)
    else:
        index.write_text(index_text)
    with pytest.raises(CheckpointError, match=reason) as err:
        open_checkpoint(tmp_path)
    assert str(index) in str(err.value)


def test_missing_shard(tmp_path, state):
    files = save_release_checkpoint(state, tmp_path, "sharded", max_shard_bytes=_nbytes(state) // 4)
    files[1].unlink()
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path)
    msg = str(err.value)
    assert "model.safetensors.index.json" in msg and files[1].name in msg and "missing" in msg


def test_symlinked_shards(tmp_path, state):
    """Hub caches keep shards as symlinks into a blob folder: they must be followed."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshot"
    files = save_release_checkpoint(state, blobs, "sharded", max_shard_bytes=_nbytes(state) // 3)
    snap.mkdir()
    for f in files:
        (snap / f.name).symlink_to(Path("..") / "blobs" / f.name)
    with open_checkpoint(snap) as reader:
        assert reader.format == "sharded-safetensors"
        for key, t in reader.items():
            assert torch.equal(t, state[key]), key


def test_shard_lacking_indexed_key(tmp_path, state):
    files = save_release_checkpoint(state, tmp_path, "sharded", max_shard_bytes=_nbytes(state) // 4)
    index_path = files[-1]
    index = json.loads(index_path.read_text())
    real = next(k for k, name in index["weight_map"].items() if name == files[0].name)
    index["weight_map"]["ghost.weight"] = files[0].name
    index_path.write_text(json.dumps(index))
    with open_checkpoint(tmp_path) as reader:
        assert "ghost.weight" in reader
        # the mismatch is found when the shard is first opened, whichever key asked for it
        with pytest.raises(CheckpointError, match="lacks 1 tensor.*ghost.weight") as err:
            reader.get(real)
    assert str(files[0]) in str(err.value)


def test_missing_key_is_key_error(tmp_path, state):
    save_release_checkpoint(state, tmp_path, "safetensors")
    with open_checkpoint(tmp_path) as reader:
        with pytest.raises(KeyError):
            reader.get("nope")
        with pytest.raises(MissingKeyError, match="no tensor named 'nope'"):
            reader.shape("nope")


@pytest.mark.parametrize(
    "obj,reason",
    [
        ({"w": torch.zeros(2), "name": "molmo"}, "key 'name' has type str"),
        ({"w": torch.zeros(2), "state_dict": {"x": torch.zeros(1)}}, "key 'state_dict' has type dict"),
        ({"w": torch.zeros(2), "step": 3}, "key 'step' has type int"),
        ([torch.zeros(2)], "holds a list"),
        (torch.zeros(2), "holds a Tensor"),
    ],
    ids=["str-value", "nested-dict", "int-value", "top-level-list", "bare-tensor"],
)
def test_bin_non_tensor_values(tmp_path, obj, reason):
    path = tmp_path / "pytorch_model.bin"
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match=reason) as err:
        open_checkpoint(tmp_path)
    assert str(path) in str(err.value)


class _Payload:
    """Pickles as a call that creates ``marker`` when unpickled."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "os.system":
            return (os.system, (f"touch '{self.marker}'",))
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("how", ["os.system", "builtins.open"])
@pytest.mark.parametrize("container", ["torch.save", "raw-pickle"])
def test_malicious_pickle_is_refused_and_not_run(tmp_path, how, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    obj = {"w": torch.zeros(2), "x": _Payload(marker, how)}
    if container == "torch.save":
        torch.save(obj, path)
    else:  # a bare pickle stream: refused before any unpickling
        with open(path, "wb") as f:
            pickle.dump(obj, f)
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(tmp_path)
    assert str(path) in str(err.value)
    if container == "torch.save":
        assert "system" in str(err.value) or "open" in str(err.value)
    assert not marker.exists(), "unpickling ran the payload"


def test_legacy_bin_refused(tmp_path, state):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(3)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="not a zip-format.*legacy") as err:
        open_checkpoint(tmp_path)
    assert str(path) in str(err.value)


# --- detection ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "present,chosen",
    [
        (["bin", "safetensors"], "safetensors"),
        (["bin", "sharded-bin"], "sharded-bin"),
        (["sharded", "safetensors"], "sharded-safetensors"),
        (["bin"], "bin"),
    ],
    ids=["safetensors-over-bin", "bin-index-over-bin", "index-over-single", "bin-only"],
)
def test_detection_order(tmp_path, present, chosen):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    for layout in present:
        if layout == "sharded-bin":
            _save_sharded_bin(state, tmp_path, 1)
        else:
            save_release_checkpoint(state, tmp_path, layout)
    with open_checkpoint(tmp_path) as reader:
        assert reader.format == chosen
        assert torch.equal(reader.get("w"), state["w"])


def test_open_file_path_directly(tmp_path):
    save_release_checkpoint({"w": torch.ones(2)}, tmp_path, "bin")
    with open_checkpoint(tmp_path / "pytorch_model.bin") as reader:
        assert reader.format == "bin" and reader.keys() == ["w"]


@pytest.mark.parametrize("kind", ["empty-folder", "nonexistent"])
def test_no_checkpoint(tmp_path, kind):
    folder = tmp_path if kind == "empty-folder" else tmp_path / "nope"
    with pytest.raises(CheckpointError) as err:
        open_checkpoint(folder)
    assert str(folder) in str(err.value)


# --- atomic output -----------------------------------------------------------------------


def _leftovers(parent: Path, name: str) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_atomic_output_success(tmp_path):
    dst = tmp_path / "out"
    with atomic_output_dir(dst) as tmp:
        assert tmp.parent == tmp_path and tmp != dst
        (tmp / "a.txt").write_text("done")
        assert not dst.exists()  # nothing visible until the block succeeds
    assert (dst / "a.txt").read_text() == "done"
    assert _leftovers(tmp_path, "out") == []
    umask = os.umask(0)
    os.umask(umask)
    assert (dst.stat().st_mode & 0o777) == (0o777 & ~umask)


@pytest.mark.parametrize("existing", ["absent", "empty"])
def test_atomic_output_exception_leaves_nothing(tmp_path, existing):
    dst = tmp_path / "out"
    if existing == "empty":
        dst.mkdir()
    with pytest.raises(KeyError):
        with atomic_output_dir(dst) as tmp:
            (tmp / "half.safetensors").write_bytes(b"x" * 100)
            raise KeyError("interrupted")
    assert _leftovers(tmp_path, "out") == []
    if existing == "absent":
        assert not dst.exists()
    else:
        assert dst.is_dir() and list(dst.iterdir()) == []


def test_atomic_output_refuses_non_empty_without_force(tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "old.txt").write_text("keep")
    with pytest.raises(OutputError, match="not empty") as err:
        with atomic_output_dir(dst):
            pytest.fail("body must not run")
    assert str(dst) in str(err.value)
    assert isinstance(err.value, CheckpointError) and isinstance(err.value, OSError)
    assert (dst / "old.txt").read_text() == "keep"
    # A failure under force keeps the old output.
    with pytest.raises(RuntimeError):
        with atomic_output_dir(dst, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("fail")
    assert [p.name for p in dst.iterdir()] == ["old.txt"]
    with atomic_output_dir(dst, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in dst.iterdir()] == ["new.txt"]
    assert _leftovers(tmp_path, "out") == []


def test_atomic_output_refuses_file_and_unwritable_parent(tmp_path, monkeypatch):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        with atomic_output_dir(f):
            pass
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        # root passes every permission check: simulate the read-only parent instead
        monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != ro)
    ro.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="not writable") as err:
            with atomic_output_dir(ro / "out"):
                pytest.fail("body must not run")
        assert str(ro) in str(err.value)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_check_free_space(tmp_path):
    check_free_space(tmp_path / "not" / "yet", 1)  # folders that do not exist yet are fine
    with pytest.raises(OutputError, match="not enough free disk space") as err:
        check_free_space(tmp_path, sys.maxsize)
    assert str(tmp_path) in str(err.value)
