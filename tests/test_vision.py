"""Tests of the vision backbone (molmoe_lite.model.vision) on tiny random release-layout weights.

References are independent of the code under test: the ViT is checked against transformers'
CLIPVisionModel given the same tensors; the rest against a float64 re-statement of the
architecture doc written here with explicit loops over pooled cells and heads.

Tolerances (relative Frobenius error unless stated):
  ViT vs CLIP (fp32)                       1e-4
  backbone vs float64 reference (fp32)     1e-4
  bf16 / fp16 vs fp32                      3e-2 / 5e-3
  exact rules (pad embeds, zeroed crops)   1e-6 absolute
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from molmoe_lite.config import ConfigError, MolmoeConfig
from molmoe_lite.model.vision import ViT, VisionBackbone, VisionInputError
from molmoe_lite.quantize.layout import expected_shapes
from molmoe_lite.testing import random_state_dict, tiny_config_dict

PREFIX = "model.vision_backbone."
RELEASE_CONFIG = Path("/work/shared/molmoe-1b-0924/config.json")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiny_cfg_dict(**vision_overrides) -> dict:
    d = tiny_config_dict()
    d["vision_backbone"].update(vision_overrides)
    return d


def vision_state(cfg_dict: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    sd = random_state_dict(cfg_dict, seed=seed)
    return {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}


def load_backbone(cfg_dict: dict, seed: int = 0, dtype=torch.float32) -> tuple[VisionBackbone, dict]:
    """Built on the meta device, weights assigned: the way the runtime loads it."""
    cfg = MolmoeConfig.from_dict(cfg_dict)
    state = {k: v.to(dtype) for k, v in vision_state(cfg_dict, seed).items()}
    with torch.device("meta"):
        model = VisionBackbone(cfg, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval(), state


def image_to_patches(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """[N, 3, H, W] -> [N, (H/p)*(W/p), p*p*3], patches row-major, each flattened in (dh, dw, c) order."""
    N, C, H, W = pixels.shape
    x = pixels.reshape(N, C, H // patch, patch, W // patch, patch)  # n c gy dh gx dw
    return x.permute(0, 2, 4, 3, 5, 1).reshape(N, (H // patch) * (W // patch), patch * patch * C)


def hf_clip_from_release(state: dict[str, torch.Tensor], cfg: MolmoeConfig, dtype=torch.float64):
    """transformers' CLIPVisionModel holding the release-layout ViT tensors."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    v = cfg.vision
    hf_cfg = CLIPVisionConfig(
        hidden_size=v.emb_dim,
        intermediate_size=v.mlp_dim,
        num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads,
        image_size=v.input_size[0],
        patch_size=v.patch_size,
        hidden_act="quick_gelu",
        layer_norm_eps=v.norm_eps,
        attn_implementation="eager",
    )
    model = CLIPVisionModel(hf_cfg)
    D, p = v.emb_dim, v.patch_size
    vit = "image_vit."
    m = {
        "embeddings.class_embedding": state[vit + "class_embedding"],
        # release [D, (dh, dw, c)] -> conv [D, c, dh, dw]
        "embeddings.patch_embedding.weight": state[vit + "patch_embedding.weight"].reshape(D, p, p, 3).permute(0, 3, 1, 2),
        "embeddings.position_embedding.weight": state[vit + "positional_embedding"],
        "pre_layrnorm.weight": state[vit + "pre_ln.weight"],
        "pre_layrnorm.bias": state[vit + "pre_ln.bias"],
        "post_layernorm.weight": torch.ones(D),  # unused by hidden_states
        "post_layernorm.bias": torch.zeros(D),
    }
    names = {
        "self_attn.q_proj": "attention.wq",
        "self_attn.k_proj": "attention.wk",
        "self_attn.v_proj": "attention.wv",
        "self_attn.out_proj": "attention.wo",
        "layer_norm1": "attention_norm",
        "layer_norm2": "ffn_norm",
        "mlp.fc1": "feed_forward.w1",
        "mlp.fc2": "feed_forward.w2",
    }
    for n in range(v.num_layers):
        for hf, ours in names.items():
            for t in ("weight", "bias"):
                m[f"encoder.layers.{n}.{hf}.{t}"] = state[f"{vit}transformer.resblocks.{n}.{ours}.{t}"]
    model.load_state_dict({k: t.contiguous() for k, t in m.items()}, strict=True)
    return model.to(dtype).eval()


def reference_backbone(images, image_masks, state, cfg: MolmoeConfig) -> torch.Tensor:
    """The architecture doc's vision backbone in float64, with the ViT from transformers' CLIP.

    images [B, n, P, F], image_masks [B, n, P] or None -> [B, n, G, d].
    """
    v = cfg.vision
    s = {k: t.double() for k, t in state.items()}
    B, n, P, Fdim = images.shape
    gh, gw = v.grid
    p = v.patch_size
    clip = hf_clip_from_release(state, cfg)
    # undo the (dh, dw, c) flattening to give CLIP pixels [N, 3, H, W]
    pixels = images.double().reshape(B * n, gh, gw, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B * n, 3, gh * p, gw * p)
    with torch.no_grad():
        hidden = clip(pixel_values=pixels, output_hidden_states=True).hidden_states  # [embeddings, block 0, ...]
    blocks = [hidden[1 + (i % v.num_layers)] for i in cfg.vit_layers]
    feats = torch.cat(blocks, dim=-1)[:, 1:]  # [N, P, C]
    for crop in range(B * n):
        if (images.reshape(B * n, -1)[crop] == -1).any():
            feats[crop] = 0.0
    if image_masks is not None:
        m = image_masks.reshape(B * n, P, 1).double()
        feats = feats + torch.where(m == 0, s["pad_embed"][0], 0.0)
        feats = feats + torch.where((m != 0) & (m < 1), s["pad_embed"][1], 0.0)
    Gh, Gw = cfg.pooled_grid
    H, hd = v.num_heads, v.head_dim
    rep = v.num_heads // v.num_kv_heads
    pw = {w: (s[f"image_pooling_2d.{w}.weight"], s[f"image_pooling_2d.{w}.bias"]) for w in ("wq", "wk", "wv", "wo")}
    out = torch.zeros(B * n, Gh * Gw, v.emb_dim, dtype=torch.float64)
    grid = feats.reshape(B * n, gh, gw, -1)
    for crop in range(B * n):
        for r in range(Gh):
            for c in range(Gw):
                cell = []
                for i in range(cfg.image_pooling_h):
                    for j in range(cfg.image_pooling_w):
                        y, x = r * cfg.image_pooling_h + i, c * cfg.image_pooling_w + j
                        inside = y < gh and x < gw
                        cell.append(grid[crop, y, x] if inside else torch.zeros(grid.shape[-1], dtype=torch.float64))
                cell = torch.stack(cell)  # [4, C]
                q = pw["wq"][0] @ cell.mean(0) + pw["wq"][1]
                k = cell @ pw["wk"][0].T + pw["wk"][1]
                val = cell @ pw["wv"][0].T + pw["wv"][1]
                heads = []
                for h in range(H):
                    g = h // rep
                    qh, kh, vh = q[h * hd : (h + 1) * hd], k[:, g * hd : (g + 1) * hd], val[:, g * hd : (g + 1) * hd]
                    scores = kh @ qh / math.sqrt(hd)
                    w = torch.exp(scores - scores.max())
                    heads.append((w / w.sum()) @ vh)
                out[crop, r * Gw + c] = pw["wo"][0] @ torch.cat(heads) + pw["wo"][1]
    w1, w2, w3 = (s[f"image_projector.{w}.weight"] for w in ("w1", "w2", "w3"))
    proj = (F.silu(out @ w1.T) * (out @ w3.T)) @ w2.T
    return proj.reshape(B, n, Gh * Gw, -1)


# ---- layout -------------------------------------------------------------------------
def release_cfg_dict() -> dict:
    if not RELEASE_CONFIG.exists():
        pytest.skip(f"{RELEASE_CONFIG} not present")
    return json.loads(RELEASE_CONFIG.read_text())


@pytest.mark.parametrize("which", ["tiny", "release"], ids=["tiny_config", "release_config_on_meta"])
def test_state_dict_matches_release_layout(which):
    d = tiny_config_dict() if which == "tiny" else release_cfg_dict()
    with torch.device("meta"):
        model = VisionBackbone(MolmoeConfig.from_dict(d))
    expected = {k[len(PREFIX) :]: s for k, s in expected_shapes(d).items() if k.startswith(PREFIX)}
    got = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    assert set(got) == set(expected), f"missing {set(expected) - set(got)}, unexpected {set(got) - set(expected)}"
    assert got == expected


def test_patch_helper_is_dh_dw_c():
    # The release flattens a patch as (dh, dw, c); check the test's own helper against indexing.
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 28, 42)
    patches = image_to_patches(pixels, 14)  # grid 2 x 3
    gy, gx, dh, dw, c = 1, 2, 5, 9, 2
    assert patches[0, gy * 3 + gx, (dh * 14 + dw) * 3 + c] == pixels[0, c, gy * 14 + dh, gx * 14 + dw]


# ---- ViT ----------------------------------------------------------------------------
@pytest.mark.parametrize("n_crops", [1, 3], ids=["one_crop", "three_crops"])
def test_vit_matches_hf_clip(n_crops):
    d = tiny_config_dict()
    cfg = MolmoeConfig.from_dict(d)
    state = vision_state(d, seed=1)
    with torch.device("meta"):
        vit = ViT(cfg.vision)
    vit.load_state_dict({k[len("image_vit.") :]: t for k, t in state.items() if k.startswith("image_vit.")}, assign=True)
    clip = hf_clip_from_release(state, cfg, dtype=torch.float32)
    torch.manual_seed(2)
    pixels = torch.randn(n_crops, 3, *cfg.vision.input_size)
    with torch.no_grad():
        ours = vit(image_to_patches(pixels, cfg.vision.patch_size))
        theirs = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(ours) == cfg.vision.num_layers == len(theirs) - 1
    for block, out in enumerate(ours):
        err = rel_err(out, theirs[block + 1])
        assert err <= 1e-4, f"block {block}: relative error {err:.2e} > 1e-4"
    # keeping only some blocks' outputs (what the backbone does) returns exactly those, in order
    keep = (cfg.vision.num_layers - 2, 0)
    with torch.no_grad():
        kept = vit(image_to_patches(pixels, cfg.vision.patch_size), n_blocks=cfg.vision.num_layers - 1, keep=keep)
    assert len(kept) == 2 and all(torch.equal(k, ours[i]) for k, i in zip(kept, keep))


# ---- whole backbone against the float64 reference -------------------------------------
def make_inputs(cfg: MolmoeConfig, B: int, n: int, seed: int):
    v = cfg.vision
    g = torch.Generator().manual_seed(seed)
    P = v.grid[0] * v.grid[1]
    images = torch.randn(B, n, P, v.patch_dim, generator=g)
    masks = torch.ones(B, n, P)
    masks[..., : P // 4] = 0.0  # fully padded patches
    masks[..., P // 4 : P // 3] = torch.rand(B, n, P // 3 - P // 4, generator=g)  # partially padded
    masks[:, -1] = -1.0  # the release's last mask row
    return images, masks


CASES = {
    # id: (vision overrides, B, n, pad the last crop of sample 0, use masks)
    "one_crop_no_masks": ({}, 1, 1, False, False),
    "batch_with_pad_crop": ({}, 2, 2, True, True),
    # 322 px -> 23 x 23 patches: pooling zero-pads the last row/column up to 12 x 12 blocks
    "odd_grid_23x23": ({"image_default_input_size": [322, 322], "image_num_pos": 1 + 23 * 23}, 1, 2, False, True),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_backbone_matches_reference(case):
    overrides, B, n, pad_crop, use_masks = CASES[case]
    d = tiny_cfg_dict(**overrides)
    model, state = load_backbone(d, seed=3)
    cfg = model.cfg
    images, masks = make_inputs(cfg, B, n, seed=4)
    if pad_crop:
        images[0, -1] = -1.0
        masks[0, -1] = -1.0
    masks = masks if use_masks else None
    with torch.no_grad():
        ours = model(images, masks)
    ref = reference_backbone(images, masks, state, cfg)
    assert ours.shape == (B, n, cfg.pooled_grid[0] * cfg.pooled_grid[1], cfg.d_model)
    err = rel_err(ours, ref)
    assert err <= 1e-4, f"relative error {err:.2e} > 1e-4"


# ---- the rules, one by one ----------------------------------------------------------
@pytest.mark.parametrize(
    "where",
    ["one_value", "every_value"],
    ids=["single_minus_one_in_real_crop", "batch_pad_crop_all_minus_one"],
)
def test_crop_with_any_minus_one_is_zeroed(where):
    d = tiny_config_dict()
    model, state = load_backbone(d, seed=5)
    cfg = model.cfg
    images, _ = make_inputs(cfg, 1, 3, seed=6)
    if where == "one_value":
        images[0, 1, 100, 7] = -1.0
    else:
        images[0, 1] = -1.0
    images[0, 2, 100, 7] = -0.9999  # close to, but not exactly, the pad value: a real crop
    with torch.no_grad():
        feats = model.encode(images)
        out = model(images)  # no masks: no pad embeds
    assert feats[0, 1].abs().max() == 0
    assert feats[0, 0].abs().max() > 0 and feats[0, 2].abs().max() > 0
    # All-zero features: every key is bk and every value bv, so each head averages bv uniformly:
    # pooled = wo bv + bo for every cell, then the projector.
    s = {k: t.double() for k, t in state.items()}
    pooled = s["image_pooling_2d.wo.weight"] @ s["image_pooling_2d.wv.bias"] + s["image_pooling_2d.wo.bias"]
    w1, w2, w3 = (s[f"image_projector.{w}.weight"] for w in ("w1", "w2", "w3"))
    expected = w2 @ (F.silu(w1 @ pooled) * (w3 @ pooled))
    assert torch.allclose(out[0, 1].double(), expected.expand_as(out[0, 1]), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "mask_value, row",
    [(0.0, 0), (0.5, 1), (1e-6, 1), (0.999, 1), (-1.0, 1), (1.0, None), (1.5, None)],
    ids=["all_pad_0", "partial_half", "partial_tiny", "partial_almost_full", "mask_quirk_minus_one", "real_1", "above_1"],
)
def test_pad_embed_rules(mask_value, row):
    model, state = load_backbone(tiny_config_dict(), seed=7)
    cfg = model.cfg
    P = cfg.vision.grid[0] * cfg.vision.grid[1]
    torch.manual_seed(8)
    feats = torch.randn(1, 2, P, cfg.vit_feature_dim)
    masks = torch.ones(1, 2, P)
    masks[0, 1, 5] = mask_value
    out = model.add_pad_embed(feats, masks)
    expected = feats.clone()
    if row is not None:
        expected[0, 1, 5] += state["pad_embed"][row]
    assert torch.allclose(out, expected, atol=1e-6, rtol=0)


def test_pooling_hand_computed_on_a_2x2_grid():
    # 28 px crops: a 2 x 2 patch grid pools to a single token, small enough to write out.
    d = tiny_cfg_dict(image_default_input_size=[28, 28], image_num_pos=5)
    model, state = load_backbone(d, seed=9)
    cfg = model.cfg
    v = cfg.vision
    torch.manual_seed(10)
    feats = torch.randn(1, 1, 4, cfg.vit_feature_dim)  # patches (0,0) (0,1) (1,0) (1,1)
    with torch.no_grad():
        pooled = model.pool(feats)
    assert pooled.shape == (1, 1, 1, v.emb_dim)
    s = {k: t.double() for k, t in state.items()}
    x = feats[0, 0].double()  # [4, C]
    q = s["image_pooling_2d.wq.weight"] @ ((x[0] + x[1] + x[2] + x[3]) / 4) + s["image_pooling_2d.wq.bias"]
    k = x @ s["image_pooling_2d.wk.weight"].T + s["image_pooling_2d.wk.bias"]
    val = x @ s["image_pooling_2d.wv.weight"].T + s["image_pooling_2d.wv.bias"]
    heads = []
    for h in range(v.num_heads):
        sl = slice(h * v.head_dim, (h + 1) * v.head_dim)
        scores = [float(q[sl] @ k[t, sl]) / math.sqrt(v.head_dim) for t in range(4)]
        z = sum(math.exp(a) for a in scores)
        heads.append(sum(math.exp(scores[t]) / z * val[t, sl] for t in range(4)))
    expected = s["image_pooling_2d.wo.weight"] @ torch.cat(heads) + s["image_pooling_2d.wo.bias"]
    assert rel_err(pooled[0, 0, 0], expected) <= 1e-5


def test_pooling_is_row_major_over_blocks():
    # Changing one patch changes exactly the pooled token of its 2 x 2 block.
    model, _ = load_backbone(tiny_config_dict(), seed=11)
    cfg = model.cfg
    gh, gw = cfg.vision.grid
    Gh, Gw = cfg.pooled_grid
    torch.manual_seed(12)
    feats = torch.randn(2, 1, gh * gw, cfg.vit_feature_dim)
    y, x = 13, 6  # patch (13, 6) lies in block (6, 3)
    changed = feats.clone()
    changed[:, :, y * gw + x] += 1.0
    with torch.no_grad():
        a, b = model.pool(feats), model.pool(changed)
    assert a.shape == (2, 1, Gh * Gw, cfg.vision.emb_dim)
    diff = (a - b).abs().amax(dim=(0, 1, 3))  # [G]
    assert diff.nonzero().flatten().tolist() == [(y // 2) * Gw + x // 2]


def test_batch_padding_matches_single_runs():
    model, _ = load_backbone(tiny_config_dict(), seed=13)
    cfg = model.cfg
    img_a, mask_a = make_inputs(cfg, 1, 2, seed=14)
    img_b, mask_b = make_inputs(cfg, 1, 3, seed=15)
    pad_img = torch.full_like(img_a[:, :1], -1.0)
    pad_mask = torch.full_like(mask_a[:, :1], -1.0)
    images = torch.cat([torch.cat([img_a, pad_img], 1), img_b])  # [2, 3, P, F]
    masks = torch.cat([torch.cat([mask_a, pad_mask], 1), mask_b])
    with torch.no_grad():
        batched = model(images, masks)
        single_a, single_b = model(img_a, mask_a), model(img_b, mask_b)
    assert rel_err(batched[0, :2], single_a[0]) <= 1e-5
    assert rel_err(batched[1], single_b[0]) <= 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)], ids=["bf16", "fp16"])
def test_low_precision_close_to_fp32(dtype, tol):
    d = tiny_config_dict()
    ref_model, _ = load_backbone(d, seed=16)
    model, _ = load_backbone(d, seed=16, dtype=dtype)
    images, masks = make_inputs(ref_model.cfg, 1, 2, seed=17)
    images[0, 1, 0, 0] = -1.0  # a zeroed crop goes through the low-precision path too
    with torch.no_grad():
        ref = ref_model(images, masks)
        out = model(images, masks)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    print(f"{dtype}: relative error vs fp32 {err:.2e}")
    assert err <= tol, f"{dtype}: relative error {err:.2e} > {tol}"


def test_no_crops_gives_empty_features():
    model, _ = load_backbone(tiny_config_dict(), seed=18)
    cfg = model.cfg
    P = cfg.vision.grid[0] * cfg.vision.grid[1]
    with torch.no_grad():
        out = model(torch.zeros(2, 0, P, cfg.vision.patch_dim), torch.zeros(2, 0, P))
    assert out.shape == (2, 0, cfg.pooled_grid[0] * cfg.pooled_grid[1], cfg.d_model)


@pytest.mark.parametrize(
    "images_shape, masks_shape, message",
    [
        ((3, 576, 588), None, "must have shape"),  # unbatched
        ((1, 3, 576, 587), None, "must have shape"),  # wrong patch size
        ((1, 3, 575, 588), None, "must have shape"),  # wrong patch count
        ((1, 3, 576, 588), (1, 2, 576), "image_masks"),  # mask for another crop count
    ],
    ids=["no_batch_dim", "bad_patch_dim", "bad_patch_count", "mask_shape_mismatch"],
)
def test_bad_inputs_raise_clear_errors(images_shape, masks_shape, message):
    model, _ = load_backbone(tiny_config_dict(), seed=19)
    masks = None if masks_shape is None else torch.ones(masks_shape)
    with pytest.raises(VisionInputError, match=message):
        model(torch.zeros(images_shape), masks)


def test_positional_embedding_size_mismatch_is_a_config_error():
    d = tiny_cfg_dict(image_num_pos=100)
    with pytest.raises(ConfigError, match="image_num_pos"):
        VisionBackbone(MolmoeConfig.from_dict(d))
