"""Turn whatever the user hands us into one RGB ``PIL.Image``.

The release's processor calls ``convert("RGB")`` and nothing else, which has three
weak spots this module fixes while keeping that path available:

* EXIF orientation: phone photos are stored sideways with a rotation tag; we apply it
  (``ImageOps.exif_transpose``) so the model sees what the user sees.
* Transparency: ``convert("RGB")`` drops alpha, so whatever colour hides under
  transparent pixels (often black) becomes visible; black line art on a transparent
  background then turns into a black square. By default we composite onto a
  background that contrasts with the visible content (dark content -> white, light
  content -> black), as the model card suggests. ``transparent="drop"`` keeps the
  release's behaviour.
* High bit depth: PIL clips 16-bit and float images to 0..255 when converting, so a
  16-bit scan comes out nearly white; we rescale those to 8 bits first.

Inputs: a ``PIL.Image``, a file path (``str`` / ``Path``), raw ``bytes`` or a binary
file object, or a uint8 array / tensor shaped HxW, HxWx1, HxWx3 or HxWx4 (a web address is
refused with a line saying to download it: nothing is fetched). Every
failure is an ``ImageError`` (a ``ValueError``) that names the source and the problem.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from molmoe_lite.errors import MolmoeLiteError, UsageError

TRANSPARENT_MODES = ("composite", "drop")

# ITU-R 601 luma, the weights PIL uses for "L"; brightness of the visible content.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


class ImageError(MolmoeLiteError, ValueError):
    """An input that cannot be turned into an RGB image (names the source and the problem)."""


def is_web_address(x: str) -> bool:
    """Whether ``x`` is an http(s) address, which ``load_image`` refuses (it reads local files)."""
    return x.lower().startswith(("http://", "https://"))


def load_image(x: Any, transparent: str = "composite") -> Image.Image:
    """Return ``x`` as an RGB ``PIL.Image`` (see the module docstring for the accepted inputs).

    ``transparent``: ``"composite"`` (default) puts transparent content on a contrasting
    background; ``"drop"`` discards alpha like the release (``convert("RGB")``).
    """
    if transparent not in TRANSPARENT_MODES:
        raise UsageError(f"transparent={transparent!r}: expected one of {TRANSPARENT_MODES}")
    if isinstance(x, Image.Image):
        image, source = x, f"PIL image ({x.mode}, {x.size[0]}x{x.size[1]})"
        try:  # an Image.open()ed image decodes lazily: surface truncation here
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            where = getattr(image, "filename", "") or source
            raise ImageError(f"{where}: image data is truncated or corrupt: {exc}") from exc
    elif isinstance(x, str) and is_web_address(x):
        raise ImageError(f"{x}: a web address; images are read from local files only: download it first")
    elif isinstance(x, (str, Path)):
        image, source = _open_file(Path(x)), str(x)
    elif isinstance(x, (bytes, bytearray)) or hasattr(x, "read"):
        source = "image bytes" if isinstance(x, (bytes, bytearray)) else f"file object {x!r}"
        data = io.BytesIO(bytes(x)) if isinstance(x, (bytes, bytearray)) else x
        image = _decode(data, source)
    else:
        image, source = _from_array(x), f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}"
    if image.width < 1 or image.height < 1:
        raise ImageError(f"{source}: image is empty ({image.width}x{image.height} pixels)")
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # a malformed EXIF block must not cost the user the image
        warnings.warn(f"{source}: ignoring unreadable EXIF orientation ({exc})", stacklevel=2)
    try:
        return _to_rgb(image, transparent)
    except (ValueError, OSError) as exc:
        raise ImageError(f"{source}: cannot convert mode {image.mode!r} to RGB: {exc}") from exc


# ---- sources -------------------------------------------------------------------------


def _open_file(path: Path) -> Image.Image:
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if path.is_dir():
        raise ImageError(f"{path}: is a folder, not an image file")
    if path.stat().st_size == 0:
        raise ImageError(f"{path}: file is empty (0 bytes)")
    try:
        with open(path, "rb") as f:
            return _decode(f, str(path))
    except OSError as exc:  # open() itself: permissions, I/O errors
        raise ImageError(f"{path}: cannot read file: {exc}") from exc


def _decode(stream: Any, source: str) -> Image.Image:
    """Open and fully decode (``load``) so truncation shows up here, not in the model."""
    try:
        image = Image.open(stream)
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageError(
            f"{source}: too large for PIL's decompression-bomb guard ({exc}); "
            "raise PIL.Image.MAX_IMAGE_PIXELS if you trust this file"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{source}: not an image PIL can read (unknown or corrupt format)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        # PIL reports truncated data as OSError ("image file is truncated ...").
        raise ImageError(f"{source}: image data is truncated or corrupt: {exc}") from exc
    return image


def _from_array(x: Any) -> Image.Image:
    """A uint8 HxW / HxWxC (C in 1, 3, 4) numpy array or torch tensor -> PIL image."""
    kind = type(x).__name__
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor without importing torch
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise ImageError(
            f"{kind}: not an image input (expected a PIL image, a file path, bytes, "
            "or a uint8 HxWx3 array / tensor)"
        )
    if x.dtype != np.uint8:
        raise ImageError(
            f"{kind} {x.shape} of dtype {x.dtype}: expected uint8 pixels in 0..255 "
            "(convert with (x * 255).round().astype(np.uint8) for floats in [0, 1])"
        )
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[:, :, 0]
    if not (x.ndim == 2 or (x.ndim == 3 and x.shape[2] in (3, 4))):
        hint = " (channels first? use x.permute(1, 2, 0))" if x.ndim == 3 and x.shape[0] in (1, 3, 4) else ""
        raise ImageError(f"{kind} {x.shape}: expected HxW, HxWx1, HxWx3 or HxWx4{hint}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ImageError(f"{kind} {x.shape}: image is empty")
    mode = {2: "L", 3: "RGB", 4: "RGBA"}[x.ndim if x.ndim == 2 else x.shape[2]]
    return Image.fromarray(np.ascontiguousarray(x), mode=mode)


# ---- modes ---------------------------------------------------------------------------


def _to_rgb(image: Image.Image, transparent: str) -> Image.Image:
    image = _to_8bit(image)
    if image.mode in ("La", "RGBa"):  # premultiplied alpha: PIL converts these only to LA / RGBA
        image = image.convert(image.mode[:-1] + "A")
    if transparent == "drop" or not _has_alpha(image):
        return image if image.mode == "RGB" else image.convert("RGB")
    rgba = np.asarray(image.convert("RGBA"))
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # alpha channel present but fully opaque: same as dropping it
        return Image.fromarray(np.ascontiguousarray(rgba[..., :3]), mode="RGB")
    weight = alpha.astype(np.float64)
    total = weight.sum()
    # Fully transparent images have no visible content; white is as good a guess as any.
    brightness = (rgba[..., :3] @ _LUMA * weight).sum() / total if total > 0 else 0.0
    background = (255, 255, 255, 255) if brightness < 127.5 else (0, 0, 0, 255)
    base = Image.new("RGBA", image.size, background)
    return Image.alpha_composite(base, Image.fromarray(rgba, mode="RGBA")).convert("RGB")


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit int and float images -> "L" with their range mapped onto 0..255.

    PIL's own conversion clips these to 0..255 instead of scaling them.
    """
    mode = image.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return image
    a = np.asarray(image).astype(np.float64)
    finite = a[np.isfinite(a)]
    top = float(finite.max()) if finite.size else 0.0
    if mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    elif mode == "F" and top <= 1.0:
        scale = 255.0  # float images are usually in [0, 1]
    elif top <= 255.0:
        scale = 1.0
    elif top <= 65535.0:
        scale = 255.0 / 65535.0  # 16-bit data that PIL opened as 32-bit "I"
    else:
        scale = 255.0 / top
    a = np.nan_to_num(a * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), mode="L")
