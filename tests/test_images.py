"""load_image: every input kind and PIL mode -> RGB, EXIF, transparency, clear errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from molmoe_lite.images import ImageError, load_image


def rgb(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def noise(h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    shape = (h, w, c) if c else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def png_bytes(image: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **kw)
    return buf.getvalue()


# ---- modes ---------------------------------------------------------------------------

# mode -> (PIL image of that mode, expected RGB array). Expected values are written by
# hand from the mode's meaning, not from load_image.
def _mode_cases():
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    three = lambda a: np.repeat(a[..., None], 3, axis=2)  # noqa: E731
    cases = {
        "L": (Image.fromarray(gray, "L"), three(gray)),
        "1": (Image.fromarray(gray > 127), three(np.where(gray > 127, 255, 0).astype(np.uint8))),
        "P": (Image.fromarray(gray, "L").convert("P"), three(gray)),
        "CMYK": (Image.new("CMYK", (2, 2), (0, 0, 0, 0)), np.full((2, 2, 3), 255, np.uint8)),
        # 16-bit: full range mapped onto 0..255 (PIL alone would clip everything to 255)
        "I;16": (Image.fromarray(np.array([[0, 257 * 100], [65535, 257 * 7]], dtype=np.uint16)),
                 three(np.array([[0, 100], [255, 7]], np.uint8))),
        # 32-bit int with 8-bit values: kept as they are
        "I": (Image.fromarray(np.array([[0, 5], [255, 9]], dtype=np.int32)),
              three(np.array([[0, 5], [255, 9]], np.uint8))),
        # float in [0, 1]: x 255, rounded (0.25 -> 63.75 -> 64)
        "F": (Image.fromarray(np.array([[0.0, 0.25], [1.0, 0.5]], dtype=np.float32)),
              three(np.array([[0, 64], [255, 128]], np.uint8))),
    }
    # Opaque alpha modes must equal dropping the alpha.
    opaque = np.dstack([noise(2, 2), np.full((2, 2), 255, np.uint8)])
    cases["RGBA"] = (Image.fromarray(opaque, "RGBA"), opaque[..., :3])
    la = np.dstack([gray, np.full((2, 2), 255, np.uint8)])
    cases["LA"] = (Image.fromarray(la, "LA"), three(gray))
    cases["PA"] = (Image.fromarray(la, "LA").convert("PA"), three(gray))
    cases["RGBa"] = (Image.fromarray(opaque, "RGBA").convert("RGBa"), opaque[..., :3])
    cases["La"] = (Image.fromarray(la, "LA").convert("La"), three(gray))
    return cases


MODE_CASES = _mode_cases()


@pytest.mark.parametrize("mode", list(MODE_CASES), ids=list(MODE_CASES))
@pytest.mark.parametrize("transparent", ["composite", "drop"])
def test_every_mode_becomes_rgb(mode, transparent):
    image, expected = MODE_CASES[mode]
    assert image.mode == mode
    out = rgb(load_image(image, transparent=transparent))
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("mode", ["YCbCr", "HSV", "RGBX", "LAB", "I;16B"])
def test_other_modes_give_rgb_of_same_size(mode):
    image = Image.new(mode, (5, 3))
    out = load_image(image)
    assert out.mode == "RGB" and out.size == (5, 3)


# ---- transparency --------------------------------------------------------------------


def _sprite(value: int) -> Image.Image:
    """4x4 RGBA: opaque (value) in the top-left 2x2, half-transparent top-right, rest clear."""
    a = np.zeros((4, 4, 4), np.uint8)
    a[:, :, :3] = 37  # colour hidden under alpha 0; "drop" reveals it
    a[:2, :2] = (value, value, value, 255)
    a[:2, 2:] = (value, value, value, 128)
    return Image.fromarray(a, "RGBA")


@pytest.mark.parametrize(
    "value, background",
    [(0, 255), (30, 255), (230, 0), (255, 0)],
    ids=["black-on-clear->white", "dark->white", "light->black", "white-on-clear->black"],
)
def test_composite_picks_contrasting_background(value, background):
    out = rgb(load_image(_sprite(value)))
    np.testing.assert_array_equal(out[:2, :2], np.full((2, 2, 3), value))  # opaque kept
    np.testing.assert_array_equal(out[2:], np.full((2, 4, 3), background))  # clear -> background
    half = out[0, 2, 0].astype(int)  # alpha 128 of 255: about midway, +-1 for rounding
    assert abs(half - (value * 128 + background * 127) / 255) <= 1


def test_drop_keeps_release_behaviour():
    image = _sprite(0)
    np.testing.assert_array_equal(rgb(load_image(image, transparent="drop")), np.asarray(image.convert("RGB")))


def test_palette_with_transparency_index_is_composited():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 10, 10, 10] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # index 0 is see-through; visible content is dark (10)
    out = rgb(load_image(p))
    np.testing.assert_array_equal(out[0], [[255, 255, 255], [10, 10, 10]])


def test_fully_transparent_image_is_white():
    out = rgb(load_image(Image.new("RGBA", (3, 3), (0, 0, 0, 0))))
    assert (out == 255).all()


def test_bad_transparent_option():
    with pytest.raises(ValueError, match="transparent"):
        load_image(Image.new("RGB", (2, 2)), transparent="blend")


# ---- EXIF ----------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", [1, 3, 6, 8], ids=["upright", "rot180", "rot90cw", "rot90ccw"])
def test_exif_orientation_is_applied(orientation, tmp_path):
    src = Image.fromarray(noise(2, 4), "RGB")  # 4 wide, 2 tall, distinct pixels
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.png"
    src.save(path, exif=exif)
    # What a viewer shows, from the EXIF spec's meaning of each orientation value.
    expected = {
        1: src,
        3: src.transpose(Image.Transpose.ROTATE_180),
        6: src.transpose(Image.Transpose.ROTATE_270),  # rotate 90 degrees clockwise
        8: src.transpose(Image.Transpose.ROTATE_90),
    }[orientation]
    np.testing.assert_array_equal(rgb(load_image(path)), np.asarray(expected))


# ---- arrays and tensors --------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(5, 7, 3), (5, 7), (5, 7, 1), (5, 7, 4), (1, 1, 3), (50, 10000, 3)],
    ids=["HxWx3", "HxW", "HxWx1", "HxWx4-opaque", "1x1", "10000x50"],
)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_arrays(shape, kind):
    a = noise(*shape[:2], c=shape[2] if len(shape) == 3 else 0)
    if len(shape) == 3 and shape[2] == 4:
        a[..., 3] = 255
    x = torch.from_numpy(a) if kind == "torch" else a
    out = rgb(load_image(x))
    assert out.shape == (shape[0], shape[1], 3)
    gray = a if a.ndim == 2 else a[..., 0] if a.shape[2] == 1 else None
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, 2) if gray is not None else a[..., :3])


@pytest.mark.parametrize(
    "x, message",
    [
        (np.zeros((4, 4, 3), np.float32), "uint8"),
        (torch.zeros(3, 8, 8, dtype=torch.uint8), "channels first"),
        (np.zeros((0, 4, 3), np.uint8), "empty"),
        (np.zeros((4,), np.uint8), "expected HxW"),
        (np.zeros((4, 4, 2), np.uint8), "expected HxW"),
        ("not a path that exists.png", "no such file"),
        (12345, "not an image input"),
        ("https://example.com/cat.jpg", r"^https://example.com/cat.jpg: a web address; .* download it first$"),
        ("HTTP://example.com/cat.jpg", "a web address"),
    ],
    ids=["float-array", "CHW-tensor", "empty-array", "1-d", "2-channels", "missing-file", "int", "https-url",
         "upper-case-url"],
)
def test_bad_inputs_raise_image_error(x, message):
    with pytest.raises(ImageError, match=message):
        load_image(x)


# ---- files ---------------------------------------------------------------------------


def test_file_path_and_bytes(tmp_path):
    src = Image.fromarray(noise(6, 9), "RGB")
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(src))
    for x in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes())):
        np.testing.assert_array_equal(rgb(load_image(x)), np.asarray(src))


def _truncated(tmp_path, fmt):
    buf = io.BytesIO()
    Image.fromarray(noise(64, 64), "RGB").save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: _truncated(d, "PNG"), "truncated or corrupt"),
        (lambda d: _truncated(d, "JPEG"), "truncated or corrupt"),
        (lambda d: (d / "notes.png").write_text("hello, not an image") and d / "notes.png", "not an image"),
        (lambda d: (d / "empty.jpg").write_bytes(b"") or d / "empty.jpg", "empty"),
        (lambda d: d, "folder"),
    ],
    ids=["truncated-png", "truncated-jpeg", "text-file", "empty-file", "directory"],
)
def test_bad_files_name_the_path(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(ImageError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_lazily_opened_truncated_pil_image(tmp_path):
    path = _truncated(tmp_path, "PNG")
    with pytest.raises(ImageError, match="truncated") as info:
        load_image(Image.open(path))
    assert str(path) in str(info.value)


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(Image.new("RGB", (100, 100))))
    # PIL refuses images over twice MAX_IMAGE_PIXELS; shrink the limit rather than the disk.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="decompression-bomb") as info:
        load_image(path)
    assert str(path) in str(info.value)
