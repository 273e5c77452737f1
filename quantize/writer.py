"""Writing checkpoints: sharded safetensors with an index, into an output folder that appears whole.

Method:
- ``ShardedSafetensorsWriter`` buffers tensors (references, not copies) until the next
  one would pass ``max_shard_bytes``, then writes that shard. Shards get temporary names
  (``model-00001.safetensors.partial``) because the final names
  ``model-00001-of-0000N.safetensors`` need N; ``finish`` renames them and writes
  ``model.safetensors.index.json``.
- The safetensors files are serialised here, not by ``safetensors.torch.save_file``: the
  library writes ``__metadata__`` in hash order (different bytes on every run) and copies
  every tensor to ``bytes`` first. Here the header lists metadata sorted and tensors by
  (element size descending, name) -- the library's order, which keeps every tensor
  aligned to its element size -- and tensor bytes go from the tensor's memory to the file.
  The same tensors in the same order give byte-identical files.
- ``atomic_output_dir`` builds an output in a temporary sibling folder and renames it into
  place only on success, so an interrupted conversion never leaves a half-written
  checkpoint where a good one is expected, nor the parent folders it created for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from molmoe_lite.errors import UsageError
from molmoe_lite.quantize.checkpoint import (
    SAFETENSORS_DTYPES,
    CheckpointError,
)

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_HEADER_ALIGN = 8  # the header is padded with spaces so tensor data starts 8-byte aligned


class OutputError(CheckpointError, OSError):
    """An output folder or file that cannot be written (exists, not writable, no space)."""


def human_size(n: int) -> str:
    """Bytes as GiB (two decimals) from 1 GiB up, else MiB (one decimal)."""
    return f"{n / 1024**3:.2f} GiB" if n >= 1024**3 else f"{n / 1024**2:.1f} MiB"


def check_free_space(folder: str | Path, needed_bytes: int) -> None:
    """Raise ``OutputError`` when the file system holding ``folder`` has < ``needed_bytes`` free."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:  # the folder may not exist yet
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as e:
        raise OutputError(f"{folder}: cannot read free disk space ({e.strerror or e})") from e
    if free < needed_bytes:
        raise OutputError(
            f"{folder}: not enough free disk space: needs {human_size(needed_bytes)}, {human_size(free)} free"
        )


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def safetensors_header(
    specs: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[str], dict[str, int]]:
    """The padded header of a safetensors file holding ``specs`` (key -> dtype, shape).

    Returns (header bytes without the 8-byte length, key order in the file, each key's
    offset from the first data byte). Tensors go in (element size descending, name) order,
    the library's own, which keeps each aligned to its element size; metadata keys sorted:
    the same input always gives the same bytes.
    """
    def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        n = torch.empty((), dtype=dtype).element_size()
        for dim in shape:
            n *= int(dim)
        return n

    elem = {k: torch.empty((), dtype=dtype).element_size() for k, (dtype, _) in specs.items()}
    order = sorted(specs, key=lambda k: (-elem[k], k))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offsets: dict[str, int] = {}
    offset = 0
    for key in order:
        dtype, shape = specs[key]
        n = nbytes(dtype, shape)
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offsets[key] = offset
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return blob + b" " * (-len(blob) % _HEADER_ALIGN), order, offsets


def _write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None
) -> int:
    """Write one safetensors file; returns its size in bytes. Tensors must be CPU, contiguous."""
    if sys.byteorder != "little":  # the format is little-endian; tensors are written raw
        raise OutputError(f"{path}: writing safetensors needs a little-endian machine")
    blob, order, _ = safetensors_header({k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for key in order:
            t = tensors[key]
            if t.numel():
                # uint8 view of the tensor's own memory: no copy on the way to the file.
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + sum(_tensor_bytes(t) for t in tensors.values())


def _check_metadata(metadata: Mapping[str, Any] | None, where: str) -> dict[str, str]:
    if metadata is None:
        return {}
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise CheckpointError(f"{where}: safetensors metadata must map str -> str; bad entries: {bad}")
    return dict(metadata)


class ShardedSafetensorsWriter:
    """Write tensors into ``prefix-0000i-of-0000N.safetensors`` shards plus an index json.

    ``metadata`` (str -> str) goes into every shard's header, after ``{"format": "pt"}``
    (transformers checks that field). ``single_file=True``: when everything fits in one
    shard, write ``{prefix}.safetensors`` and no index. A tensor larger than
    ``max_shard_bytes`` gets a shard of its own.
    """

    def __init__(
        self,
        folder: str | Path,
        max_shard_bytes: int = 2 * 1024**3,
        prefix: str = "model",
        *,
        metadata: Mapping[str, str] | None = None,
        single_file: bool = False,
    ) -> None:
        if max_shard_bytes <= 0:
            raise UsageError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = int(max_shard_bytes)
        self.prefix = prefix
        self.single_file = single_file
        self._metadata = {"format": "pt", **_check_metadata(metadata, str(self.folder))}
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._partials: list[Path] = []  # shards written so far, temporary names
        self._shard_keys: list[list[str]] = []
        self._seen: set[str] = set()
        self.total_size = 0  # tensor bytes, as the index's metadata.total_size
        self._finished = False

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Queue one tensor; writes the current shard first when this one would overflow it."""
        if self._finished:
            raise CheckpointError(f"{self.folder}: writer already finished; cannot add {key!r}")
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise CheckpointError(f"{self.folder}: invalid tensor name {key!r}")
        if key in self._seen:
            raise CheckpointError(f"{self.folder}: tensor {key!r} added twice")
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(
                f"{self.folder}: value for {key!r} is a {type(tensor).__name__}, expected a tensor"
            )
        if tensor.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"{self.folder}: tensor {key!r} has dtype {tensor.dtype}, "
                                  "which safetensors cannot store")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()  # no copy when already contiguous (e.g. a mapped .bin tensor)
        n = _tensor_bytes(t)
        if self._buffer and self._buffer_bytes + n > self.max_shard_bytes:
            self._flush()
        self._seen.add(key)
        self._buffer[key] = t
        self._buffer_bytes += n
        self.total_size += n

    def _flush(self, name: str | None = None, metadata: Mapping[str, str] | None = None) -> Path:
        index = len(self._partials) + 1
        path = self.folder / (name or f"{self.prefix}-{index:05d}.safetensors.partial")
        check_free_space(self.folder, self._buffer_bytes + 1024 * 1024)
        _write_safetensors(path, self._buffer, metadata or self._metadata)
        self._partials.append(path)
        self._shard_keys.append(list(self._buffer))
        self._buffer = {}
        self._buffer_bytes = 0
        return path

    def finish(self, metadata: Mapping[str, Any] | None = None) -> list[Path]:
        """Write the last shard, give shards their final names, write the index.

        ``metadata`` joins ``total_size`` under the index's ``"metadata"`` (in single-file
        mode, with no index, it joins the file's header and must be str -> str).
        Returns every file written: the shards in order, then the index if any.
        """
        if self._finished:
            raise CheckpointError(f"{self.folder}: writer already finished")
        if not self._buffer and not self._partials:
            raise CheckpointError(f"{self.folder}: no tensors were added; nothing to write")
        if self.single_file and not self._partials:
            extra = _check_metadata(metadata, str(self.folder))
            path = self._flush(f"{self.prefix}.safetensors", {**self._metadata, **extra})
            self._finished = True
            return [path]
        if self._buffer:
            self._flush()
        n = len(self._partials)
        files: list[Path] = []
        weight_map: dict[str, str] = {}
        for i, (partial, keys) in enumerate(zip(self._partials, self._shard_keys), start=1):
            final = self.folder / f"{self.prefix}-{i:05d}-of-{n:05d}.safetensors"
            os.replace(partial, final)
            files.append(final)
            for key in keys:
                weight_map[key] = final.name
        index_meta: dict[str, Any] = {"total_size": self.total_size}
        index_meta.update(metadata or {})
        index = {"metadata": index_meta, "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
        index_path = self.folder / f"{self.prefix}.safetensors.index.json"
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        files.append(index_path)
        self._finished = True
        return files

    def abort(self) -> None:
        """Remove the shards written so far (temporary names) and drop the buffer."""
        for p in self._partials:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        self._partials.clear()
        self._buffer.clear()
        self._finished = True

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None and not self._finished:
            self.abort()


@contextlib.contextmanager
def atomic_output_dir(dst: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``dst``; on success it becomes ``dst``.

    A non-empty ``dst`` is refused unless ``force`` (then it is replaced, only once the
    new folder is complete). On any exception the temporary folder is removed, and so are the
    missing parent folders it created (when still empty); ``dst`` is left as it was (absent
    if it was absent).
    """
    dst = Path(dst).absolute()
    if dst.exists() and not dst.is_dir():
        raise OutputError(f"{dst}: output path exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not force:
        raise OutputError(f"{dst}: output folder exists and is not empty (pass --force, or force=True, to replace it)")
    parent = dst.parent
    created = _missing_folders(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(created)
        raise OutputError(f"{parent}: cannot create the output's parent folder ({e.strerror or e})") from e
    if not os.access(parent, os.W_OK | os.X_OK):
        _remove_empty(created)
        raise OutputError(f"{parent}: folder is not writable; cannot create {dst.name} in it")
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=parent))
    except BaseException:
        _remove_empty(created)
        raise
    try:
        yield tmp
        # mkdtemp makes a private (0700) folder; give the result the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        old = None
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=parent))
            os.replace(dst, old / dst.name)
        try:
            os.replace(tmp, dst)
        except OSError as e:
            if old is not None:  # put the previous output back
                os.replace(old / dst.name, dst)
                shutil.rmtree(old, ignore_errors=True)
            raise OutputError(f"{dst}: cannot move the finished output into place ({e.strerror or e})") from e
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _missing_folders(folder: Path) -> list[Path]:
    """``folder`` and those of its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders a failed run created, deepest first, stopping at one that is not
    empty (something else has put a file there since) or cannot be removed."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
