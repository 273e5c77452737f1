"""Processor: tiling, resize-and-pad, crops, token layout, image_input_idx, masks, batching.

Expected numbers come from the architecture doc (MolmoE-1B-0924's preprocessing) or are
derived by hand in the test from the rule they check, never from the code under test.
Image sizes are written W x H as in the doc; tilings as (rows, cols).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from molmoe_lite.processor import (
    CLIP_MEAN,
    CLIP_STD,
    PreprocessorConfig,
    Processor,
    ProcessorConfigError,
    collate,
    scaled_size,
    select_tiling,
)
from molmoe_lite.testing import write_tiny_tokenizer
from molmoe_lite.tokenizer import TokenizerError, load_tokenizer

REAL = Path("/work/shared/molmoe-1b-0924")
PROMPT = "Describe this image."
PROMPT_IDS = [11447, 27, 3666, 19268, 436, 2460, 15, 17762, 27]  # " User: Describe this image. Assistant:"


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tok"))


@pytest.fixture(scope="session")
def tiny(tiny_folder) -> Processor:
    return Processor.from_pretrained(tiny_folder)


@pytest.fixture(scope="session")
def real() -> Processor:
    if not (REAL / "tokenizer.json").is_file():
        pytest.skip(f"{REAL} not present")
    return Processor.from_pretrained(REAL)


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def ids_of(proc: Processor, token: str) -> int:
    return proc.tokenizer.convert_tokens_to_ids(token)


# ---- tiling --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "w, h, tiling",
    [
        (37, 41, (1, 1)),  # both sides below the margins: negative scales, least negative wins
        (100, 800, (1, 1)),  # one side below the margins: every scale negative
        (3000, 100, (1, 1)),
        (3000, 200, (1, 12)),  # downscale forced everywhere: widest strip downscales least
        (536, 354, (2, 2)),
        (1920, 1080, (3, 4)),
        (336, 336, (1, 1)),  # 224 + 112 fits one tile at scale exactly 1
        (337, 336, (1, 2)),  # one pixel more: (1, 1) needs 224/225 < 1, (1, 2) has min scale 1
        (448, 448, (2, 2)),  # (2, 2), (2, 3), (3, 2) all give 4/3: the first in order wins
    ],
    ids=["37x41", "100x800", "3000x100", "3000x200", "536x354", "1920x1080", "336x336", "337x336", "448x448-tie"],
)
def test_select_tiling(w, h, tiling):
    assert select_tiling(h - 112, w - 112, 224, 12) == tiling


@pytest.mark.parametrize(
    "args, expected",
    [
        ((1080, 1920, 784, 1008), (567, 1007)),  # doc: float32 1920 * 0.525 = 1007.99994 -> 1007
        ((354, 536, 336, 336), (221, 336)),  # 354 * 0.6268657 = 221.91 -> 221
        ((336, 336, 336, 336), (336, 336)),
        ((1, 1, 336, 336), (336, 336)),
    ],
    ids=["1920x1080-hires", "536x354-global", "same-size", "1x1"],
)
def test_scaled_size(args, expected):
    assert scaled_size(*args) == expected


# ---- pixels --------------------------------------------------------------------------


def _normalise(pixels_hw3: np.ndarray) -> torch.Tensor:
    """The doc's formula, float32: (x / 255 - mean) / std."""
    x = torch.from_numpy(pixels_hw3.astype(np.float32)) / 255
    return (x - torch.tensor(CLIP_MEAN, dtype=torch.float32)) / torch.tensor(CLIP_STD, dtype=torch.float32)


def _patches(x: torch.Tensor, p: int = 14) -> torch.Tensor:
    """[H, W, 3] -> [(H/p)*(W/p), p*p*3]: element (dh*p + dw)*3 + ch of patch r*(W/p) + c is
    pixel (r*p + dh, c*p + dw, ch), gathered with explicit index arrays."""
    h, w, _ = x.shape
    r, c, dh, dw, ch = np.meshgrid(np.arange(h // p), np.arange(w // p), np.arange(p), np.arange(p), np.arange(3),
                                   indexing="ij")
    rows, cols = torch.from_numpy(r * p + dh).reshape(-1), torch.from_numpy(c * p + dw).reshape(-1)
    return x[rows, cols, torch.from_numpy(ch).reshape(-1)].reshape((h // p) * (w // p), p * p * 3)


def test_crops_are_exact_windows_when_no_resize_is_needed(tiny):
    # 560 x 560 = canvas of the 2x2 tiling: no resize, no padding; crops are the source's
    # 336-px windows at stride 224 and the global view is a 336x336 resize.
    pixels = np.asarray(image(560, 560, seed=1))
    out = tiny.process(Image.fromarray(pixels), PROMPT)
    full = _normalise(pixels)
    assert out["images"].shape == (5, 576, 588)
    for k, (y, x) in enumerate([(0, 0), (0, 224), (224, 0), (224, 224)]):
        torch.testing.assert_close(out["images"][1 + k], _patches(full[y : y + 336, x : x + 336]), rtol=0, atol=0)


def test_global_view_at_base_size_is_exact(tiny):
    pixels = np.asarray(image(336, 336, seed=2))
    out = tiny.process(Image.fromarray(pixels), PROMPT)
    want = _patches(_normalise(pixels))
    torch.testing.assert_close(out["images"][0], want, rtol=0, atol=0)
    torch.testing.assert_close(out["images"][1], want, rtol=0, atol=0)  # 1x1 tiling, no resize either


def test_padding_is_normalised_zero_and_constant_survives_resize(tiny):
    # 536x354 -> global view 336 x 221 centred: top pad (336 - 221) // 2 = 57 rows.
    px = np.full((354, 536, 3), (200, 100, 50), np.uint8)
    g = tiny.process(Image.fromarray(px), PROMPT)["images"][0].reshape(24, 24, 14, 14, 3)
    g = g.permute(0, 2, 1, 3, 4).reshape(336, 336, 3)
    pad = (0 - torch.tensor(CLIP_MEAN, dtype=torch.float32)) / torch.tensor(CLIP_STD, dtype=torch.float32)
    torch.testing.assert_close(g[:57], pad.expand(57, 336, 3), rtol=0, atol=0)
    torch.testing.assert_close(g[57 + 221 :], pad.expand(336 - 278, 336, 3), rtol=0, atol=0)
    # A constant image stays constant through the antialiased resize (weights sum to 1).
    inside = _normalise(np.array([[[200, 100, 50]]], np.uint8))[0, 0]
    torch.testing.assert_close(g[57:278], inside.expand(221, 336, 3), rtol=0, atol=2e-6)


# ---- masks ---------------------------------------------------------------------------


def _expected_crop_masks(w: int, h: int, tiling) -> torch.Tensor:
    """Pixel-level mask of the resized image in the canvas, averaged per patch (float32)."""
    ch, cw = tiling[0] * 224 + 112, tiling[1] * 224 + 112
    f32 = np.float32
    scale = min(f32(ch) / f32(h), f32(cw) / f32(w))
    nh, nw = int(f32(h) * scale), int(f32(w) * scale)
    m = np.zeros((ch, cw), np.float32)
    m[(ch - nh) // 2 : (ch - nh) // 2 + nh, (cw - nw) // 2 : (cw - nw) // 2 + nw] = 1
    rows = []
    for i in range(tiling[0]):
        for j in range(tiling[1]):
            crop = m[i * 224 : i * 224 + 336, j * 224 : j * 224 + 336]
            rows.append(crop.reshape(24, 14, 24, 14).transpose(0, 2, 1, 3).reshape(576, 196).mean(-1))
    return torch.from_numpy(np.stack(rows))


@pytest.mark.parametrize("w, h, tiling", [(536, 354, (2, 2)), (1920, 1080, (3, 4)), (37, 41, (1, 1))],
                         ids=["536x354", "1920x1080", "37x41"])
def test_mask_quirk(tiny, w, h, tiling):
    masks = tiny.process(image(w, h), PROMPT)["image_masks"]
    n = tiling[0] * tiling[1]
    want = _expected_crop_masks(w, h, tiling)
    assert masks.shape == (n + 1, 576) and masks.dtype == torch.float32
    # Row k pairs with images[k]: global <- crop 0's mask, crop k <- crop k+1's, last <- -1.
    torch.testing.assert_close(masks[:n], want, rtol=0, atol=0)
    assert (masks[n] == -1).all()
    assert not (masks[:n] == -1).any()


def test_truncation_shows_in_the_mask(tiny):
    # 1920x1080 fills 1007 of the 1008 canvas columns: left pad 0, right pad 1 pixel, so
    # the last patch column of the last crop column is 13/14 real on fully real rows.
    masks = tiny.process(image(1920, 1080), PROMPT)["image_masks"]
    last_col_crop = masks[3].reshape(24, 24)  # crop (0, 3)
    assert torch.isclose(last_col_crop[12, 23], torch.tensor(13 / 14)).item()
    assert (last_col_crop[12, :23] == 1).all()


# ---- tokens and image_input_idx ------------------------------------------------------


@pytest.mark.parametrize(
    "w, h, n_image_tokens, tiling",
    [(536, 354, 580, (2, 2)), (1920, 1080, 1196, (3, 4)), (200, 3000, 1460, (12, 1)),
     (3000, 200, 1372, (1, 12)), (1, 1, 316, (1, 1)), (10000, 50, 316, (1, 1))],
    ids=["536x354", "1920x1080", "200x3000-max", "3000x200", "1x1", "10000x50"],
)
def test_token_layout(tiny, w, h, n_image_tokens, tiling):
    out = tiny.process(image(w, h), PROMPT)
    ids = out["input_ids"]
    prompt = tiny.prompt_ids(PROMPT)
    assert ids.dtype == torch.long and ids[0] == tiny.bos_id
    assert ids[-len(prompt) :].tolist() == prompt
    assert len(ids) == 1 + n_image_tokens + len(prompt)
    n = tiling[0] * tiling[1]
    assert out["images"].shape == (1 + n, 576, 588) and out["images"].dtype == torch.float32
    assert out["image_input_idx"].shape == (1 + n, 144) and out["image_input_idx"].dtype == torch.long

    start, end, patch, col = (ids_of(tiny, t) for t in ("<im_start>", "<im_end>", "<im_patch>", "<im_col>"))
    R, C = 8 * tiling[0] + 4, 8 * tiling[1] + 4
    glob = [start] + ([patch] * 12 + [col]) * 12 + [end]
    hires = [start] + ([patch] * C + [col]) * R + [end]
    assert ids[1 : 1 + n_image_tokens].tolist() == glob + hires


def _kept(n_tiles: int, t: int) -> range:
    """Doc: one tile keeps 0..11; first 0..9, middle 2..9, last 2..11."""
    if n_tiles == 1:
        return range(0, 12)
    return range(0, 10) if t == 0 else range(2, 12) if t == n_tiles - 1 else range(2, 10)


@pytest.mark.parametrize("w, h, tiling",
                         [(536, 354, (2, 2)), (1920, 1080, (3, 4)), (3000, 200, (1, 12)), (50, 50, (1, 1))],
                         ids=["2x2", "3x4", "1x12", "1x1"])
def test_image_input_idx(tiny, w, h, tiling):
    out = tiny.process(image(w, h), PROMPT)
    ids, idx = out["input_ids"], out["image_input_idx"]
    patch = ids_of(tiny, "<im_patch>")
    valid = idx[idx >= 0]
    # Only <im_patch> positions, each exactly once, and every <im_patch> is covered.
    assert (ids[valid] == patch).all()
    assert sorted(valid.tolist()) == torch.nonzero(ids == patch).flatten().tolist()
    assert set(idx[idx < 0].tolist()) <= {-100}
    # Global view: row-major after BOS (0) and <im_start> (1), 13 tokens per row.
    assert idx[0].tolist() == [2 + r * 13 + c for r in range(12) for c in range(12)]
    # Hi-res (doc): kept cell (r, c) of crop (ci, cj) sits at grid cell (8 ci + r, 8 cj + c).
    C = 8 * tiling[1] + 4
    hires0 = 1 + 158 + 1  # BOS, global block, <im_start>
    for ci in range(tiling[0]):
        for cj in range(tiling[1]):
            cell = idx[1 + ci * tiling[1] + cj].reshape(12, 12)
            kr, kc = _kept(tiling[0], ci), _kept(tiling[1], cj)
            for r in range(12):
                for c in range(12):
                    if r in kr and c in kc:
                        want = hires0 + (8 * ci + r) * (C + 1) + (8 * cj + c)
                        assert cell[r, c] == want, (ci, cj, r, c)
                    else:
                        assert cell[r, c] == -100, (ci, cj, r, c)


def test_real_tokenizer_prompt_and_590_tokens(real):
    assert real.prompt_ids(PROMPT) == PROMPT_IDS
    out = real.process(image(536, 354), PROMPT)
    assert len(out["input_ids"]) == 590
    assert out["input_ids"][0] == 50279 and out["input_ids"][1] == 50280
    assert out["input_ids"][-9:].tolist() == PROMPT_IDS
    assert (out["input_ids"][out["image_input_idx"][out["image_input_idx"] >= 0]] == 50282).all()
    assert real.config.max_crops == 12 and real.config.overlap_margins == (4, 4)


def test_text_only(tiny):
    out = tiny.process(None, PROMPT)
    assert out["input_ids"].tolist() == [tiny.bos_id] + tiny.prompt_ids(PROMPT)
    assert out["images"].shape == (0, 576, 588)
    assert out["image_input_idx"].shape == (0, 144)
    assert out["image_masks"].shape == (0, 576)
    assert tiny.decode(out["input_ids"]) == " User: Describe this image. Assistant:"


def test_several_images(tiny):
    a, b = image(536, 354, seed=3), image(50, 50, seed=4)
    both = tiny.process([a, b], PROMPT)
    one_a, one_b = tiny.process(a, PROMPT), tiny.process(b, PROMPT)
    la, lb = len(one_a["input_ids"]) - 10, len(one_b["input_ids"]) - 10  # minus BOS and prompt (9)
    assert len(tiny.prompt_ids(PROMPT)) == 9
    ids = both["input_ids"]
    assert ids[: 1 + la].tolist() == one_a["input_ids"][: 1 + la].tolist()
    assert ids[1 + la : 1 + la + lb].tolist() == one_b["input_ids"][1 : 1 + lb].tolist()
    torch.testing.assert_close(both["images"], torch.cat([one_a["images"], one_b["images"]]), rtol=0, atol=0)
    masks = torch.cat([one_a["image_masks"], one_b["image_masks"]])
    torch.testing.assert_close(both["image_masks"], masks, rtol=0, atol=0)
    # Image b's indices point into its own block: shifted by image a's token count.
    idx_b = both["image_input_idx"][5:]
    want = torch.where(one_b["image_input_idx"] >= 0, one_b["image_input_idx"] + la, one_b["image_input_idx"])
    assert torch.equal(idx_b, want)
    assert (ids[both["image_input_idx"][both["image_input_idx"] >= 0]] == ids_of(tiny, "<im_patch>")).all()


def test_transparent_option_reaches_the_pixels(tiny):
    a = np.zeros((40, 40, 4), np.uint8)
    a[10:30, 10:30] = (0, 0, 0, 255)  # black square on a clear background
    rgba = Image.fromarray(a, "RGBA")
    comp = tiny.process(rgba, PROMPT)["images"]
    drop = tiny.process(rgba, PROMPT, transparent="drop")["images"]
    white = _normalise(np.array([[[255, 255, 255]]], np.uint8))[0, 0]
    assert not torch.equal(comp, drop)
    # Global view corner (inside the resized image, outside the square) is white with composite.
    corner = comp[0, 0, :3]  # patch 0, pixel (0, 0), channels r, g, b
    torch.testing.assert_close(corner, white, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "F", "1"])
def test_modes_process(tiny, mode):
    out = tiny.process(Image.new(mode, (30, 20)), PROMPT)
    assert out["images"].shape == (2, 576, 588) and torch.isfinite(out["images"]).all()


def test_bad_image_gives_image_error(tiny, tmp_path):
    from molmoe_lite.images import ImageError

    bad = tmp_path / "x.jpg"
    bad.write_text("not an image")
    with pytest.raises(ImageError, match="x.jpg"):
        tiny.process(bad, PROMPT)


@pytest.mark.parametrize("w, h", [(337, 1), (1, 337), (2, 1000), (20000, 30)],
                         ids=["wide-1px", "tall-1px", "tall-2px", "panorama"])
def test_too_elongated_image_gives_image_error(tiny, tmp_path, w, h):
    # the short side would resize to 0 pixels in the 336-px global view
    from molmoe_lite.images import ImageError

    path = tmp_path / "strip.png"
    Image.new("RGB", (w, h)).save(path)
    with pytest.raises(ImageError, match=rf"strip.png: {w}x{h} pixels is too elongated"):
        tiny.process(path, PROMPT)


@pytest.mark.parametrize("source", ["./missing.png", "https://example.com/cat.jpg"], ids=["dot-slash", "url"])
def test_an_image_error_names_its_file_once(tiny, source):
    from molmoe_lite.images import ImageError

    with pytest.raises(ImageError) as info:
        tiny.process(source, PROMPT)
    assert str(info.value).count("missing.png" if "missing" in source else "example.com") == 1, str(info.value)


@pytest.mark.parametrize("w, h", [(336, 1), (1, 336), (1, 1), (4000, 12)],
                         ids=["wide-limit", "tall-limit", "one-pixel", "wide-12px"])
def test_thin_images_at_the_limit_still_process(tiny, w, h):
    out = tiny.process(Image.new("RGB", (w, h)), PROMPT)
    assert torch.isfinite(out["images"]).all()


# ---- batching ------------------------------------------------------------------------


def test_collate_pads_with_minus_one(tiny):
    items = [
        tiny.process(image(536, 354), PROMPT),
        tiny.process(None, "Hi"),  # text-only: no crops at all
        tiny.process(image(40, 40), "Hello there"),
    ]
    batch = collate(items)
    assert set(batch) == {"input_ids", "images", "image_input_idx", "image_masks"}
    L = max(len(i["input_ids"]) for i in items)
    assert batch["input_ids"].shape == (3, L) and batch["images"].shape == (3, 5, 576, 588)
    assert batch["image_input_idx"].shape == (3, 5, 144) and batch["image_masks"].shape == (3, 5, 576)
    for b, item in enumerate(items):
        for key, t in item.items():
            got = batch[key][b]
            assert torch.equal(got[: t.shape[0]], t), key
            assert (got[t.shape[0] :] == -1).all(), key  # right padding, every key with -1
            assert got.dtype == t.dtype
    assert tiny.decode(batch["input_ids"][1]) == " User: Hi Assistant:"  # -1 ignored
    with pytest.raises(ValueError, match="keys"):
        collate([items[0], {"input_ids": items[1]["input_ids"]}])


# ---- config and tokenizer ------------------------------------------------------------


def test_preprocessor_config_roundtrip_and_errors(tmp_path):
    cfg = PreprocessorConfig(max_crops=6)
    cfg.save(tmp_path)
    back = PreprocessorConfig.from_pretrained(tmp_path)
    assert back == cfg and back.tokens_per_crop == 144 and back.patch_dim == 588
    assert PreprocessorConfig.from_pretrained(tmp_path / "nothing") == PreprocessorConfig()
    with pytest.raises(ProcessorConfigError, match="image_token_length"):
        PreprocessorConfig(image_token_length_h=10)
    with pytest.raises(ProcessorConfigError, match="overlap_margins"):
        PreprocessorConfig(overlap_margins=(3, 4))
    (tmp_path / "preprocessor_config.json").write_text("{oops")
    with pytest.raises(ProcessorConfigError, match="preprocessor_config.json"):
        PreprocessorConfig.from_pretrained(tmp_path)


def test_config_json_geometry_is_used_without_preprocessor_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_crops": 4, "overlap_margins": [2, 2],
                                                      "vision_backbone": {"image_patch_size": 14}}))
    cfg = PreprocessorConfig.from_pretrained(tmp_path)
    assert cfg.max_crops == 4 and cfg.overlap_margins == (2, 2) and cfg.window_px == 20 * 14


def test_max_crops_from_config_limits_tiling(tiny_folder):
    # 1920x1080 with at most 4 crops: every candidate downscales; (2, 2) has min scale
    # min(448/968, 448/1808) = 0.248, (1, 4) min(224/968, 896/1808) = 0.231: (2, 2) wins.
    proc = Processor(load_tokenizer(tiny_folder), PreprocessorConfig(max_crops=4))
    out = proc.process(image(1920, 1080), PROMPT)
    assert out["images"].shape[0] == 1 + 4
    assert len(out["input_ids"]) == 1 + 158 + 2 + 20 * 21 + 9  # 20 x 20 hi-res grid


def test_tiny_tokenizer(tiny_folder, tmp_path):
    again = write_tiny_tokenizer(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (again / name).read_bytes() == (tiny_folder / name).read_bytes(), name  # deterministic
    tok = load_tokenizer(tiny_folder)
    vocab = tok.get_vocab()
    assert max(vocab.values()) < 496 and len(vocab) <= 480 + 5
    for t in ("<|endoftext|>", "<|padding|>", "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"):
        assert t in vocab
    assert tok.bos_token_id == tok.eos_token_id == vocab["<|endoftext|>"]
    assert tok.pad_token_id == vocab["<|padding|>"]
    text = " User: Déjà vu — 3 cats 🐈 in the image? Assistant:"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text  # byte-level: lossless
    spec = json.loads((tiny_folder / "tokenizer.json").read_text())
    assert spec["normalizer"]["type"] == "NFC"
    assert spec["pre_tokenizer"]["type"] == "ByteLevel" and spec["pre_tokenizer"]["add_prefix_space"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    cfg = json.loads((tiny_folder / "generation_config.json").read_text())
    assert cfg["eos_token_id"] == vocab["<|endoftext|>"] and cfg["pad_token_id"] == vocab["<|padding|>"]


def test_real_tokenizer_special_ids(real):
    tok = real.tokenizer
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (50279, 50279, 1)
    want = {"<im_start>": 50280, "<im_end>": 50281, "<im_patch>": 50282, "<im_col>": 50283, "<|image|>": 50284}
    assert {t: tok.convert_tokens_to_ids(t) for t in want} == want


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
