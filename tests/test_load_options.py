"""``load()``'s options: quantisation requests, dtype names, defaults, presets on converted folders.

Each test loads the session's tiny release (or its int4 conversion) and checks what the
caller asked for is what the model holds, or that a wrong request is a one-line error naming
the option, raised before any weights are read.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from molmoe_lite import load
from molmoe_lite.config import ConfigError
from molmoe_lite.errors import UsageError
from molmoe_lite.quantized import QuantizedExperts, QuantizedLinear


@pytest.fixture(scope="module")
def int4_folder(tiny_release, tmp_path_factory):
    from molmoe_lite.quantize.convert import convert

    out = tmp_path_factory.mktemp("load-options") / "int4"
    convert(tiny_release, out, bits=4, method="rtn", progress=False)
    return out


def test_quantize_on_an_already_quantised_folder_is_refused(int4_folder):
    with pytest.raises(UsageError, match=r"already quantised; load it without --quantize \(quantize=None\)"):
        load(int4_folder, device="cpu", quantize="int8")


def test_a_foreign_quant_method_is_refused_by_name(int4_folder, tmp_path):
    folder = tmp_path / "foreign"
    shutil.copytree(int4_folder, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="quant_method is 'bitsandbytes'"):
        load(folder, device="cpu")


@pytest.mark.parametrize(
    "name, dtype",
    [("float32", torch.float32), ("fp32", torch.float32), ("FP32", torch.float32),
     ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float16", torch.float16),
     ("fp16", torch.float16), (torch.bfloat16, torch.bfloat16)],
    ids=["float32", "fp32", "upper-case", "bfloat16", "bf16", "float16", "fp16", "torch-dtype"],
)
def test_dtype_names_and_aliases(tiny_release, name, dtype):
    model = load(tiny_release, device="cpu", dtype=name)
    assert model.compute_dtype == dtype
    assert model.lm_head.weight.dtype == dtype
    assert model.model.transformer.wte.embedding.dtype == dtype


@pytest.mark.parametrize(
    "kwargs, message",
    [({"dtype": "int8"}, "dtype 'int8'"), ({"dtype": "half-ish"}, "dtype 'half-ish'"),
     ({"quantize": "int3"}, "quantize must be one of"), ({"quantize": "INT4"}, "quantize must be one of"),
     ({"preset": "tiny"}, "preset must be one of")],
    ids=["dtype-int8", "dtype-unknown", "quantize-int3", "quantize-upper-case", "preset-unknown"],
)
def test_invalid_options_are_usage_errors(tiny_release, kwargs, message):
    with pytest.raises(UsageError, match=message):
        load(tiny_release, device="cpu", **kwargs)


@pytest.mark.parametrize(
    "device, message",
    [("tpu", "device 'tpu' is not a device torch knows"),
     pytest.param("cuda", "device 'cuda': CUDA is not available here",
                  marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here"))],
    ids=["unknown-device", "cuda-without-cuda"],
)
def test_unusable_devices_are_usage_errors(tiny_release, device, message):
    with pytest.raises(UsageError, match=message):
        load(tiny_release, device=device)


def test_default_device_and_dtype(tiny_release):
    model = load(tiny_release)
    if torch.cuda.is_available():
        assert model.device.type == "cuda"
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        assert model.device.type == "cpu"
        want = torch.float32
    assert model.compute_dtype == want and model.lm_head.weight.dtype == want


def test_small_preset_on_a_converted_checkpoint(int4_folder):
    plain = load(int4_folder, device="cpu")
    small = load(int4_folder, device="cpu", preset="small")
    for model in (plain, small):
        assert all(isinstance(b.mlp.experts, QuantizedExperts) for b in model.model.transformer.blocks)
    # the stored int4 experts are the same tensors either way
    experts = [k for k in plain.state_dict() if ".mlp.experts." in k]
    assert experts and all(torch.equal(plain.state_dict()[k], small.state_dict()[k]) for k in experts)
    # small adds int4 attention and lm_head, int8 ViT, and keeps the token table in CPU memory
    assert isinstance(small.lm_head, QuantizedLinear) and small.lm_head.bits == 4
    assert all(isinstance(b.attn.att_proj, QuantizedLinear) for b in small.model.transformer.blocks)
    assert not isinstance(plain.lm_head, QuantizedLinear)
    rb = small.model.vision_backbone.image_vit.transformer.resblocks[0]
    assert isinstance(rb.feed_forward.w1, QuantizedLinear) and rb.feed_forward.w1.bits == 8
    assert small.model.transformer.wte.embedding.device.type == "cpu"
    inputs = plain.processor.process(images=None, text="Describe this image.")
    with torch.no_grad():
        a, b = plain(**inputs)[0], small(**inputs)[0]
    # more int4 rounding on top of the stored int4 experts: close, not equal
    assert 0 < float((b - a).norm() / a.norm()) <= 0.25


def test_fp32_on_the_cpu_keeps_the_stored_bf16_table_and_vit(int4_folder):
    """An fp32 model on the CPU holds the token table and the vision backbone in the
    checkpoint's bf16 (half the memory) and widens them as they run: every logit equals the
    same model's with those weights widened to fp32 beforehand."""
    from molmoe_lite.demo import demo_image

    model = load(int4_folder, device="cpu", dtype="float32")
    kept = ("model.transformer.wte.", "model.vision_backbone.")
    by_dtype = {n: p.dtype for n, p in model.named_parameters()}
    assert {n for n, d in by_dtype.items() if d == torch.bfloat16} == {n for n in by_dtype if n.startswith(kept)}
    assert any(n.startswith(kept[1]) for n in by_dtype) and any(n.startswith(kept[0]) for n in by_dtype)
    assert {d for n, d in by_dtype.items() if not n.startswith(kept)} == {torch.float32}
    inputs = model.processor.process(images=demo_image(), text="Describe this image.")
    batch = {k: v[None] for k, v in inputs.items()}
    with torch.no_grad():
        narrow = model(**batch)
        model.model.vision_backbone.float()
        model.model.transformer.wte.float()
        wide = model(**batch)
    assert narrow.dtype == torch.float32
    assert torch.equal(narrow, wide)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("preset", ["default", "small"])
def test_a_cpu_load_holds_no_view_of_the_checkpoint_file(int4_folder, preset, monkeypatch):
    """Every tensor of a model loaded from a converted folder (bf16 float parts, float32 model on
    the CPU) is its own memory, the ones kept as stored included: a view would keep the file's
    whole mapping alive, and with it every page the load touched. The reader copies tensors
    that start off a 64-byte boundary, which would hide a view by chance: here it copies none."""
    from molmoe_lite.quantize import checkpoint
    from molmoe_lite.quantized import held_tensors

    monkeypatch.setattr(checkpoint, "_ALIGN", 1)

    model = load(int4_folder, device="cpu", dtype="float32", preset=preset, progress=False)
    files = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith(str(int4_folder)):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                files.append((start, end, fields[5]))
    views = [tuple(t.shape) for t in held_tensors(model)
             if t.numel() and any(a <= t.data_ptr() < b for a, b, _ in files)]
    assert not views, f"{len(views)} tensors are views of {sorted({p for *_, p in files})}"


@pytest.mark.parametrize(
    "source, quantize, preset",
    [("release", None, "default"), ("release", "int4", "default"), ("release", "int8", "small"),
     ("int4", None, "default"), ("int4", None, "small")],
    ids=["fp32-release", "fp32-release-int4-on-the-fly", "fp32-release-int8-small", "bf16-converted",
         "bf16-converted-small"],
)
def test_weights_plan_on_the_cpu_in_float32_is_what_load_holds(tiny_release, int4_folder, source, quantize, preset):
    """A float32 model on the CPU holds the token table and ViT in the checkpoint's own dtype
    (bf16 in a converted folder, fp32 in the release) and its quantised experts in the CPU
    kernels' layout (plus the fp16 scales when quantised while loading): the plan counts the
    bytes of every tensor the loaded model holds, and the token table as CPU memory."""
    from molmoe_lite.api import weights_plan
    from molmoe_lite.config import MolmoeConfig
    from molmoe_lite.quantized import held_tensors

    folder = tiny_release if source == "release" else int4_folder
    model = load(folder, device="cpu", dtype="float32", quantize=quantize, preset=preset, progress=False)
    plan = weights_plan(MolmoeConfig.from_pretrained(folder), torch.float32, quantize, preset, folder, device="cpu")
    assert plan["device_bytes"] + plan["cpu_bytes"] == sum(t.numel() * t.element_size() for t in held_tensors(model))
    table = sum(t.numel() * t.element_size() for t in model.model.transformer.wte.parameters())
    assert plan["cpu_bytes"] == (table if preset == "small" else 0)
