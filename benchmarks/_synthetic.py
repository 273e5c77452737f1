"""Random-weight MolmoE models for the GPU benchmarks (no checkpoint files needed).

Method: build ``MolmoE`` on the meta device (no memory, no init), materialise it where it
will run with ``to_empty`` and fill every tensor in place on that device: matrices
N(0, 1/fan_in) so activations stay O(1) through the 16 layers, norm weights 1, biases and
other vectors 0; quantised modules get random codes with scales sized so the dequantised
weights have that same spread. Timing and memory do not depend on the values, only on
shapes and dtypes, so this measures the real model without the 14 GB release download.

Also here: the tiny tokenizer + release preprocessor config (same image-token layout as
the release's tokenizer), swapping decoder linears for ``QuantizedLinear`` or bitsandbytes
NF4 ``Linear4bit``, and byte counts of what a decode step reads.

Used by the benchmarks beside it (benchmarks/ is not part of the package).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from molmoe_lite.config import MolmoeConfig
from molmoe_lite.quantized import held_tensors
from molmoe_lite.testing import full_size_config_dict, tiny_config_dict

# std of the code values (uniform over the code range) used to size random scales
_CODE_STD = {4: math.sqrt((16**2 - 1) / 12), 8: math.sqrt((255**2 - 1) / 12)}


def make_config(size: str = "full") -> MolmoeConfig:
    """The release's sizes (``full``) or the tests' tiny sizes (``tiny``, for CPU smoke runs)."""
    return MolmoeConfig.from_dict(full_size_config_dict() if size == "full" else tiny_config_dict())


def _materialise(model: nn.Module, device: torch.device, cpu_modules: Iterable[str] = ()) -> None:
    """``to_empty`` module by module: modules under a ``cpu_modules`` prefix go to the CPU."""
    cpu_modules = tuple(cpu_modules)
    for name, mod in model.named_modules():
        on_cpu = any(name == p or name.startswith(p + ".") for p in cpu_modules)
        mod.to_empty(device="cpu" if on_cpu else device, recurse=False)


@torch.no_grad()
def fill_random_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter and quantised buffer of a materialised model in place."""
    from molmoe_lite.quantized import QuantizedTensor

    gens: dict[torch.device, torch.Generator] = {}

    def gen(dev: torch.device) -> torch.Generator:
        if dev not in gens:
            gens[dev] = torch.Generator(device=dev).manual_seed(seed)
        return gens[dev]

    quantised = set()
    for mod in model.modules():
        if isinstance(mod, QuantizedTensor):
            _fill_quantized_(mod, gen(mod.qweight.device))
            quantised.update(id(t) for t in mod.buffers())
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0, p.shape[-1] ** -0.5, generator=gen(p.device))
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    for b in model.buffers():
        if id(b) not in quantised and b.is_floating_point():
            b.zero_()
    return model


def _fill_quantized_(mod, g: torch.Generator) -> None:
    """Random codes; scales so dequantised weights have std 1/sqrt(K); int4 zero at mid-range."""
    k = mod.shape[-1]
    if mod.bits == 4:
        mod.qweight.random_(0, 256, generator=g)
        mod.zeros.fill_(7.5)
    else:
        mod.qweight.random_(-127, 128, generator=g)
    mod.scales.fill_(k**-0.5 / _CODE_STD[mod.bits])


def random_expert_stack(bits: int, experts: int, n: int, k: int, device: torch.device,
                        gen: torch.Generator, group_size: int | None = 64):
    """A random format-v1 ``QuantizedWeight`` [experts, n, k] (group ``group_size``; None: per
    channel), filled like ``_fill_quantized_``; for the kernel benchmarks."""
    from molmoe_lite.quantize.format import QuantizedWeight

    g = min(group_size or k, k)
    if bits == 4:
        qw = torch.randint(0, 256, (experts, n, k // 2), dtype=torch.uint8, device=device, generator=gen)
        zeros = torch.full((experts, n, k // g), 7.5, dtype=torch.float16, device=device)
    else:
        qw = torch.randint(-127, 128, (experts, n, k), dtype=torch.int8, device=device, generator=gen)
        zeros = None
    scales = torch.full((experts, n, k // g), k**-0.5 / _CODE_STD[bits], dtype=torch.float16, device=device)
    return QuantizedWeight(qw, scales, zeros, bits, g, (experts, n, k))


def build_model(
    cfg: MolmoeConfig,
    device: str | torch.device = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    quantized: Iterable[str] = (),
    bits: int = 4,
    group_size: int | None = 64,
    small: bool = False,
    seed: int = 0,
):
    """A random-weight ``MolmoE`` on ``device``.

    ``quantized``: modules built directly as quantised ones (``api.quantize_structure``
    names: "experts", "attention", "lm_head"), so no dense copy ever exists: what a
    quantised checkpoint's ``load()`` gives. Empty: the dense model.
    ``small``: also the ``small`` preset's structure (api.SMALL_PRESET's quantised linears,
    api.SMALL_CPU_MODULES in CPU memory), as ``load(preset="small")`` builds it.
    """
    from molmoe_lite.api import SMALL_CPU_MODULES, quantize_structure, small_preset_structure
    from molmoe_lite.model.molmoe import MolmoE

    with torch.device("meta"):
        model = MolmoE(cfg, dtype=dtype)
    quantized = list(quantized)
    if quantized:
        quantize_structure(model, bits, group_size, quantized)
    if small:
        small_preset_structure(model)
    _materialise(model, torch.device(device), SMALL_CPU_MODULES if small else ())
    fill_random_(model, seed)
    return model.eval()


def tiny_processor(folder: str | Path):
    """A Processor with the tiny tokenizer and the release's preprocessor config.

    The image-token layout (crops, <im_patch>/<im_col> tokens) comes from the preprocessor
    config, so prompt lengths match the release's to within the text tokens.
    """
    from molmoe_lite.processor import PreprocessorConfig, Processor
    from molmoe_lite.testing import write_tiny_tokenizer

    folder = Path(folder)
    write_tiny_tokenizer(folder)
    PreprocessorConfig().save(folder)
    return Processor.from_pretrained(folder)


# ---------------------------------------------------------------------------------------
# Swapping linears
# ---------------------------------------------------------------------------------------
def nf4_unavailable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why bitsandbytes NF4 cannot run on ``device`` (None when it can). Importable is not
    enough (a wheel may lack the binary for this CUDA), so a tiny quantise + matmul is tried."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf

        w = torch.randn(64, 64, device=device).to(dtype)
        q, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
        bnb.matmul_4bit(torch.randn(1, 64, device=device).to(dtype), q.t(), quant_state=state)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # missing, or no binary for this platform
        return f"bitsandbytes NF4 unavailable ({type(exc).__name__}: {exc})"[:300]
    return None


@torch.no_grad()
def nf4_linears(model, modules: Iterable[str] = ("attention", "experts"), blocksize: int = 64) -> list[str]:
    """Swap float linears for bitsandbytes NF4 ``Linear4bit`` (blocksize 64, no double quant), in place.

    Raises ImportError when bitsandbytes is missing. The compute dtype is the model's.
    """
    import bitsandbytes as bnb

    from molmoe_lite.api import float_linears

    replaced = []
    dtype = model.compute_dtype
    for parent, attr, name in list(float_linears(model, modules)):
        old = getattr(parent, attr)
        new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=False, compute_dtype=dtype,
                                compress_statistics=False, quant_type="nf4", device="meta")
        weight = bnb.nn.Params4bit(old.weight.data, requires_grad=False, blocksize=blocksize,
                                   compress_statistics=False, quant_type="nf4")
        new.weight = weight.to(old.weight.device)  # quantises on that device
        setattr(parent, attr, new)
        replaced.append(name)
    return replaced


# ---------------------------------------------------------------------------------------
# Byte counts
# ---------------------------------------------------------------------------------------
def _quant_state_bytes(qs) -> int:
    """Bytes bitsandbytes reads besides the packed weight: absmax (+ nested statistics)."""
    n = 0
    for attr in ("absmax", "code"):
        t = getattr(qs, attr, None)
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    nested = getattr(qs, "state2", None)
    return n + (_quant_state_bytes(nested) if nested is not None else 0)


def module_bytes(mod: nn.Module, device_type: str | None = None) -> int:
    """Bytes of every parameter and buffer of ``mod`` (each tensor once) that a forward reads, NF4
    statistics and the CPU kernels' packed experts (held beside the buffers) included; only those
    on ``device_type`` ("cuda", "cpu") when given."""
    n = 0
    for t in held_tensors(mod, read_only=True):
        if device_type is not None and t.device.type != device_type:
            continue
        n += t.numel() * t.element_size()
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            n += _quant_state_bytes(qs)
    return n


def decode_weight_bytes(model, batch: int) -> tuple[int, int]:
    """(bytes of weights one decode step reads, experts per layer assumed) at ``batch`` rows.

    Non-expert decoder weights (attention, norms, router), ln_f, the lm_head, ``batch``
    embedding rows, and per layer the bytes of the experts the rows pick: exactly top_k at
    batch 1; at batch > 1 the expected size of the union when rows route independently and
    uniformly, E * (1 - (1 - K/E)^B) (26.5 of 64 for K = 8, B = 4), returned rounded.
    The vision backbone is not read while decoding.
    """
    cfg = model.config
    t = model.model.transformer
    e, k = cfg.moe_num_experts, cfg.moe_top_k
    n_exp = k if batch == 1 else e * (1 - (1 - k / e) ** batch)
    total = 0
    for block in t.blocks:
        total += module_bytes(block.attn) + module_bytes(block.mlp.ff_norm) + module_bytes(block.mlp.gate)
        total += int(module_bytes(block.mlp.experts) * n_exp / e)
    emb = t.wte.embedding
    total += module_bytes(t.ln_f) + module_bytes(model.lm_head) + batch * emb.shape[1] * emb.element_size()
    return total, round(n_exp, 1)


def kv_bytes_per_token(model) -> int:
    """Bytes of keys + values one cached token holds over all layers (per sequence)."""
    cfg = model.config
    itemsize = torch.finfo(model.compute_dtype).bits // 8
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * itemsize


def gpu_bytes(model) -> int:
    """Bytes of the model's parameters and buffers that live on a CUDA device."""
    return module_bytes(model, "cuda")
