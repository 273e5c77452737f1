"""The inputs of a batch job: a folder of images, or a JSONL / CSV file of rows.

A folder is searched recursively for files with the usual image extensions (case
ignored), in sorted order; each image's id is its path relative to the folder. A JSONL
file holds one JSON object per line, a CSV file a header and one row per line; both
need ``id`` and ``image`` (a path relative to the file) and may give ``prompt``
(otherwise the job's prompt applies). Problems of the input file itself (a line that is
not JSON, a missing or repeated id) stop the job before any work, naming the file and
line; problems of one image (missing, corrupt, not an image, a web address) are found later,
row by row.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molmoe_lite.errors import MolmoeLiteError
from molmoe_lite.images import is_web_address

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_PROMPT = "Describe this image."


class BatchInputError(MolmoeLiteError, ValueError):
    """An input folder or rows file that cannot be read as a batch job (names the file and line)."""


@dataclass(frozen=True)
class Row:
    """One image to answer: ``image`` as the input gave it, ``path`` where it is on disk."""

    id: str
    image: str
    path: str
    prompt: str


def read_rows(source: str | Path | Iterable[Mapping[str, Any]], prompt: str | None = None) -> list[Row]:
    """The rows of a folder, a ``.jsonl`` / ``.csv`` file, or an iterable of dicts.

    Dicts (the Python API) carry ``id``, ``image`` (relative to the working directory)
    and optionally ``prompt``. ``prompt`` is the default for rows without one.
    """
    default = prompt if prompt is not None else DEFAULT_PROMPT
    if not isinstance(source, (str, Path)):
        return _checked(((f"row {i + 1}", r) for i, r in enumerate(source)), Path.cwd(), default, "rows")
    path = Path(source).absolute()  # rows carry absolute paths: workers may run elsewhere
    if path.is_dir():
        return _folder(path, default)
    if not path.exists():
        raise BatchInputError(f"{path}: no such file or folder")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _checked(_jsonl(path), path.parent, default, str(path))
    if suffix == ".csv":
        return _checked(_csv(path), path.parent, default, str(path))
    raise BatchInputError(f"{path}: expected a folder of images, a .jsonl or a .csv file of rows")


def _folder(folder: Path, prompt: str) -> list[Row]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not files:
        raise BatchInputError(f"{folder}: no images found (extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    rows = []
    for p in files:
        rel = p.relative_to(folder).as_posix()
        rows.append(Row(id=rel, image=rel, path=str(p), prompt=prompt))
    return rows


# "utf-8-sig": UTF-8 that may begin with the byte-order mark Excel and Notepad write
ENCODING = "utf-8-sig"


def _jsonl(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding=ENCODING) as f, _utf8_only(path):
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise BatchInputError(f"{path}: line {n} is not JSON ({exc.msg})") from None


def _csv(path: Path) -> Iterable[tuple[str, Any]]:
    with path.open(encoding=ENCODING, newline="") as f, _utf8_only(path):
        reader = csv.DictReader(f)
        missing = {"id", "image"} - set(reader.fieldnames or ())
        if missing:
            raise BatchInputError(f"{path}: the header lacks the column(s) {', '.join(sorted(missing))}")
        for row in reader:
            yield f"line {reader.line_num}", row


@contextmanager
def _utf8_only(path: Path) -> Iterator[None]:
    try:
        yield
    except UnicodeDecodeError as exc:
        raise BatchInputError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None


def _checked(items: Iterable[tuple[str, Any]], base: Path, default: str, source: str) -> list[Row]:
    rows: list[Row] = []
    seen: dict[str, str] = {}
    for where, item in items:
        if not isinstance(item, Mapping):
            raise BatchInputError(f"{source}: {where} is not an object with id and image")
        for key in ("id", "image"):
            if item.get(key) in (None, ""):
                raise BatchInputError(f"{source}: {where} has no {key!r}")
        row_id = str(item["id"])
        if row_id in seen:
            raise BatchInputError(f"{source}: {where} repeats the id {row_id!r} of {seen[row_id]}")
        seen[row_id] = where
        image = str(item["image"])
        text = item.get("prompt")
        # a web address stays as given, so reading it says images are read from local files
        # (joined to base it would read as a missing file "https:/host/x.jpg")
        path = image if is_web_address(image) else str(base / image)
        rows.append(Row(id=row_id, image=image, path=path, prompt=default if text in (None, "") else str(text)))
    if not rows:
        raise BatchInputError(f"{source}: no rows")
    return rows
