"""Reading model checkpoints one tensor at a time: pickle ``.bin`` and safetensors, sharded or not.

The release ships one 29 GB ``pytorch_model.bin``; converted copies come as
``model.safetensors`` or as shards listed by an index json. ``open_checkpoint`` finds
which layout a folder holds and returns one ``CheckpointReader`` over all of them.

Method, and why:
- Pickles are read only with ``torch.load(path, map_location="cpu", mmap=True,
  weights_only=True)``: the restricted unpickler refuses any global that is not a tensor
  building block (no code runs), and ``mmap`` makes every tensor a view into the mapped
  file, so "loading" 29 GB costs address space, not RAM; pages are read when a tensor is
  used. Legacy (non-zip) pickles cannot be mapped and are refused with a hint.
- Safetensors are opened with ``safe_open`` (header only); ``get`` reads one tensor.
- Shards are opened lazily, when one of their tensors is first asked for.
- Every problem (missing or truncated file, bad index, non-tensor value) is a
  ``CheckpointError`` naming the file and what is wrong, never a library traceback.

``reading(path)`` opens a checkpoint for one block; inside ``readers_kept_open()`` those blocks
share one reader per checkpoint, closed when the outer block ends (many small re-reads, one open).

``validate`` compares a reader with the expected layout (``quantize.layout``) and
reports every difference in one error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from molmoe_lite.errors import MolmoeLiteError

# Safetensors dtype names <-> torch dtypes (the writer uses the same table).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):  # newer torch only
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_FILE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_FILE = "pytorch_model.bin"
# Detection order when a folder holds several layouts (the first one found wins).
LAYOUTS: tuple[tuple[str, str], ...] = (
    (SAFETENSORS_INDEX, "sharded-safetensors"),
    (SAFETENSORS_FILE, "safetensors"),
    (BIN_INDEX, "sharded-bin"),
    (BIN_FILE, "bin"),
)

_MAX_LISTED = 10  # names listed per category in an error before "... and N more"
_ZIP_MAGIC = b"PK\x03\x04"


_ALIGN = 64  # bytes; what torch's allocator and the zip (.bin) format give every tensor


class CheckpointError(MolmoeLiteError, ValueError):
    """A checkpoint that cannot be read or does not match what is expected."""


class MissingKeyError(CheckpointError, KeyError):
    """A key asked for that the checkpoint does not hold (also a ``KeyError``)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else ""


def _listing(names: list[str], limit: int = _MAX_LISTED) -> str:
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f", ... and {len(names) - limit} more"
    return shown


def _torch_reason(exc: BaseException) -> str:
    """The informative part of a torch.load error (its weights_only message is mostly boilerplate)."""
    text = str(exc).strip()
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    for p in paragraphs:
        if not p.startswith(("Weights only load failed", "Check the documentation")):
            return " ".join(p.split())
    return " ".join(paragraphs[0].split()) if paragraphs else type(exc).__name__


def _torch_load_mapped(path: Path, shared: bool) -> Any:
    if not shared:
        return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    import mmap

    from torch.serialization import get_default_mmap_options, set_default_mmap_options

    # torch opens a shared mapping read-write: a read-only file falls back to a private one.
    if not os.access(path, os.W_OK):
        return _torch_load_mapped(path, False)
    prev = get_default_mmap_options()
    set_default_mmap_options(mmap.MAP_SHARED)
    try:
        return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    finally:
        set_default_mmap_options(prev)


def _load_bin(path: Path, shared_mmap: bool = False) -> dict[str, torch.Tensor]:
    """Map one zip-format torch pickle; every value must be a tensor.

    ``shared_mmap``: map the file MAP_SHARED instead of MAP_PRIVATE. A private (copy-on-write)
    mapping is charged against the commit limit, and Linux's default overcommit heuristic
    refuses one larger than RAM + swap (the release's 29 GB .bin on a 16-24 GB machine:
    "Cannot allocate memory"); a shared file mapping is not charged. Tensors then write
    through to the file, so only callers that never modify them (the converter) ask for it.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from e
    if size == 0:
        raise CheckpointError(f"{path}: file is empty")
    if magic != _ZIP_MAGIC:
        # Legacy torch.save format (a bare pickle stream) or not a torch file at all;
        # only the zip format can be memory-mapped, and nothing else is unpickled.
        raise CheckpointError(
            f"{path}: not a zip-format torch checkpoint (legacy pickle or another file type); "
            "it cannot be memory-mapped. Re-save it with torch.save (zip format, the default "
            "since torch 1.6) or convert it to safetensors"
        )
    try:
        obj = _torch_load_mapped(path, shared_mmap)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / others
        reason = _torch_reason(e)
        if "Cannot allocate memory" in reason and not shared_mmap:
            reason += ("; the file is larger than this machine's memory: load it quantised "
                       "(--quantize int4, or quantize=\"int4\") or in bfloat16, or convert it once "
                       "with `molmoe-lite quantize`")
        raise CheckpointError(f"{path}: cannot load ({reason})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, expected a dict of tensor name -> tensor"
        )
    for key, value in obj.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: key {key!r} has type {type(key).__name__}, expected str")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{path}: value of key {key!r} has type {type(value).__name__}, expected a tensor"
            )
    return obj


def _open_safetensors(path: Path) -> Any:
    from safetensors import safe_open

    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{path}: file is empty")
        return safe_open(str(path), framework="pt", device="cpu")
    except CheckpointError:
        raise
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read file ({e.strerror or e})") from e
    except Exception as e:  # SafetensorError: truncated, bad header, ...
        raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e


def read_json_object(path: str | Path, error: type[Exception] = CheckpointError) -> dict[str, Any]:
    """A JSON file that must hold an object; any failure raises ``error`` naming the file."""
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e.reason})") from e
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from e
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_index(index: Path) -> dict[str, Path]:
    """Key -> shard path from a ``*.index.json``; every named shard must exist inside the folder."""
    data = read_json_object(index)
    if not isinstance(data.get("weight_map"), dict):
        raise CheckpointError(f'{index}: index has no "weight_map" object (key -> shard file)')
    weight_map = data["weight_map"]
    if not weight_map:
        raise CheckpointError(f'{index}: index "weight_map" is empty')
    folder = index.parent.absolute()
    out: dict[str, Path] = {}
    shards: dict[str, Path] = {}
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise CheckpointError(
                f'{index}: "weight_map" entry {key!r} is {name!r}, expected a shard file name'
            )
        if name not in shards:
            # A shard name must stay inside the checkpoint folder. Checked on the name, not
            # the resolved path: hub caches keep shards as symlinks into a blob store.
            rel = Path(os.path.normpath(name))
            if rel.is_absolute() or not rel.parts or rel.parts[0] == "..":
                raise CheckpointError(f"{index}: shard {name!r} lies outside {folder}")
            shards[name] = folder / rel
        out[key] = shards[name]
    missing = [name for name, p in shards.items() if not p.is_file()]
    if missing:
        raise CheckpointError(
            f"{index}: {len(missing)} of {len(shards)} shard file(s) named in the index "
            f"are missing from {folder}: {_listing(missing)}"
        )
    return out


class CheckpointReader:
    """One checkpoint (a file, or shards listed by an index), read one tensor at a time.

    ``path`` is the file opened (the index for sharded layouts); ``format`` is one of
    ``"sharded-safetensors"``, ``"safetensors"``, ``"sharded-bin"``, ``"bin"``.
    Tensors from ``.bin`` files are views into the memory-mapped file (copy-on-write);
    tensors from safetensors are read when asked for.
    """

    def __init__(self, path: str | Path, fmt: str, *, shared_mmap: bool = False) -> None:
        self.path = Path(path)
        self.shared_mmap = shared_mmap  # .bin only: see _load_bin
        self.format = fmt
        self._safetensors = fmt.endswith("safetensors")
        if fmt.startswith("sharded-"):
            self._file_of = _read_index(self.path)
        else:
            self._file_of = {}
        self._handles: dict[Path, Any] = {}  # file -> safe_open handle or loaded bin dict
        if not fmt.startswith("sharded-"):
            # A single file is opened now, so a bad file fails at open time.
            handle = self._handle(self.path)
            names = self._file_keys(handle)
            self._file_of = {k: self.path for k in names}

    # -- files --------------------------------------------------------------------------
    def _file_keys(self, handle: Any) -> list[str]:
        if self._safetensors:
            # Offset order: streaming in that order reads the file front to back.
            keys = getattr(handle, "offset_keys", handle.keys)
            return list(keys())
        return list(handle.keys())

    def _handle(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is None:
            handle = _open_safetensors(file) if self._safetensors else _load_bin(file, self.shared_mmap)
            if self._file_of:  # sharded: the shard must hold what the index says it holds
                held = set(self._file_keys(handle))
                absent = [k for k, f in self._file_of.items() if f == file and k not in held]
                if absent:
                    raise CheckpointError(
                        f"{file}: shard lacks {len(absent)} tensor(s) that {self.path.name} "
                        f"maps to it: {_listing(absent)}"
                    )
            self._handles[file] = handle
        return handle

    def _locate(self, key: str) -> tuple[Path, Any]:
        file = self._file_of.get(key)
        if file is None:
            raise MissingKeyError(f"{self.path}: no tensor named {key!r}")
        return file, self._handle(file)

    # -- mapping-like API ---------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: object) -> bool:
        return key in self._file_of

    def __len__(self) -> int:
        return len(self._file_of)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        file, handle = self._locate(key)
        if self._safetensors:
            try:
                return tuple(int(n) for n in handle.get_slice(key).get_shape())
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read the header of {key!r} ({e})") from e
        return tuple(handle[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        file, handle = self._locate(key)
        if self._safetensors:
            try:
                name = handle.get_slice(key).get_dtype()
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read the header of {key!r} ({e})") from e
            if name not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor {key!r} has unsupported dtype {name}")
            return SAFETENSORS_DTYPES[name]
        return handle[key].dtype

    def get(self, key: str) -> torch.Tensor:
        """One tensor: read from safetensors now, or a view of the mapped ``.bin``."""
        file, handle = self._locate(key)
        if self._safetensors:
            try:
                tensor = handle.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from e
            # safetensors packs tensors back to back, so a zero-copy tensor can start at any
            # byte; CPU kernels then take other (slower, differently rounding) paths. Measured
            # here: logits differed by 1e-6 from the same weights loaded aligned.
            if tensor.data_ptr() % _ALIGN:
                view, tensor = tensor, tensor.clone()
                release_pages(view)  # the copy is what the caller gets: the mapped pages may go
            return tensor
        return handle[key]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.get(key)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) pairs, one at a time, shard by shard (in each file's order).

        A shard's handle is released once its tensors are all yielded, so a full pass
        holds at most one shard open beyond what the caller keeps.
        """
        by_file: dict[Path, list[str]] = {}
        for key, file in self._file_of.items():
            by_file.setdefault(file, []).append(key)
        for file, keys in by_file.items():
            for key in keys:
                yield key, self.get(key)
            if len(by_file) > 1:
                self._handles.pop(file, None)

    # -- lifetime -----------------------------------------------------------------------
    def close(self) -> None:
        """Drop the open files; tensors already handed out stay valid."""
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, format={self.format!r}, tensors={len(self)})"


def release_pages(t: torch.Tensor) -> None:
    """Tell the kernel this process is done with the whole pages under ``t``, which must not be
    used again. For a view of a mapped checkpoint the pages stay in the page cache but leave
    this process's resident set (a later read would fault them back in from the file). No-op
    off Linux and for tensors not on the CPU."""
    import sys

    if not sys.platform.startswith("linux") or t.device.type != "cpu" or t.numel() == 0:
        return
    import ctypes
    import mmap

    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


def open_checkpoint(path: str | Path, *, shared_mmap: bool = False) -> CheckpointReader:
    """Open the checkpoint in ``path``: a folder (layout detected) or one of the four files.

    Detection order in a folder: model.safetensors.index.json, model.safetensors,
    pytorch_model.bin.index.json, pytorch_model.bin. ``shared_mmap=True`` maps ``.bin``
    files MAP_SHARED (needed for a .bin larger than RAM + swap; tensors then write
    through to the file: for read-only callers such as the converter).
    """
    kw = {"shared_mmap": shared_mmap}
    path = Path(path)
    if path.is_file():
        name = path.name
        if name.endswith(".safetensors.index.json"):
            return CheckpointReader(path, "sharded-safetensors", **kw)
        if name.endswith(".bin.index.json"):
            return CheckpointReader(path, "sharded-bin", **kw)
        if name.endswith(".safetensors"):
            return CheckpointReader(path, "safetensors", **kw)
        if name.endswith((".bin", ".pt", ".pth")):
            return CheckpointReader(path, "bin", **kw)
        raise CheckpointError(f"{path}: not a checkpoint file name (.safetensors, .bin or an index json)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or folder")
    for name, fmt in LAYOUTS:
        if (path / name).is_file():
            return CheckpointReader(path / name, fmt, **kw)
    looked = ", ".join(name for name, _ in LAYOUTS)
    raise CheckpointError(f"{path}: no checkpoint found (looked for {looked})")


# folder -> its reader, while a ``readers_kept_open()`` block runs
_KEPT_OPEN: ContextVar[dict[Path, CheckpointReader] | None] = ContextVar("kept_open", default=None)


@contextmanager
def readers_kept_open() -> Iterator[None]:
    """Within the block, ``reading(path)`` opens each checkpoint once and keeps it open for later
    calls; every reader is closed when the block ends (nothing read stays cached). Nests."""
    if _KEPT_OPEN.get() is not None:
        yield
        return
    readers: dict[Path, CheckpointReader] = {}
    token = _KEPT_OPEN.set(readers)
    try:
        yield
    finally:
        _KEPT_OPEN.reset(token)
        for reader in readers.values():
            reader.close()


@contextmanager
def reading(path: str | Path) -> Iterator[CheckpointReader]:
    """``open_checkpoint(path)`` for one block, closed after it; inside ``readers_kept_open()``
    the reader is shared with every other ``reading(path)`` of the block, and stays open."""
    readers = _KEPT_OPEN.get()
    if readers is None:
        with open_checkpoint(path) as reader:
            yield reader
        return
    path = Path(path)
    if path not in readers:
        readers[path] = open_checkpoint(path)
    yield readers[path]


def validate(reader: CheckpointReader, expected: dict[str, tuple[int, ...]]) -> None:
    """Raise one ``CheckpointError`` listing missing, unexpected and mis-shaped tensors."""
    have = set(reader.keys())
    missing = [k for k in expected if k not in have]
    unexpected = [k for k in reader.keys() if k not in expected]
    misshaped = []
    for key, shape in expected.items():
        if key in have:
            got = reader.shape(key)
            if tuple(got) != tuple(shape):
                misshaped.append(f"{key} (expected {list(shape)}, found {list(got)})")
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing: {_listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected: {_listing(unexpected)}")
    if misshaped:
        parts.append(f"{len(misshaped)} with the wrong shape: {_listing(misshaped)}")
    raise CheckpointError(
        f"{reader.path}: does not match the expected layout ({len(expected)} tensors); "
        + "; ".join(parts)
    )
