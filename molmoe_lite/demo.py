"""The offline demo: a tiny random MolmoE, made once and cached, answering an image prompt.

Nothing is downloaded. The first run writes a tiny checkpoint in the release's exact
layout (config.json, ``pytorch_model.bin`` via ``torch.save``, a small byte-level BPE
tokenizer with Molmo's special tokens, the preprocessor config) into a cache folder,
atomically; later runs reuse it. The answer then goes through the same code path as
real weights (``load`` -> processor -> vision + decoder -> streaming generation). The
weights are random, so the words are too: the demo shows the machinery, not the model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

# bump when the tiny checkpoint's contents change, so old caches are not reused
DEMO_VERSION = 1


def cache_root() -> Path:
    """``$MOLMOE_LITE_CACHE``, else ``$XDG_CACHE_HOME/molmoe-lite``, else ``~/.cache/molmoe-lite``."""
    if os.environ.get("MOLMOE_LITE_CACHE"):
        return Path(os.environ["MOLMOE_LITE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "molmoe-lite"


def demo_checkpoint(root: Path | None = None) -> Path:
    """The cached tiny checkpoint folder, written on first use (built aside, then renamed)."""
    from molmoe_lite.testing import write_tiny_release

    root = root or cache_root()
    folder = root / f"demo-tiny-v{DEMO_VERSION}"
    if (folder / "config.json").exists():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-tiny-", dir=root))
    try:
        write_tiny_release(tmp, seed=0, fmt="bin")
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: use theirs
            if not (folder / "config.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def demo_image(width: int = 536, height: int = 354) -> Image.Image:
    """A small synthetic scene: sky, ground, a sun and a house."""
    img = Image.new("RGB", (width, height), (120, 170, 230))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, int(height * 0.65), width, height], fill=(70, 140, 60))
    draw.ellipse([int(width * 0.75), 20, int(width * 0.75) + 60, 80], fill=(250, 220, 60))
    x0, y0 = int(width * 0.2), int(height * 0.4)
    draw.rectangle([x0, y0, x0 + 140, y0 + 110], fill=(180, 60, 50))
    draw.polygon([(x0 - 10, y0), (x0 + 70, y0 - 60), (x0 + 150, y0)], fill=(90, 50, 40))
    return img


def demo_quantized(float_folder: Path) -> Path:
    """The int4 conversion of the demo checkpoint, made once beside it (``molmoe-lite quantize``'s code)."""
    import torch

    from molmoe_lite.quantize.convert import convert

    folder = float_folder.with_name(float_folder.name + "-int4")
    if not (folder / "config.json").exists():
        # the converter builds aside and renames when complete, so a half-written folder never shows
        convert(float_folder, folder, bits=4, group_size=64, dtype=torch.float32, progress=False, force=True)
    return folder
