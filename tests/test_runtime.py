"""Runtime behaviour around generation: presets, context limits, repeated prompts, CLI tools."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from molmoe_lite import load
from molmoe_lite.api import SMALL_PRESET, apply_small_preset, float_linears, weights_plan
from molmoe_lite.demo import demo_image
from molmoe_lite.quantized import QuantizedExperts, QuantizedLinear


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_small_preset_quantises_every_decoder_and_vit_linear(tiny_release, tiny_model):
    model = load(tiny_release, device="cpu", quantize="int4", preset="small")
    blocks = model.model.transformer.blocks
    assert all(isinstance(b.mlp.experts, QuantizedExperts) for b in blocks)
    assert all(isinstance(b.attn.att_proj, QuantizedLinear) and isinstance(b.attn.attn_out, QuantizedLinear)
               for b in blocks)
    assert isinstance(model.lm_head, QuantizedLinear) and model.lm_head.bits == 4
    vit = model.model.vision_backbone.image_vit.transformer.resblocks
    vit_linears = [m for rb in vit for m in (*[getattr(rb.attention, a) for a in ("wq", "wk", "wv", "wo")],
                                              rb.feed_forward.w1, rb.feed_forward.w2)]
    assert all(isinstance(m, QuantizedLinear) and m.bits == 8 and m.bias is not None for m in vit_linears)
    assert model.model.transformer.wte.embedding.device.type == "cpu"
    inputs = tiny_model.processor.process(images=demo_image(), text="Describe this image.")
    with torch.no_grad():
        ref, got = tiny_model(**inputs)[0], model(**inputs)[0]
    # int4 on every decoder linear of a 64-wide random model, int8 ViT: measured 0.13 relative, 71% top-1
    assert float((got - ref).norm() / ref.norm()) <= 0.25
    assert float((got.argmax(-1) == ref.argmax(-1)).float().mean()) >= 0.5


def test_small_preset_on_read_equals_the_preset_applied_after_loading(tiny_release):
    """load(preset="small") quantises while reading; apply_small_preset does it to a loaded model:
    the same rounding of the same float weights, so the same quantised tensors and logits."""
    on_read = load(tiny_release, device="cpu", quantize="int4", preset="small")
    after = load(tiny_release, device="cpu", quantize="int4")
    changed = apply_small_preset(after)
    assert "lm_head" in changed and "model.transformer.wte (to CPU)" in changed
    a, b = on_read.state_dict(), after.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_loaded_tensors_never_write_into_the_checkpoint(tiny_release, tmp_path):
    """A load that maps the file shared (every tensor is converted on the way in) must copy even
    the tensors that need no conversion: here a bf16 .bin loaded in bf16, small preset (the
    token table stays on the CPU, as on a GPU). Writing into the model leaves the file alone."""
    import shutil

    folder = tmp_path / "bf16-release"
    shutil.copytree(tiny_release, folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    torch.save({k: v.bfloat16() for k, v in state.items()}, folder / "pytorch_model.bin")
    model = load(folder, device="cpu", dtype="bfloat16", preset="small")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    again = torch.load(folder / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(again[k], v.bfloat16()) for k, v in state.items())


def test_vit_int8_keeps_image_features_close(tiny_model):
    """The small preset's int8 per-channel ViT alone, against the float ViT (tiny random weights)."""
    vit_only = copy.deepcopy(tiny_model)
    bits, group = SMALL_PRESET["vision"]
    for parent, attr, _ in float_linears(vit_only, ["vision"]):
        setattr(parent, attr, QuantizedLinear.from_linear(getattr(parent, attr), bits, group))
    inputs = tiny_model.processor.process(images=demo_image(), text="Describe this image.")
    images, masks = inputs["images"][None], inputs["image_masks"][None]
    with torch.no_grad():
        ref = tiny_model.model.vision_backbone(images, masks)
        got = vit_only.model.vision_backbone(images, masks)
    # measured 0.019 relative (4 blocks, 32 wide); int4 g64 measured 0.18, hence int8
    assert float((got - ref).norm() / ref.norm()) <= 0.04


@pytest.mark.parametrize("quantize,preset", [(None, "default"), ("int8", "default"), ("int4", "small")])
def test_weights_plan_matches_what_load_builds(tiny_release, quantize, preset):
    from molmoe_lite.config import MolmoeConfig

    plan = weights_plan(MolmoeConfig.from_pretrained(tiny_release), torch.bfloat16, quantize, preset)
    model = load(tiny_release, device="cpu", dtype="bfloat16", quantize=quantize, preset=preset)
    sizes = {k: t.numel() * t.element_size() for k, t in model.state_dict().items()}
    on_cpu = sum(n for k, n in sizes.items() if k.startswith("model.transformer.wte."))
    assert plan["cpu_bytes"] == (on_cpu if preset == "small" else 0)
    assert plan["device_bytes"] + plan["cpu_bytes"] == sum(sizes.values())


def test_weights_plan_differences_by_hand_from_the_checkpoint(tiny_release):
    """Independent of the skeleton both plan and load build: the bytes int8 experts save and the
    bytes the small preset keeps on the CPU, counted from the checkpoint's own tensor shapes."""
    from molmoe_lite.config import MolmoeConfig
    from molmoe_lite.quantize.checkpoint import open_checkpoint

    with open_checkpoint(tiny_release) as reader:
        shapes = {k: reader.shape(k) for k in reader.keys()}
    experts = [s for k, s in shapes.items() if ".mlp.experts." in k]
    assert len(experts) == 2 * 8 * 3  # 2 layers, 8 experts, gate/up/down
    weights = sum(s[0] * s[1] for s in experts)
    # int8 per output channel: one byte a weight and one fp16 scale a row (gate and up fused)
    int8 = weights + 2 * sum(s[0] for s in experts)
    wte = sum(s[0] * s[1] for k, s in shapes.items() if k.startswith("model.transformer.wte."))
    cfg = MolmoeConfig.from_pretrained(tiny_release)
    plan = {q: weights_plan(cfg, torch.bfloat16, q) for q in (None, "int8")}
    assert plan[None]["device_bytes"] - plan["int8"]["device_bytes"] == weights * 2 - int8
    small = weights_plan(cfg, torch.bfloat16, "int8", "small")
    assert small["cpu_bytes"] == wte * 2


def test_weights_plan_at_full_size_by_hand():
    """The plan's differences between ways of loading, against byte counts written out from the
    release's sizes (architecture doc): 16 layers, 64 experts of 3 x 2048 x 1024, attention
    2048 x 6144 + 2048 x 2048, lm_head and wte 50304 x 2048 (+128 new rows), 23 ViT blocks of
    4 x 1024^2 + 2 x 4096 x 1024 weights."""
    from molmoe_lite.config import MolmoeConfig
    from molmoe_lite.testing import full_size_config_dict

    cfg = MolmoeConfig.from_dict(full_size_config_dict())
    bf16 = weights_plan(cfg, torch.bfloat16, None)["device_bytes"]
    int4 = weights_plan(cfg, torch.bfloat16, "int4")["device_bytes"]
    small = weights_plan(cfg, torch.bfloat16, "int4", "small")
    experts = 16 * 64 * 3 * 2048 * 1024
    assert bf16 - int4 == experts * 2 - experts * (4 + 2 * 16 / 64) // 8  # codes + fp16 scale and zero per 64
    attn, lm_head = 16 * (2048 * 6144 + 2048 * 2048), 50304 * 2048
    vit_rows, vit = 23 * (4 * 1024 + 4096 + 1024), 23 * (4 * 1024 * 1024 + 2 * 4096 * 1024)
    wte = (50304 + 128) * 2048 * 2
    int4_bytes = (attn + lm_head) * 2 - (attn + lm_head) * 9 // 16  # 4.5 bits per weight
    int8_bytes = vit * 2 - (vit + 2 * vit_rows)  # one byte a weight + an fp16 scale a row
    assert small["cpu_bytes"] == wte
    assert int4 - small["device_bytes"] == int4_bytes + int8_bytes + wte
    assert small["device_bytes"] / 2**30 == pytest.approx(3.868, abs=1e-3)  # quoted in the README


def test_unknown_preset_is_rejected(tiny_release):
    with pytest.raises(ValueError, match="preset"):
        load(tiny_release, device="cpu", preset="tiny")


def test_max_context_too_small_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="max_context"):
        tiny_model.generate(None, "Hello", max_new_tokens=5, max_context=8)


def test_max_context_larger_than_needed_gives_the_same_answer(tiny_model):
    a = tiny_model.generate(demo_image(), "Hello", max_new_tokens=6)
    b = tiny_model.generate(demo_image(), "Hello", max_new_tokens=6, max_context=1200)
    assert a == b


def test_fifty_prompts_keep_memory_flat_and_answers_identical(tiny_release):
    model = load(tiny_release, device="cpu", quantize="int4")
    image = demo_image()
    first = model.generate(image, "Describe this image.", max_new_tokens=4)
    for _ in range(4):  # let the allocator reach its steady state
        model.generate(image, "Describe this image.", max_new_tokens=4)
    base = _rss_kib()
    answers = [model.generate(image, "Describe this image.", max_new_tokens=4) for _ in range(50)]
    grown_mib = (_rss_kib() - base) / 1024
    assert set(answers) == {first}
    # the tiny model's whole working set is a few MiB per prompt: steady growth would show
    assert grown_mib < 32, f"resident memory grew by {grown_mib:.1f} MiB over 50 prompts"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "molmoe_lite.cli", *args], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ))


def test_cli_quantize_inspect_compare_and_points(tiny_release, tmp_path):
    dst = tmp_path / "int8"
    q = _cli("quantize", str(tiny_release), str(dst), "--bits", "8", "--dtype", "float32")
    assert q.returncode == 0, q.stderr
    assert (dst / "config.json").exists()
    again = _cli("quantize", str(tiny_release), str(dst), "--bits", "8")
    assert again.returncode == 2 and "Traceback" not in again.stderr  # refuses a non-empty DST

    info = _cli("inspect", str(dst), "--context", "2048")
    assert info.returncode == 0, info.stderr
    assert "int8" in info.stdout and "KV cache" in info.stdout
    assert "--preset default" in info.stdout and "--preset small" in info.stdout

    img = tmp_path / "scene.png"
    demo_image().save(img)
    cmp_ = _cli("compare", str(tiny_release), str(dst), "--image", str(img))
    assert cmp_.returncode == 0, cmp_.stderr
    assert "top-1 agreement" in cmp_.stdout and "KL" in cmp_.stdout

    out_png = tmp_path / "points.png"
    run = _cli("run", str(dst), "--image", str(img), "--max-new-tokens", "3", "--stats", "--points", str(out_png),
               "Point to the house.")
    assert run.returncode == 0, run.stderr
    assert "[stats]" in run.stderr and "tokens/s" in run.stderr
    assert out_png.exists()  # drawn even when the (random) answer holds no point
