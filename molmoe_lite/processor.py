"""Image + prompt -> the model's input tensors, exactly as the release's processor makes them.

Method ("overlap-and-resize-c2", numbers for the release's preprocessor config):
1. Tiling: pick (rows, cols) with rows * cols <= max_crops for the image minus the
   overlap margins (``select_tiling``; float32 arithmetic, applied literally).
2. Resize-and-pad (``resize_and_pad``): uint8 -> float32 / 255, scale by the float32
   ``min`` ratio with truncated sizes, antialiased bilinear resize, clip, centre-pad
   with 0, normalise with the CLIP mean / std. Once into a 336 x 336 global view and
   once into a (224 rows + 112) x (224 cols + 112) canvas cut into 336-px crops at
   stride 224 (overlapping by the margins).
3. Patches: every crop becomes 576 patches of 14 x 14 x 3 values in (dh, dw, c) order.
4. Tokens: ``[BOS] <im_start> 12 x (12 <im_patch> <im_col>) <im_end>`` for the global
   view, then the same for the hi-res grid (only pooled cells outside the overlap
   margins), then the prompt ``" User: " + text + " Assistant:"``.
5. ``image_input_idx`` (crops, 144): position in ``input_ids`` of each crop's pooled
   cell (row-major), -100 for cells in the margins. ``image_masks`` (crops, 576):
   fraction of real pixels per patch, with the release's off-by-one (the crop masks
   followed by a row of -1 are paired with [global, crops...]).

Every size comes from ``PreprocessorConfig`` (``preprocessor_config.json``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from molmoe_lite.quantize.checkpoint import read_json_object
from molmoe_lite.images import ImageError, load_image
from molmoe_lite.tokenizer import IM_COL, IM_END, IM_PATCH, IM_START, load_tokenizer
from molmoe_lite.errors import MolmoeLiteError, UsageError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Marks pooled cells that fall in an overlap margin (the release's value).
DROPPED = -100
# Pads every key in ``collate`` (architecture doc, "Batching").
PAD = -1


class ProcessorConfigError(MolmoeLiteError, ValueError):
    """A preprocessor config whose geometry this processor cannot lay out."""


@dataclass(frozen=True)
class PreprocessorConfig:
    """The fields of the release's ``preprocessor_config.json`` (defaults = the release)."""

    base_image_input_size: tuple[int, int] = (336, 336)
    image_patch_size: int = 14
    image_token_length_h: int = 12
    image_token_length_w: int = 12
    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    image_padding_mask: bool = True
    do_normalize: bool = True
    source: str = field(default="defaults", compare=False)

    def __post_init__(self) -> None:
        size, p = self.base_image_input_size, self.image_patch_size
        where = f"preprocessor config ({self.source})"
        if size[0] != size[1]:
            raise ProcessorConfigError(f"{where}: base_image_input_size {size} must be square")
        if p < 1 or size[0] % p:
            raise ProcessorConfigError(f"{where}: base_image_input_size {size} is not a multiple of patch {p}")
        pooled = (self.crop_patches + 1) // 2
        if (self.image_token_length_h, self.image_token_length_w) != (pooled, pooled):
            raise ProcessorConfigError(
                f"{where}: image_token_length {self.image_token_length_h}x{self.image_token_length_w} "
                f"must be {pooled}x{pooled} (2x2 pooling of {self.crop_patches}x{self.crop_patches} patches)"
            )
        left, right = self.overlap_margins
        if left < 0 or right < 0 or left % 2 or self.window_patches <= 0 or self.window_patches % 2:
            raise ProcessorConfigError(
                f"{where}: overlap_margins {self.overlap_margins} must be >= 0 with an even left margin "
                f"and an even, positive window ({self.crop_patches} - margins) for 2x2 pooling"
            )
        if self.max_crops < 1:
            raise ProcessorConfigError(f"{where}: max_crops={self.max_crops} must be >= 1")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ProcessorConfigError(f"{where}: image_mean / image_std need 3 values, std > 0")

    # ---- derived geometry (release: 24, 16, 224, 112, 576, 588, 144) -----------------
    @property
    def crop_size(self) -> int:
        return self.base_image_input_size[0]

    @property
    def crop_patches(self) -> int:
        return self.crop_size // self.image_patch_size

    @property
    def window_patches(self) -> int:
        """Patches per crop left after the margins: the stride between crops."""
        return self.crop_patches - sum(self.overlap_margins)

    @property
    def window_px(self) -> int:
        return self.window_patches * self.image_patch_size

    @property
    def margin_px(self) -> int:
        return sum(self.overlap_margins) * self.image_patch_size

    @property
    def patches_per_crop(self) -> int:
        return self.crop_patches**2

    @property
    def patch_dim(self) -> int:
        return self.image_patch_size**2 * 3

    @property
    def tokens_per_crop(self) -> int:
        return self.image_token_length_h * self.image_token_length_w

    # ---- io ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "dict") -> "PreprocessorConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d and k != "source"}
        for k in ("base_image_input_size", "overlap_margins", "image_mean", "image_std"):
            if k in known:
                known[k] = tuple(known[k])
        try:
            return cls(**known, source=source)
        except (TypeError, IndexError) as exc:
            raise ProcessorConfigError(f"preprocessor config ({source}): bad field value: {exc}") from exc

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "PreprocessorConfig":
        """``preprocessor_config.json`` if present, else the geometry in ``config.json``,
        else the release's defaults."""
        folder = Path(folder)
        pre, cfg = folder / "preprocessor_config.json", folder / "config.json"
        if pre.is_file():
            return cls.from_dict(_read_json(pre), str(pre))
        if cfg.is_file():
            d = _read_json(cfg)
            vision = d.get("vision_backbone") or {}
            fields: dict[str, Any] = {k: d[k] for k in ("max_crops", "overlap_margins") if k in d}
            if "image_patch_size" in vision:
                fields["image_patch_size"] = vision["image_patch_size"]
            if "image_default_input_size" in vision:
                fields["base_image_input_size"] = vision["image_default_input_size"]
                p = int(fields.get("image_patch_size", cls.image_patch_size))
                n = int(vision["image_default_input_size"][0]) // p
                fields["image_token_length_h"] = fields["image_token_length_w"] = (n + 1) // 2
            return cls.from_dict(fields, str(cfg))
        return cls(source="defaults")

    def save(self, folder: str | Path) -> Path:
        """Write ``preprocessor_config.json`` with the release's field names."""
        path = Path(folder) / "preprocessor_config.json"
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items() if k != "source"}
        d["image_processor_type"] = "MolmoImageProcessor"
        path.write_text(json.dumps(d, indent=2) + "\n", encoding="utf-8")
        return path


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, ProcessorConfigError)


# ---- geometry ------------------------------------------------------------------------


def select_tiling(h: int, w: int, window: int, max_crops: int) -> tuple[int, int]:
    """(rows, cols) of ``window``-px tiles for an ``h`` x ``w`` area, the release's rule.

    Candidates (i, j) with i * j <= max_crops, ordered by (i * j, i). The float32 scale
    to fit (h, w) into (window * i, window * j) is the min over the two axes. If all
    scales are < 1, the largest wins (least downscaling); otherwise the smallest scale
    >= 1. Ties go to the earlier candidate. ``h`` / ``w`` may be zero or negative (the
    caller subtracts the margins first); the rule is applied literally, so negative and
    infinite scales take part like the release's numpy code lets them.
    """
    tilings = sorted(
        ((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops),
        key=lambda t: (t[0] * t[1], t[0]),
    )
    cand = np.array(tilings, dtype=np.float32) * np.float32(window)  # [n, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = (cand / np.array([h, w], dtype=np.float32)).min(axis=1)  # [n]
    if np.all(scale < 1):
        ix = int(np.argmax(scale))
    else:
        ix = int(np.argmin(np.where(scale < 1, np.float32(1e10), scale)))
    return tilings[ix]


def scaled_size(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """Size after the aspect-preserving resize into (out_h, out_w): float32, truncated.

    The side that should fill the box can come out one pixel short (1080x1920 into
    784x1008 gives 567x1007), as in the release.
    """
    f32 = np.float32
    scale = min(f32(out_w) / f32(w), f32(out_h) / f32(h))
    return int(f32(h) * scale), int(f32(w) * scale)


def to_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1] (a permuted view, like the release)."""
    return torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32).div(255)


def resize_and_pad(
    image: torch.Tensor, out_h: int, out_w: int, cfg: PreprocessorConfig
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """float32 [3, H, W] in [0, 1] -> normalised float32 [out_h, out_w, 3] and the real
    pixel box (top, left, height, width); padding is 0 before normalising."""
    _, h, w = image.shape
    nh, nw = scaled_size(h, w, out_h, out_w)
    if (nh, nw) != (h, w):  # at equal size the resize is the identity (checked): skip it
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    image = image.clamp(0.0, 1.0).permute(1, 2, 0)  # [nh, nw, 3]
    top, left = (out_h - nh) // 2, (out_w - nw) // 2
    out = torch.zeros(out_h, out_w, 3, dtype=torch.float32)
    out[top : top + nh, left : left + nw] = image
    if cfg.do_normalize:  # float32 (x - mean) / std, padding included, as the release
        out.sub_(torch.tensor(cfg.image_mean, dtype=torch.float32))
        out.div_(torch.tensor(cfg.image_std, dtype=torch.float32))
    return out, (top, left, nh, nw)


def patchify(image: torch.Tensor, patch: int) -> torch.Tensor:
    """[H, W, 3] -> contiguous [H/p, W/p, p * p * 3], each patch flattened in (dh, dw, c) order."""
    h, w, c = image.shape
    grid = image.reshape(h // patch, patch, w // patch, patch, c).permute(0, 2, 1, 3, 4)
    return grid.reshape(h // patch, w // patch, patch * patch * c).contiguous()


def cut_crops(grid: torch.Tensor, rows: int, cols: int, size: int, stride: int) -> torch.Tensor:
    """[gh, gw, *f] patch grid -> [rows * cols, size * size, *f]: the size x size windows at
    ``stride``, row-major. One strided copy (crops overlap, so no plain view exists)."""
    s = grid.stride()
    view = grid.as_strided(
        (rows, cols, size, size, *grid.shape[2:]), (stride * s[0], stride * s[1], s[0], s[1], *s[2:])
    )
    return view.reshape(rows * cols, size * size, *grid.shape[2:])


def patch_fill(box: tuple[int, int, int, int], out_h: int, out_w: int, patch: int) -> torch.Tensor:
    """Fraction of real pixels in each patch of an (out_h, out_w) canvas: float32 [H/p, W/p].

    The real pixels form one rectangle, so a patch's count is the product of its row and
    column overlaps with it; count / p^2 equals the release's float32 mean of the mask.
    """
    top, left, nh, nw = box

    def overlap(start: int, length: int, n: int) -> torch.Tensor:
        lo = torch.arange(n // patch) * patch
        return ((lo + patch).clamp(max=start + length) - lo.clamp(min=start)).clamp(min=0)

    count = overlap(top, nh, out_h)[:, None] * overlap(left, nw, out_w)[None, :]
    return count.to(torch.float32) / float(patch * patch)


def kept_pooled(n_tiles: int, cfg: PreprocessorConfig) -> list[range]:
    """Per tile along one axis: the pooled rows (or cols) of its 12 that are kept.

    A crop keeps its window plus the outer margins of the image: one tile keeps all,
    the first tile drops its far margin, the last its near margin, middle tiles both.
    """
    left, right = cfg.overlap_margins
    out = []
    for t in range(n_tiles):
        length = cfg.window_patches + (left if t == 0 else 0) + (right if t == n_tiles - 1 else 0)
        start = 0 if t == 0 else left // 2
        out.append(range(start, start + (length + 1) // 2))
    return out


@dataclass
class ImageInputs:
    """One image's share of the model inputs (positions relative to its first token)."""

    crops: torch.Tensor  # [1 + n, patches_per_crop, patch_dim] float32, global view first
    masks: torch.Tensor | None  # [n + 1, patches_per_crop] float32 (release's shifted rows)
    tokens: torch.Tensor  # [T] long
    patch_positions: torch.Tensor  # [1 + n, tokens_per_crop] long, DROPPED for margins
    tiling: tuple[int, int]


def preprocess_image(pixels: np.ndarray, cfg: PreprocessorConfig, ids: dict[str, int]) -> ImageInputs:
    """uint8 [H, W, 3] -> crops, masks, image tokens and token positions (no BOS shift)."""
    h, w = pixels.shape[:2]
    p, cp, win = cfg.image_patch_size, cfg.crop_patches, cfg.window_patches
    rows, cols = select_tiling(h - cfg.margin_px, w - cfg.margin_px, cfg.window_px, cfg.max_crops)
    canvas_h, canvas_w = rows * cfg.window_px + cfg.margin_px, cols * cfg.window_px + cfg.margin_px
    # So elongated an image shrinks to less than a pixel across in a view: nothing to resize.
    for out_h, out_w in ((canvas_h, canvas_w), (cfg.crop_size, cfg.crop_size)):
        if min(scaled_size(h, w, out_h, out_w)) < 1:
            raise ImageError(f"{w}x{h} pixels is too elongated: its short side would shrink below one pixel "
                             f"in the model's {out_w}x{out_h} view; crop or pad it nearer to square")
    image = to_float(pixels)
    canvas, box = resize_and_pad(image, canvas_h, canvas_w, cfg)
    grid = patchify(canvas, p)  # [canvas_h/p, canvas_w/p, patch_dim]
    fill = patch_fill(box, canvas_h, canvas_w, p)  # [canvas_h/p, canvas_w/p]
    n = rows * cols
    crops = torch.empty(1 + n, cfg.patches_per_crop, cfg.patch_dim)
    crops[1:] = cut_crops(grid, rows, cols, cp, win)
    global_view, _ = resize_and_pad(image, cfg.crop_size, cfg.crop_size, cfg)
    crops[0] = patchify(global_view, p).reshape(-1, cfg.patch_dim)
    # Release quirk: the hi-res masks get a trailing row of -1 and are then paired with
    # [global, crops...]: the global view gets crop 0's mask, the last crop all -1.
    masks = torch.full((n + 1, cfg.patches_per_crop), -1.0)
    masks[:n] = cut_crops(fill, rows, cols, cp, win)

    # Token layout: a grid of pooled cells, each row closed by <im_col>.
    ph, pw = cfg.image_token_length_h, cfg.image_token_length_w
    keep_r, keep_c = kept_pooled(rows, cfg), kept_pooled(cols, cfg)
    grid_h, grid_w = sum(len(r) for r in keep_r), sum(len(c) for c in keep_c)
    # The release sizes the token grid from the canvas; the kept cells must fill it.
    margins = sum(cfg.overlap_margins)
    assert (grid_h, grid_w) == ((rows * win + margins + 1) // 2, (cols * win + margins + 1) // 2)

    def block(n_rows: int, n_cols: int) -> list[int]:
        return [ids[IM_START]] + ([ids[IM_PATCH]] * n_cols + [ids[IM_COL]]) * n_rows + [ids[IM_END]]

    tokens = block(ph, pw) + block(grid_h, grid_w)
    global_len = 2 + ph * (pw + 1)

    positions = torch.full((1 + rows * cols, ph * pw), DROPPED, dtype=torch.long)
    r, c = torch.arange(ph)[:, None], torch.arange(pw)[None, :]
    positions[0] = (1 + r * (pw + 1) + c).reshape(-1)
    row_off = np.cumsum([0] + [len(k) for k in keep_r])
    col_off = np.cumsum([0] + [len(k) for k in keep_c])
    for i in range(rows):
        for j in range(cols):
            kr, kc = keep_r[i], keep_c[j]
            cell = torch.full((ph, pw), DROPPED, dtype=torch.long)
            gr = torch.arange(len(kr))[:, None] + int(row_off[i])  # hi-res grid row of each kept row
            gc = torch.arange(len(kc))[None, :] + int(col_off[j])
            cell[kr.start : kr.stop, kc.start : kc.stop] = global_len + 1 + gr * (grid_w + 1) + gc
            positions[1 + i * cols + j] = cell.reshape(-1)

    return ImageInputs(
        crops=crops,
        masks=masks if cfg.image_padding_mask else None,
        tokens=torch.tensor(tokens, dtype=torch.long),
        patch_positions=positions,
        tiling=(rows, cols),
    )


# ---- the processor -------------------------------------------------------------------


class Processor:
    """Tokenizer + image preprocessing with the release's outputs.

    ``process`` returns, unbatched: ``input_ids`` (L,) long; and, always (empty with 0
    rows for text-only input, so ``collate`` and the model see one layout): ``images``
    (n, 576, 588) float32, ``image_input_idx`` (n, 144) long, ``image_masks`` (n, 576)
    float32 (absent when the config's ``image_padding_mask`` is false, as in the release).
    """

    def __init__(self, tokenizer: Any, config: PreprocessorConfig | None = None) -> None:
        self.tokenizer = tokenizer
        self.config = config or PreprocessorConfig()
        vocab = tokenizer.get_vocab()
        missing = [t for t in (IM_START, IM_END, IM_PATCH, IM_COL) if t not in vocab]
        if missing:
            raise ProcessorConfigError(f"tokenizer lacks the image tokens {missing}")
        self.special_ids = {t: vocab[t] for t in (IM_START, IM_END, IM_PATCH, IM_COL)}
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise ProcessorConfigError("tokenizer has neither a BOS nor an EOS token")
        self.bos_id = int(bos)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "Processor":
        """Tokenizer from ``tokenizer.json`` and geometry from ``preprocessor_config.json``
        (else ``config.json``, else the release's defaults); no remote code."""
        return cls(load_tokenizer(folder), PreprocessorConfig.from_pretrained(folder))

    def prompt_ids(self, text: str | None) -> list[int]:
        """Ids of ``" User: " + text + " Assistant:"`` (no BOS, no image tokens)."""
        return list(self.tokenizer.encode(" User: " + (text or "") + " Assistant:", add_special_tokens=False))

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; batch padding (-1) is ignored."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.tokenizer.decode([int(i) for i in ids if int(i) >= 0], skip_special_tokens=skip_special_tokens)

    def process(
        self, images: Any = None, text: str | None = "", *, transparent: str = "composite"
    ) -> dict[str, torch.Tensor]:
        """One prompt with zero, one or several images -> unbatched model inputs.

        Layout: ``[BOS] [image 1 tokens] [image 2 tokens] ... [prompt]``. Each image's
        ``image_input_idx`` rows point at its own ``<im_patch>`` tokens. (The release's
        remote code offsets every image by 0, so its second image's indices point into
        the first image's tokens; we do not reproduce that.)
        """
        cfg = self.config
        if images is None:
            images = []
        elif not isinstance(images, (list, tuple)):
            images = [images]
        # np.array copies: torch.from_numpy wants a writable array, PIL's buffer is read-only.
        parts = []
        for im in images:
            try:
                parts.append(preprocess_image(np.array(load_image(im, transparent)), cfg, self.special_ids))
            except ImageError as exc:
                if not isinstance(im, (str, Path)) or str(exc).startswith((str(im), str(Path(im)))):
                    raise
                raise ImageError(f"{im}: {exc}") from exc  # name the file when the message lacks it

        tokens = [torch.tensor([self.bos_id], dtype=torch.long)]
        idx = []
        offset = 1  # BOS
        for part in parts:
            idx.append(torch.where(part.patch_positions >= 0, part.patch_positions + offset, part.patch_positions))
            tokens.append(part.tokens)
            offset += len(part.tokens)
        tokens.append(torch.tensor(self.prompt_ids(text), dtype=torch.long))

        n_patch, dim = cfg.patches_per_crop, cfg.patch_dim
        out = {
            "input_ids": torch.cat(tokens),
            "images": torch.cat([p.crops for p in parts]) if parts else torch.zeros(0, n_patch, dim),
            "image_input_idx": torch.cat(idx) if parts else torch.zeros(0, cfg.tokens_per_crop, dtype=torch.long),
        }
        if cfg.image_padding_mask:
            out["image_masks"] = torch.cat([p.masks for p in parts]) if parts else torch.zeros(0, n_patch)
        return out

    __call__ = process

    @staticmethod
    def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Batch ``process`` outputs; see the module-level ``collate``."""
        return collate(items)


def collate(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack unbatched ``process`` outputs, right-padding every key with -1.

    ``input_ids`` (B, L_max); ``images`` (B, n_max, 576, 588); ``image_input_idx``
    (B, n_max, 144); ``image_masks`` (B, n_max, 576). The model treats id -1 as
    padding (attention mask ``input_ids != -1``) and crops holding -1 as absent.
    """
    if not items:
        raise UsageError("collate: empty list")
    keys = list(items[0])
    for k, item in enumerate(items):
        if list(item) != keys:
            raise UsageError(f"collate: item {k} has keys {list(item)}, item 0 has {keys}")
    out = {}
    for key in keys:
        tensors = [item[key] for item in items]
        tail = tensors[0].shape[1:]
        if any(t.shape[1:] != tail for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise UsageError(f"collate: {key!r} shapes differ beyond the first dim: {shapes}")
        n = max(t.shape[0] for t in tensors)
        batch = torch.full((len(tensors), n, *tail), PAD, dtype=tensors[0].dtype)
        for b, t in enumerate(tensors):
            batch[b, : t.shape[0]] = t
        out[key] = batch
    return out
