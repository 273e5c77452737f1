"""Who decides what, on the kernel side: whether the kernels run for a tensor, which expert
kernels a token count picks, and the down kernel's arrival counters around a CUDA graph capture.

The rule is checked on named cases of device, interpreter and triton; the modules that follow it
are checked where the answer matters (a forced kernel on a CPU tensor with the interpreter off
must refuse, not hand CPU pointers to compiled Triton). The capture case mocks the capture
state on the CPU: counters first needed inside a capture are refused (their zero-fill would only
be recorded), counters made before it are reused.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from molmoe_lite.errors import MolmoeLiteError  # noqa: E402
from molmoe_lite.kernels import availability  # noqa: E402
from molmoe_lite.kernels.availability import KernelsUnavailableError, use_kernels  # noqa: E402


class FakeTensor:
    """Only what the rule reads: a device (a CUDA one is needed on a CPU-only machine)."""

    def __init__(self, device: str):
        self.device = torch.device(device)


# name -> (device, TRITON_INTERPRET, triton installed, cuda available, setting, on_cpu_by_default, want)
RULE_CASES = {
    "cuda_default": ("cuda", "0", True, True, None, False, True),
    "cuda_without_triton": ("cuda", "0", False, True, None, False, False),
    "cuda_off": ("cuda", "0", True, True, False, False, False),
    "cpu_default_runtime": ("cpu", "1", True, False, None, False, False),
    "cpu_default_kernel_api": ("cpu", "1", True, False, None, True, True),
    "cpu_forced_interpreted": ("cpu", "1", True, False, True, False, True),
    "cpu_kernel_api_no_interpreter": ("cpu", "0", True, True, None, True, False),
    "cpu_forced_no_interpreter": ("cpu", "0", True, True, True, False, KernelsUnavailableError),
    "cuda_forced_without_triton": ("cuda", "0", False, True, True, False, KernelsUnavailableError),
}


@pytest.mark.parametrize("case", RULE_CASES.values(), ids=RULE_CASES.keys())
def test_use_kernels_rule(case, monkeypatch):
    device, interpret, has_triton, has_cuda, setting, cpu_default, want = case
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(availability, "HAS_TRITON", has_triton)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    tensor = FakeTensor(device)
    if want is KernelsUnavailableError:
        with pytest.raises(KernelsUnavailableError, match=device):
            use_kernels(tensor, setting, on_cpu_by_default=cpu_default)
    else:
        assert use_kernels(tensor, setting, on_cpu_by_default=cpu_default) is want


def test_kernels_unavailable_is_a_package_error():
    assert issubclass(KernelsUnavailableError, MolmoeLiteError)


def _norm_module():
    from molmoe_lite.model.layers import RMSNorm

    return RMSNorm(8, 1e-5)


def _linear_module():
    from molmoe_lite.quantized import QuantizedLinear

    return QuantizedLinear.from_linear(torch.nn.Linear(64, 16), bits=8, group_size=None)


@pytest.mark.parametrize("make", [_norm_module, _linear_module], ids=["rms_norm", "quantized_linear"])
def test_forced_kernels_on_cpu_without_interpreter_refuse(make, monkeypatch):
    """As on a GPU machine (the interpreter off): a module forced onto the kernels with a CPU
    input refuses with one clear error instead of handing CPU pointers to compiled Triton."""
    module = make()
    x = torch.randn(2, module.weight.shape[0] if hasattr(module, "eps") else 64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    module.use_kernels = True
    with pytest.raises(KernelsUnavailableError, match="cpu tensor"):
        module(x)
    module.use_kernels = None  # the default on a CPU tensor: the torch code, no error
    assert module(x).shape[0] == 2


def test_one_token_count_dispatch():
    """Decode kernels up to the config's decode_max_tokens, grouped kernels above; both offer the
    same interface, which moe_experts and quantized_linear both go through."""
    from molmoe_lite.kernels import moe_gemv, moe_grouped
    from molmoe_lite.kernels.fused_moe import expert_path

    cfg = {"decode_max_tokens": 4}
    assert expert_path(1, cfg) is moe_gemv and expert_path(4, cfg) is moe_gemv
    assert expert_path(5, cfg) is moe_grouped
    for module in (moe_gemv, moe_grouped):
        assert callable(module.moe) and callable(module.linear)


@pytest.fixture
def capturing(monkeypatch):
    """A switch that makes the kernels believe a CUDA graph is being captured on this stream."""
    from molmoe_lite.kernels import moe_gemv

    state = {"on": False}
    monkeypatch.setattr(moe_gemv, "_ARRIVALS", {})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: state["on"])
    return state


def test_arrival_counters_never_created_inside_a_capture(capturing):
    from molmoe_lite.kernels import moe_gemv

    capturing["on"] = True
    with pytest.raises(moe_gemv.GraphCaptureError, match="capture"):
        moe_gemv._arrival_counters(torch.device("cpu"), 6)
    assert not moe_gemv._ARRIVALS, "nothing may be kept from inside a capture"
    capturing["on"] = False
    made = moe_gemv._arrival_counters(torch.device("cpu"), 6)  # the warm-up, outside any capture
    assert made.dtype == torch.int32 and not made.any()
    capturing["on"] = True
    assert moe_gemv._arrival_counters(torch.device("cpu"), 6) is made  # reused inside the capture


@pytest.mark.skipif(torch.cuda.is_available(), reason="mocks the capture state of a CPU run")
def test_split_down_kernel_refused_then_reused_around_a_capture(capturing):
    """The split down kernel (interpreted): first launched under a (mocked) capture it refuses;
    after an eager warm-up the same launch under the capture works and gives the same output."""
    from molmoe_lite.kernels import moe_gemv
    from molmoe_lite.kernels.reference import moe_reference, route
    from molmoe_lite.quantize.format import quantize_weight

    g = torch.Generator().manual_seed(0)
    e, h, inter, top_k = 4, 32, 16, 2
    w13 = quantize_weight(torch.randn(e, 2 * inter, h, generator=g) / h ** 0.5, bits=4, group_size=16)
    w2 = quantize_weight(torch.randn(e, h, inter, generator=g) / inter ** 0.5, bits=4, group_size=16)
    x = torch.randn(1, h, generator=g)
    weights, ids = route(torch.randn(1, e, generator=g), top_k)
    ids = ids.to(torch.int32)
    act = moe_gemv.gate_up_gemv(x, ids, w13, {"BLOCK_N": 16, "BLOCK_K": 32, "num_warps": 1, "num_stages": 1})
    cfg = {"BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 1, "num_stages": 1, "EXPERT_SPLIT": 2}
    capturing["on"] = True
    with pytest.raises(moe_gemv.GraphCaptureError):
        moe_gemv.down_gemv(act, weights, ids, w2, torch.float32, cfg)
    capturing["on"] = False
    eager = moe_gemv.down_gemv(act, weights, ids, w2, torch.float32, cfg)
    capturing["on"] = True
    captured = moe_gemv.down_gemv(act, weights, ids, w2, torch.float32, cfg)
    ref = moe_reference(x, weights, ids, w13, w2)
    assert torch.equal(eager, captured)
    assert float((captured - ref).norm() / ref.norm()) <= 1e-3
    assert not any(c.any() for c in moe_gemv._ARRIVALS.values()), "arrival counters not reset"
