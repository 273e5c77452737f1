"""Loading for the CPU: a float release larger than the process may map privately, the default
dtype and threads, the bf16 model's accuracy, and the experts' CPU layout after a load."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from molmoe_lite import api, load
from molmoe_lite.demo import demo_image
from molmoe_lite.errors import UsageError
from molmoe_lite.quantized import QuantizedExperts
from molmoe_lite.testing import tiny_config_dict, write_tiny_release

# big enough (about 50 MB of float32) that the process's own allocations are small beside it
BIG_CFG = tiny_config_dict(moe_num_experts=64, mlp_ratio=16)

_UNDER_LIMIT = textwrap.dedent("""
    import json, resource, sys, torch
    from molmoe_lite import load
    from molmoe_lite.processor import Processor  # imported before the baseline is taken
    from molmoe_lite.quantized import QuantizedExperts

    folder, path = sys.argv[1], sys.argv[1] + "/pytorch_model.bin"
    size = __import__("os").path.getsize(path)
    def vm_data():
        for line in open("/proc/self/status"):
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    limit = vm_data() + size * 9 // 10  # baseline + less than the file
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    result = {}
    try:  # the limit must bite: a private (writable, copy-on-write) mapping of the file is refused
        torch.load(path, mmap=True, weights_only=True)
        result["private_mapping"] = "allowed"
    except Exception as e:
        result["private_mapping"] = "refused: " + str(e).splitlines()[0][:200]
    model = load(folder, device="cpu", dtype="float32", quantize="int4", progress=False)
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(path):
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((lo, hi))
    tensors = list(model.parameters()) + list(model.buffers())
    for m in model.modules():
        if isinstance(m, QuantizedExperts):
            for w in (m.w13.cpu_weight, m.w2.cpu_weight):
                tensors += [w.packed, w.scale_zeros]
    views = [t.data_ptr() for t in tensors if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]
    result.update(loaded=True, views_of_file=len(views), tensors=len(tensors),
                  answer=isinstance(model.generate(None, "Hi", max_new_tokens=2), str))
    print(json.dumps(result))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA semantics are Linux's")
def test_float_release_quantised_on_the_fly_under_a_data_limit(tmp_path):
    """RLIMIT_DATA counts private writable mappings, not shared ones: with a limit of the
    process's baseline + 90% of the file, a private mapping of the .bin is refused, and load()
    (float32, quantize="int4") must still succeed, with no model tensor left on the file."""
    folder = write_tiny_release(tmp_path / "big", seed=0, cfg=BIG_CFG)
    proc = subprocess.run([sys.executable, "-c", _UNDER_LIMIT, str(folder)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["private_mapping"].startswith("refused"), result
    assert result["loaded"] and result["answer"] and result["tensors"] > 0
    assert result["views_of_file"] == 0, result


def test_default_dtype_follows_the_cpu(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(api, "cpu_has_fast_bf16", lambda: True)
    assert api.pick_dtype(None, cpu) == torch.bfloat16
    monkeypatch.setattr(api, "cpu_has_fast_bf16", lambda: False)
    assert api.pick_dtype(None, cpu) == torch.float32
    assert api.pick_dtype("bfloat16", cpu) == torch.bfloat16  # an explicit dtype wins


def test_threads_default_to_physical_cores_and_can_be_set():
    before = torch.get_num_threads()
    try:
        assert api.set_threads(None) == api.physical_cores() >= 1
        assert torch.get_num_threads() == api.physical_cores()
        assert api.set_threads(1) == 1 and torch.get_num_threads() == 1
        for bad in (0, -2, 1.5, True):
            with pytest.raises(UsageError, match="threads"):
                api.set_threads(bad)
    finally:
        torch.set_num_threads(before)


def test_loaded_experts_are_in_the_cpu_layout(tiny_release):
    """load() repacks every layer while reading: no stored-format buffers remain, and the
    state dict still has the checkpoint's keys, shapes and dtypes."""
    model = load(tiny_release, device="cpu", quantize="int4", progress=False)
    for block in model.model.transformer.blocks:
        experts = block.mlp.experts
        assert isinstance(experts, QuantizedExperts)
        for w in (experts.w13, experts.w2):
            assert w.cpu_weight is not None and w.qweight is None and w.scales is None
    state = model.state_dict()
    key = "model.transformer.blocks.0.mlp.experts.w13"
    qweight, scales, zeros = (state[f"{key}.{leaf}"] for leaf in ("qweight", "scales", "zeros"))
    e, two_i, h = model.model.transformer.blocks[0].mlp.experts.w13.shape
    assert qweight.shape == (e, two_i, h // 2) and qweight.dtype == torch.uint8
    assert scales.dtype == zeros.dtype == torch.float16


@pytest.mark.parametrize("bits", [4, 8], ids=["int4", "int8"])
def test_converted_experts_keep_no_copy_of_their_stored_scales(tiny_release, tmp_path, bits, monkeypatch):
    """Loaded from a converted folder, the CPU layout holds only what its kernels read (the
    stored fp16 scales are not kept), and state_dict() still gives the checkpoint's expert
    tensors back exactly, reading the scales again from the file: each file opened once for the
    whole dict (not once per weight), and none left open after it."""
    from collections import Counter

    from safetensors.torch import load_file

    from molmoe_lite.quantize import checkpoint
    from molmoe_lite.quantize.convert import convert

    folder = tmp_path / f"int{bits}"
    convert(tiny_release, folder, bits=bits, method="rtn", progress=False)
    model = load(folder, device="cpu", progress=False)
    for block in model.model.transformer.blocks:
        for w in (block.mlp.experts.w13, block.mlp.experts.w2):
            assert set(w.cpu_weight.tensors()) == set(w.cpu_weight.kernel_tensors())
    stored = {}
    for shard in sorted(folder.glob("*.safetensors")):
        stored.update(load_file(shard))
    opened, closed, really_open = Counter(), Counter(), checkpoint._open_safetensors

    class Counted:  # a safetensors handle that counts its opening and its release
        def __init__(self, path):
            self.path, self.handle = path, really_open(path)
            opened[path] += 1

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def __del__(self):
            closed[self.path] += 1

    monkeypatch.setattr(checkpoint, "_open_safetensors", Counted)
    for _ in range(2):  # a second dict reads the files again: nothing was kept from the first
        opened.clear(), closed.clear()
        state = model.state_dict()
        assert opened and set(opened.values()) == {1} and closed == opened, (opened, closed)
        experts = [k for k in stored if ".mlp.experts." in k]
        assert len(experts) == len(model.model.transformer.blocks) * 2 * (3 if bits == 4 else 2)
        for key in experts:
            assert state[key].dtype == stored[key].dtype and torch.equal(state[key], stored[key]), key


def test_bfloat16_model_stays_close_to_float32(tiny_release, tiny_model):
    """The tiny random model in bfloat16 (what CPUs with native bf16 load by default) against
    float32: whole-sequence logits with one image, float experts."""
    inputs = tiny_model.processor.process(images=demo_image(), text="Describe this image.")
    bf16 = load(tiny_release, device="cpu", dtype="bfloat16", progress=False)
    with torch.no_grad():
        got = bf16(**inputs)[0].float()
        ref = tiny_model(**inputs)[0].float()
    rel = float((got - ref).norm() / ref.norm())
    agree = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
    print(f"bf16 vs fp32: relative error {rel:.4f}, top-1 agreement {agree:.3f}")
    assert rel <= 0.05 and agree >= 0.9, (rel, agree)
