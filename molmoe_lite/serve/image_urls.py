"""Turn the image URL of a request into a PIL image, refusing what the server must not read.

Accepted: ``data:image/...;base64,...`` URLs (what OpenAI's clients send for local
images), and local files (``file://`` URLs or plain paths) only when the server was
started with ``--allow-files DIR`` and only inside DIR (symlinks resolved first, so a
link cannot lead out of it). Remote ``http(s)`` URLs are refused: the server fetches
nothing from the network. Only common formats are opened (``IMAGE_FORMATS``). Before an
image is decoded, its header's size is checked against the limits below, so an oversized
image costs no memory; then it is decoded fully (truncated data shows up here) through
``molmoe_lite.images.load_image``.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from PIL import Image, UnidentifiedImageError

from molmoe_lite.images import ImageError, load_image
from molmoe_lite.serve.errors import bad_request

# One 14-px patch of the vision encoder: a smaller side holds nothing for the model to see.
MIN_SIDE_PX = 14
# The 336-px global view keeps at least one 14-px patch of the short side up to 24:1.
MAX_ASPECT = 24.0
# What clients send. PIL reads dozens more, some through decoders rarely exercised and EPS
# through Ghostscript; a server reading strangers' bytes opens only these.
IMAGE_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = 40_000_000
    allow_files: Path | None = None  # resolved folder, or None: no local files


def read_image(url: str, limits: ImageLimits, param: str) -> Image.Image:
    """The RGB image behind ``url``, or a 400 ``APIError`` naming the problem."""
    scheme = url.split(":", 1)[0].lower() if ":" in url[:12] else ""
    if scheme == "data":
        data, source = _data_url_bytes(url, param), "the data URL's image"
    elif scheme in ("http", "https"):
        raise bad_request(
            "remote image URLs are not fetched (the server reads nothing from the network); "
            "send the image as a data URL: data:image/png;base64,...",
            param=param, code="remote_url_refused",
        )
    elif scheme in ("file", "") or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):
        path = _allowed_path(url, limits, param)
        try:
            data, source = path.read_bytes(), str(path)
        except OSError as exc:  # no permission, or removed since it was checked
            raise bad_request(f"{path}: cannot be read: {exc.strerror}", param=param, code="invalid_image") from None
    else:
        raise bad_request(f"image URL scheme {scheme!r} is not supported; send a data URL", param=param)
    return decode_image(data, source, limits, param)


def _data_url_bytes(url: str, param: str) -> bytes:
    head, sep, payload = url.partition(",")
    if not sep:
        raise bad_request("the data URL has no ',' before its data", param=param, code="invalid_image")
    # data:image/png[;name=value...];base64 (parameters such as a file name may come between)
    mime, *params = head[len("data:"):].split(";")
    if not mime.lower().startswith("image/"):
        raise bad_request(f"the data URL's type is {mime or 'missing'!r}, not an image type (image/png, image/jpeg...)",
                          param=param, code="invalid_image")
    if not params or params[-1].strip().lower() != "base64":
        raise bad_request("the data URL must be base64-encoded (data:image/png;base64,...)", param=param,
                          code="invalid_image")
    try:
        return base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise bad_request(f"the data URL's base64 is invalid or truncated: {exc}", param=param,
                          code="invalid_image") from None


def _allowed_path(url: str, limits: ImageLimits, param: str) -> Path:
    if limits.allow_files is None:
        raise bad_request("local image files are read only when the server runs with --allow-files DIR; "
                          "send the image as a data URL", param=param, code="files_not_allowed")
    raw = unquote(urlparse(url).path) if url.lower().startswith("file:") else url
    root = limits.allow_files
    try:
        path = (root / raw).resolve()  # an absolute raw path replaces root
        inside = path.is_relative_to(root)
        found = inside and path.is_file()
    # names the file system refuses: a NUL byte, a name too long, a symlink loop (RuntimeError
    # before Python 3.13), characters it cannot encode
    except (OSError, ValueError, RuntimeError) as exc:
        raise bad_request(f"{raw!r}: not a readable file name: {exc}", param=param, code="invalid_image") from None
    if not inside:
        raise bad_request(f"{raw}: outside the folder the server may read (--allow-files)", param=param,
                          code="files_not_allowed")
    if not found:
        raise bad_request(f"{raw}: no such file in the allowed folder", param=param, code="invalid_image")
    return path


def decode_image(data: bytes, source: str, limits: ImageLimits, param: str) -> Image.Image:
    """Bytes -> RGB image, with size limits checked from the header before decoding."""
    if not data:
        raise bad_request(f"{source}: empty (0 bytes)", param=param, code="invalid_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise bad_request(f"{source}: too large (over {limits.max_pixels} pixels)", param=param,
                          code="image_too_large") from None
    except UnidentifiedImageError:
        raise bad_request(f"{source}: not an image in a format the server reads ({', '.join(IMAGE_FORMATS)}), "
                          "or corrupt", param=param, code="invalid_image") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise bad_request(f"{source}: not a readable image: {exc}", param=param, code="invalid_image") from None
    w, h = image.size
    if w * h > limits.max_pixels:
        raise bad_request(f"{source}: {w}x{h} is too large (over {limits.max_pixels} pixels)", param=param,
                          code="image_too_large")
    if min(w, h) < MIN_SIDE_PX:
        raise bad_request(f"{source}: {w}x{h} is too small (each side needs at least {MIN_SIDE_PX} pixels)",
                          param=param, code="image_too_small")
    if max(w, h) / min(w, h) > MAX_ASPECT:
        raise bad_request(f"{source}: {w}x{h} is too elongated (aspect ratio over {MAX_ASPECT:g}:1)",
                          param=param, code="invalid_image_shape")
    try:
        return load_image(image)
    except ImageError as exc:
        raise bad_request(str(exc), param=param, code="invalid_image") from None
