"""Find a model: a local folder, or a Hugging Face hub id fetched once.

Local folders are used as they are. Anything that looks like ``owner/name`` and is
not a folder is downloaded with ``huggingface_hub`` (an optional dependency) into its
cache, after checking that the disk has room for the files; offline, or without
``huggingface_hub``, the error says so and how to proceed instead of a network
traceback.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from molmoe_lite.errors import MolmoeLiteError

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class ModelNotFoundError(MolmoeLiteError, FileNotFoundError):
    """The model path is neither a folder nor a hub id that could be fetched."""


def resolve_model(path_or_id: str | Path) -> Path:
    """A local folder holding the model: ``path_or_id`` itself, or a fresh hub download."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path}: is a file; pass the folder that holds config.json and the weights")
    text = str(path_or_id)
    if text.startswith((".", "/", "~")) or not _HUB_ID.match(text):  # a path, not owner/name
        raise ModelNotFoundError(f"{text}: no such folder (and not a hub id of the form owner/name)")
    return _download(text)


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as exc:
        raise ModelNotFoundError(
            f"{repo_id}: not a local folder, and fetching from the hub needs huggingface_hub "
            "(pip install 'molmoe-lite[hub]'), or download the files yourself and pass their folder"
        ) from exc
    try:
        info = HfApi().model_info(repo_id, files_metadata=True)
        needed = sum((s.size or 0) for s in (info.siblings or []))
        from huggingface_hub.constants import HF_HUB_CACHE

        cache = Path(HF_HUB_CACHE)
        cache.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(cache).free
        if needed > free:
            raise ModelNotFoundError(
                f"{repo_id}: needs {needed / 1e9:.1f} GB but only {free / 1e9:.1f} GB is free in {cache}"
            )
        return Path(snapshot_download(repo_id))
    except ModelNotFoundError:
        raise
    except Exception as exc:  # network errors come in many library-specific types
        raise ModelNotFoundError(
            f"{repo_id}: could not fetch it from the hub ({type(exc).__name__}: {exc}). "
            "Offline? Download the folder elsewhere and pass its path."
        ) from exc
