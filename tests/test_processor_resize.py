"""The processor's resized pixels against an antialiased bilinear resize written out here.

The rule (as PIL and torch's antialiased resize define it): output pixel i of a side scaled
from n to m samples the input around centre c = (i + 0.5) * n / m with the triangle filter
stretched by s = max(n / m, 1): weight(j) = max(0, 1 - |j + 0.5 - c| / s) over the input pixels
j within c +- s (rounded as PIL rounds), normalised to sum 1; the two sides are resized one
after the other. Sizes follow the release: scale = min(336 / W, 336 / H) in float32, sides
truncated, the image centred on a zero canvas, then (x - mean) / std. Random-pixel images,
so a wrong weight, offset or side order shows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from molmoe_lite.processor import CLIP_MEAN, CLIP_STD, Processor
from molmoe_lite.testing import write_tiny_tokenizer

BASE = 336


@pytest.fixture(scope="module")
def processor(tmp_path_factory) -> Processor:
    return Processor.from_pretrained(write_tiny_tokenizer(tmp_path_factory.mktemp("resize-tok")))


def resize_matrix(n: int, m: int) -> np.ndarray:
    """[m, n] weights of the antialiased triangle filter from n input to m output pixels."""
    scale = n / m
    support = max(scale, 1.0)
    out = np.zeros((m, n), dtype=np.float64)
    for i in range(m):
        centre = (i + 0.5) * scale
        lo = max(int(centre - support + 0.5), 0)
        hi = min(int(centre + support + 0.5), n)
        w = np.array([max(0.0, 1.0 - abs(j + 0.5 - centre) / support) for j in range(lo, hi)])
        out[i, lo:hi] = w / w.sum()
    return out


def global_view_by_hand(pixels: np.ndarray) -> torch.Tensor:
    h, w, _ = pixels.shape
    scale = min(np.float32(BASE) / np.float32(w), np.float32(BASE) / np.float32(h))
    nh, nw = int(np.float32(h) * scale), int(np.float32(w) * scale)
    x = pixels.astype(np.float64) / 255
    if (nh, nw) != (h, w):
        x = np.einsum("ih,hwc->iwc", resize_matrix(h, nh), x)
        x = np.einsum("jw,iwc->ijc", resize_matrix(w, nw), x)
    canvas = np.zeros((BASE, BASE, 3))
    top, left = (BASE - nh) // 2, (BASE - nw) // 2
    canvas[top:top + nh, left:left + nw] = np.clip(x, 0, 1)
    canvas = (canvas - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    return torch.from_numpy(canvas).float()


def unpatch(flat: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """[576, 588] patches (each flattened in (dh, dw, c) order) back to a [336, 336, 3] image."""
    g = BASE // patch
    return flat.reshape(g, g, patch, patch, 3).permute(0, 2, 1, 3, 4).reshape(BASE, BASE, 3)


@pytest.mark.parametrize(
    "w, h",
    [(536, 354), (354, 536), (1000, 700), (100, 70), (337, 500)],
    ids=["down-wide", "down-tall", "down-big", "up-small", "down-by-one-pixel"],
)
def test_global_view_is_the_antialiased_resize(processor, w, h):
    pixels = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    got = unpatch(processor.process(Image.fromarray(pixels), "Describe this image.")["images"][0])
    want = global_view_by_hand(pixels)
    # float32 sums in the processor against float64 here: measured up to 4.7e-5 (normalised
    # units, i.e. 0.003 of one 8-bit level); a wrong weight or a half-pixel shift gives ~0.1
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
