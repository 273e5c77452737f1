"""Images/s of ``molmoe_lite.batch.run`` at several batch sizes; prints one JSON line.

Model: on CUDA, the release's sizes with random weights and int4 experts (built directly
quantised, as a quantised checkpoint loads: ``_synthetic.build_model``), bfloat16; without
CUDA, the tests' tiny config on the CPU in float32 (``--size`` overrides). The processor is
the tiny tokenizer with the release's preprocessor config, so prompts have the release's
image-token layout. Images: ``--images`` copies of one synthetic scene (``--image-size``),
written as PNG files into a temporary folder, answered greedily with ``--max-new-tokens``
(random weights rarely say end-of-text, so every row decodes about the same length and the
batch sizes do the same work). Each batch size first answers one warm-up batch (kernel
compilation, CUDA-graph capture), then the whole folder into a fresh output file; images/s
is the run's own summary (answering time, model building excluded).

Record: ``images_per_s`` per batch size, ``speedup`` of each over batch 1, and on CUDA at
full size the target ``batch 8 >= 4x batch 1`` as ``target_met``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _synthetic beside this file

from _synthetic import build_model, make_config, tiny_processor  # noqa: E402

TARGET_SPEEDUP = 4.0  # batch 8 over batch 1, full size on a GPU


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-sizes", default="1,4,8", help="comma-separated (default %(default)s)")
    p.add_argument("--images", type=int, default=None, help="images per run (default: 32 on CUDA, 8 on the CPU)")
    p.add_argument("--image-size", default="640x480", help="WxH of the synthetic images (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 on CUDA, 8 on the CPU")
    p.add_argument("--size", choices=["full", "tiny"], default=None, help="model size (default: full on CUDA, else tiny)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    args.device = "cuda" if cuda else "cpu"
    args.size = args.size or ("full" if cuda else "tiny")
    args.images = args.images or (32 if cuda else 8)
    args.max_new_tokens = args.max_new_tokens or (64 if cuda else 8)
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
        args.width, args.height = (int(v) for v in args.image_size.lower().split("x"))
    except ValueError:
        p.error("--batch-sizes takes integers like 1,4,8 and --image-size one like 640x480")
    return args


def _model(args: argparse.Namespace, folder: Path):
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    quantized = ["experts"] if args.size == "full" else []
    model = build_model(make_config(args.size), args.device, dtype, quantized=quantized, bits=4, seed=args.seed)
    model.processor = tiny_processor(folder)
    return model


def main(argv: list[str] | None = None) -> int:
    from molmoe_lite.batch import run
    from molmoe_lite.demo import demo_image

    args = _args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = tmp / "images"
        images.mkdir()
        scene = demo_image(args.width, args.height)
        for i in range(args.images):
            scene.save(images / f"{i:04d}.png")
        model = _model(args, tmp / "processor")
        rates = {}
        for b in args.batch_sizes:
            warm = [{"id": f"w{i}", "image": str(images / "0000.png")} for i in range(b)]
            run(model, warm, tmp / f"warm{b}.jsonl", max_new_tokens=args.max_new_tokens, batch_size=b, progress=False)
            summary = run(model, images, tmp / f"out{b}.jsonl", max_new_tokens=args.max_new_tokens,
                          batch_size=b, progress=False)
            if summary.failed:
                raise RuntimeError(f"{summary.failed} images failed at batch {b}: see {tmp}/out{b}.jsonl")
            rates[str(b)] = round(summary.images_per_s, 3)
            print(f"[bench_batch] batch {b}: {summary.images_per_s:.3f} images/s", file=sys.stderr)
    base = rates.get("1")
    record = {
        "bench": "batch",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({platform.machine()}, "
                  f"{torch.get_num_threads()} threads)",
        "model": "full-size synthetic, int4 experts, bf16" if args.size == "full" else "tiny config, float32",
        "images": args.images, "image_size": f"{args.width}x{args.height}", "max_new_tokens": args.max_new_tokens,
        "images_per_s": rates,
        "speedup": {b: round(r / base, 2) for b, r in rates.items()} if base else None,
        "target_met": (rates["8"] / base >= TARGET_SPEEDUP
                       if args.device == "cuda" and args.size == "full" and base and "8" in rates else None),
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
