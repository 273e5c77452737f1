"""The output of a batch job: a JSONL file that only ever holds whole lines.

Each batch's lines are encoded first and appended with one ``write`` of complete lines
(``O_APPEND``), then ``fsync``ed, so a job killed at any moment loses at most the batch
it was answering. The file is locked while a job writes it. Opening the file again reads the ids already there (those are skipped)
and cuts off a trailing partial record, should one exist (a crash of the machine rather
than the process), before anything is appended after it; a file with other text is
refused, untouched.
"""

from __future__ import annotations

import json
import os

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, the rest works
    fcntl = None
from pathlib import Path
from typing import Any

from molmoe_lite.errors import MolmoeLiteError

FIELDS = ("id", "image", "prompt", "answer", "points", "new_tokens", "seconds", "error")
RECORD_START = b'{"id": '  # how every record's line begins (json.dumps of FIELDS in order)


class ResultsFileError(MolmoeLiteError):
    """An existing output file whose whole lines are not our records."""


class ResultsFile:
    """Append-only JSONL of records; ``done`` holds the ids of the records already written."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._lock()
            self._read_existing()
        except BaseException:
            os.close(self._fd)
            raise

    def _lock(self) -> None:
        """Refuse a second job appending to the same file (their lines would interleave)."""
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ResultsFileError(f"{self.path}: another batch job is writing this file") from None

    def _read_existing(self) -> None:
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]  # up to the last newline: the complete lines
        # split at "\n" only: str.splitlines also splits at U+0085 and U+2028, which an answer may hold
        lines = whole.decode("utf-8", errors="replace").split("\n")[:-1]
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                self.done.add(str(record["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise self._not_ours(f"line {n} is not a batch record") from None
        tail = data[len(whole):]
        if tail:
            # checked before anything is cut: only the start of a record of ours (torn by a crash),
            # the zeros a file system may leave after one, or blanks are dropped; other text is the user's
            blank = not tail.replace(b"\0", b"").strip()
            if not (tail.startswith(RECORD_START) or RECORD_START.startswith(tail) or blank):
                raise self._not_ours(f"line {len(lines) + 1} is not a batch record")
            os.ftruncate(self._fd, len(whole))
            os.fsync(self._fd)

    def _not_ours(self, problem: str) -> ResultsFileError:
        return ResultsFileError(f"{self.path}: {problem}; choose another --out or remove the file")

    def append(self, records: list[dict[str, Any]]) -> None:
        """Write ``records`` as whole lines in one write, and make them durable."""
        if not records:
            return
        data = "".join(json.dumps({k: r.get(k) for k in FIELDS}, ensure_ascii=False) + "\n" for r in records)
        view = memoryview(data.encode("utf-8"))
        while view:  # a regular file takes it in one go; loop in case it ever does not
            view = view[os.write(self._fd, view) :]
        os.fsync(self._fd)
        self.done.update(str(r["id"]) for r in records)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "ResultsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
