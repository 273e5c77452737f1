"""Safetensors shards whose tensors are all known in advance, written as each tensor arrives.

The converter knows every output tensor's name, dtype and shape from config.json before
it quantises anything. ``PlannedShardWriter`` uses that: it splits the plan into shards
exactly as ``writer.ShardedSafetensorsWriter`` would (same add order, same size rule, same
header and tensor order, same final names and index), writes each shard's header first,
and then writes every tensor's bytes straight to its offset when it is produced. Nothing
waits in memory for a shard to fill, so the converter's peak memory is one tensor group,
not one shard (2 GB). The files are byte-identical to ``ShardedSafetensorsWriter``'s for
the same tensors added in the same order (tests check it).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from molmoe_lite.quantize.writer import _DTYPE_NAMES, OutputError, check_free_space, safetensors_header
from molmoe_lite.errors import UsageError


@dataclass
class _Shard:
    keys: list[str] = field(default_factory=list)
    nbytes: int = 0
    path: Path | None = None
    data_start: int = 0  # file offset of the first tensor byte (8 + header length)
    offsets: dict[str, int] = field(default_factory=dict)  # key -> offset within the data
    pending: set[str] = field(default_factory=set)
    fd: int | None = None


def _nbytes(dtype: torch.dtype, shape: Sequence[int]) -> int:
    n = torch.empty((), dtype=dtype).element_size()
    for s in shape:
        n *= int(s)
    return n


class PlannedShardWriter:
    """Write ``prefix-0000i-of-0000N.safetensors`` shards + index for a fixed plan.

    ``plan`` lists (key, dtype, shape) in the order tensors would be ``add``-ed to a
    ``ShardedSafetensorsWriter``; ``write`` may then be called in any order, once per key,
    with a tensor of exactly that dtype and shape. ``finish`` checks that every planned
    tensor was written and writes the index. Files are opened (header written, size set)
    on construction; on an error the caller removes the folder (the converter builds in
    ``atomic_output_dir``), or calls ``abort``.
    """

    def __init__(
        self,
        folder: str | Path,
        plan: Sequence[tuple[str, torch.dtype, Sequence[int]]],
        max_shard_bytes: int = 2 * 1024**3,
        prefix: str = "model",
    ) -> None:
        if sys.byteorder != "little":
            raise OutputError(f"{folder}: writing safetensors needs a little-endian machine")
        if max_shard_bytes <= 0:
            raise UsageError(f"max_shard_bytes must be > 0, got {max_shard_bytes}")
        if not plan:
            raise OutputError(f"{folder}: empty plan; nothing to write")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self._spec: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self._shard_of: dict[str, _Shard] = {}
        self._shards: list[_Shard] = []
        self.total_size = 0
        self._finished = False

        # Shard split: the rule of ShardedSafetensorsWriter.add (a tensor opens a new shard
        # when the current one is non-empty and would pass the limit).
        cur = _Shard()
        for key, dtype, shape in plan:
            if key in self._spec:
                raise OutputError(f"{self.folder}: tensor {key!r} planned twice")
            if dtype not in _DTYPE_NAMES:
                raise OutputError(f"{self.folder}: tensor {key!r} has dtype {dtype}, which safetensors cannot store")
            shape = tuple(int(s) for s in shape)
            n = _nbytes(dtype, shape)
            if cur.keys and cur.nbytes + n > max_shard_bytes:
                self._shards.append(cur)
                cur = _Shard()
            cur.keys.append(key)
            cur.nbytes += n
            self._spec[key] = (dtype, shape)
            self._shard_of[key] = cur
            self.total_size += n
        self._shards.append(cur)

        try:
            for i, shard in enumerate(self._shards, start=1):
                shard.path = self.folder / f"{prefix}-{i:05d}-of-{len(self._shards):05d}.safetensors"
                self._open(shard)
        except BaseException:
            self._close_all()
            raise

    # -- layout -------------------------------------------------------------------------
    def _header(self, shard: _Shard) -> bytes:
        """The header ``writer._write_safetensors`` writes for these tensors (same bytes)."""
        blob, _, offsets = safetensors_header({k: self._spec[k] for k in shard.keys}, {"format": "pt"})
        shard.offsets.update(offsets)
        return blob

    def _open(self, shard: _Shard) -> None:
        blob = self._header(shard)
        shard.data_start = 8 + len(blob)
        shard.pending = set(shard.keys)
        assert shard.path is not None
        try:
            fd = os.open(shard.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as e:
            raise OutputError(f"{shard.path}: cannot create shard ({e.strerror or e})") from e
        shard.fd = fd
        self._pwrite(shard, len(blob).to_bytes(8, "little") + blob, 0)
        os.ftruncate(fd, shard.data_start + shard.nbytes)  # sparse until written

    def _pwrite(self, shard: _Shard, data: Any, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):  # pwrite may write less than asked (2 GB per call on Linux)
            try:
                done += os.pwrite(shard.fd, view[done:], offset + done)
            except OSError as e:
                raise OutputError(f"{shard.path}: write failed ({e.strerror or e})") from e

    # -- writing ------------------------------------------------------------------------
    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one planned tensor's bytes to its place; closes its shard when complete."""
        if self._finished:
            raise OutputError(f"{self.folder}: writer already finished; cannot write {key!r}")
        spec = self._spec.get(key)
        if spec is None:
            raise OutputError(f"{self.folder}: tensor {key!r} is not in the plan")
        shard = self._shard_of[key]
        if key not in shard.pending:
            raise OutputError(f"{self.folder}: tensor {key!r} written twice")
        dtype, shape = spec
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise OutputError(
                f"{self.folder}: tensor {key!r} is {tensor.dtype} {list(tensor.shape)}, "
                f"the plan says {dtype} {list(shape)}"
            )
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        if t.numel():
            self._pwrite(shard, t.reshape(-1).view(torch.uint8).numpy(), shard.data_start + shard.offsets[key])
        shard.pending.discard(key)
        if not shard.pending:
            os.fsync(shard.fd)
            os.close(shard.fd)
            shard.fd = None

    def finish(self, metadata: Mapping[str, Any] | None = None) -> list[Path]:
        """Check that every planned tensor was written; write the index. Returns all files."""
        missing = [k for s in self._shards for k in s.keys if k in s.pending]
        if missing:
            shown = ", ".join(missing[:10]) + (f", ... and {len(missing) - 10} more" if len(missing) > 10 else "")
            raise OutputError(f"{self.folder}: {len(missing)} planned tensor(s) never written: {shown}")
        weight_map = {k: s.path.name for s in self._shards for k in s.keys}
        index_meta: dict[str, Any] = {"total_size": self.total_size}
        index_meta.update(metadata or {})
        index = {"metadata": index_meta, "weight_map": {k: weight_map[k] for k in sorted(weight_map)}}
        index_path = self.folder / f"{self.prefix}.safetensors.index.json"
        check_free_space(self.folder, 1024 * 1024)
        index_path.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        self._finished = True
        return [s.path for s in self._shards] + [index_path]

    def _close_all(self) -> None:
        for s in self._shards:
            if s.fd is not None:
                try:
                    os.close(s.fd)
                finally:
                    s.fd = None

    def abort(self) -> None:
        """Close and delete every shard file."""
        self._close_all()
        for s in self._shards:
            if s.path is not None:
                try:
                    s.path.unlink()
                except FileNotFoundError:
                    pass
        self._finished = True

    def __enter__(self) -> PlannedShardWriter:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None and not self._finished:
            self.abort()
        else:
            self._close_all()
