"""Stages of ``gpu_check.sh``; each prints one JSON line and writes it to OUT/<stage>.json.

- ``env``: the device and software versions.
- ``tests-summary``: counts from the CUDA test run's junit XML.
- ``bandwidth``: device-to-device copy of a 1 GiB buffer, timed with CUDA events; bytes
  counted as read + written, the ceiling every bandwidth fraction is taken against.
- ``dense-model``: the dense (unquantised) MolmoE at the release's sizes with random
  weights in bfloat16: time to first token for one 1920x1080 image (processor, ViT,
  prefill of ~1,200 tokens) and decode tokens/s at batch 1 with the static KV cache.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch


def _write(out: Path, stage: str, record: dict) -> None:
    record = {"stage": stage, **record}
    (out / f"{stage.replace('-', '_')}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"


def stage_env(out: Path) -> None:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    rec = {
        "device": _device_name(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        rec.update(capability=f"sm_{p.major}{p.minor}", sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    _write(out, "env", rec)


def stage_tests_summary(out: Path) -> None:
    xml = out / "cuda_tests.xml"
    if not xml.exists():
        _write(out, "tests-summary", {"device": _device_name(), "error": "no junit xml (the test run did not finish)"})
        return
    root = ET.parse(xml).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{c.get('classname')}::{c.get('name')}"
        for c in suite.iter("testcase")
        if c.find("failure") is not None or c.find("error") is not None
    ]
    _write(out, "tests-summary", {"device": _device_name(), **counts, "failed": failed})


def _time_cuda(fn, iters: int) -> float:
    """Mean milliseconds per call, CUDA events around ``iters`` calls after a warm-up."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def stage_bandwidth(out: Path) -> None:
    n = 2**30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = _time_cuda(lambda: dst.copy_(src), 20)
    _write(out, "bandwidth", {"device": _device_name(), "bytes": n, "ms": ms, "copy_gbps": 2 * n / ms / 1e6})


@torch.inference_mode()
def stage_dense_model(out: Path, new_tokens: int = 32) -> None:
    from molmoe_lite.config import MolmoeConfig
    from molmoe_lite.demo import demo_image
    from molmoe_lite.model.molmoe import MolmoE
    from molmoe_lite.processor import PreprocessorConfig, Processor
    from molmoe_lite.tiny import full_size_config_dict, write_config
    from molmoe_lite.tokenizer import write_tiny_tokenizer
    from molmoe_lite.processor import PreprocessorConfig

    cfg = MolmoeConfig.from_dict(full_size_config_dict())
    dtype = torch.bfloat16
    with torch.device("meta"):
        model = MolmoE(cfg, dtype=dtype)
    model = model.to_empty(device="cuda").to(dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0, p.shape[-1] ** -0.5, generator=gen)
        else:
            p.fill_(1.0) if name.endswith("weight") else p.zero_()
    model.eval()
    # token ids only need the right layout; a tiny tokenizer gives the same image-token count
    folder = out / "_tokenizer"
    write_tiny_tokenizer(folder)
    PreprocessorConfig().save(folder)
    proc = Processor.from_pretrained(folder)
    image = demo_image(1920, 1080)

    def prefill():
        inputs = proc.process(images=image, text="Describe this image.")
        batch = {k: v[None].cuda() for k, v in inputs.items()}
        cache = model.new_cache(1, batch["input_ids"].shape[1] + new_tokens)
        logits = model(**batch, cache=cache, logits_at="last")
        return batch, cache, logits

    prefill()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    batch, cache, logits = prefill()
    tok = logits[:, -1].argmax(-1)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    mask = batch["input_ids"] != -1
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        tok = model(tok[:, None], attention_mask=mask, cache=cache, logits_at="last")[:, -1].argmax(-1)
    torch.cuda.synchronize()
    decode_s = time.perf_counter() - t0
    _write(
        out,
        "dense-model",
        {
            "device": _device_name(),
            "provider": "dense-bf16-python-expert-loop",
            "prompt_tokens": int(batch["input_ids"].shape[1]),
            "crops": int(batch["images"].shape[1]),
            "ttft_s": ttft,
            "decode_tokens_per_s": (new_tokens - 1) / decode_s,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["env", "tests-summary", "bandwidth", "dense-model"])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    needs_gpu = args.stage in ("bandwidth", "dense-model")
    if needs_gpu and not torch.cuda.is_available():
        _write(args.out, args.stage, {"device": _device_name(), "skipped": "no CUDA device"})
        return
    {"env": stage_env, "tests-summary": stage_tests_summary, "bandwidth": stage_bandwidth, "dense-model": stage_dense_model}[args.stage](args.out)


if __name__ == "__main__":
    main()
