"""The ``molmoe-lite`` command: thin wrappers over the Python API.

Subcommands: ``run`` (answer a prompt about images, streaming), ``quantize``
(release checkpoint -> compact int4/int8 checkpoint), ``inspect`` (what a checkpoint
holds and the GPU memory it needs), ``compare`` (float vs quantised logits on a
user's image), ``batch`` (a folder or JSONL/CSV of images into a resumable JSONL), ``demo``
(the offline tiny-model demo), ``serve`` (an OpenAI-compatible HTTP server and a web page,
``molmoe_lite.serve``). Errors we can explain (bad paths, bad images, bad checkpoints, bad configs: every ``MolmoeLiteError``, and OS errors on the user's files) print one
line naming the problem and exit with status 2 (``--debug`` shows the traceback instead); anything
else is a bug, shown with its traceback and a request to report it (status 1). A reader that closes
our output early (``| head``) ends the command quietly with status 141, as a shell reports SIGPIPE.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from typing import Callable

from molmoe_lite import __version__
from molmoe_lite.errors import MolmoeLiteError, UsageError

EPILOG = """examples:
  molmoe-lite demo
  molmoe-lite quantize ./MolmoE-1B-0924 ./molmoe-int4 --bits 4
  molmoe-lite run ./molmoe-int4 --image cat.jpg "Describe this image." --stats
  molmoe-lite run ./MolmoE-1B-0924 --image cat.jpg "Describe this image."
  molmoe-lite run allenai/MolmoE-1B-0924 --image cat.jpg "Point to the cat."
  molmoe-lite batch ./molmoe-int4 ./photos --out captions.jsonl --batch-size 8
  molmoe-lite serve ./molmoe-int4 --port 8000
"""


def _add_device_args(p) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="compute dtype (default: bfloat16 on a GPU and on CPUs with native bfloat16 (AVX512-BF16, AMX), else float32)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (default: every physical core)")


def _add_load_args(p) -> None:
    """How MODEL is loaded: quantised on the fly, and the preset (run, batch and serve)."""
    p.add_argument("--quantize", choices=["int4", "int8"], default=None, help="quantise a float checkpoint's experts while loading")
    p.add_argument("--preset", choices=["default", "small"], default="default", help="small: int4 attention and lm_head too, embeddings in CPU memory (least GPU memory)")


def _add_generation_args(p: argparse.ArgumentParser, default_tokens: int) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=default_tokens, help="most tokens to generate (default %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    _add_device_args(g)
    g.add_argument(
        "--transparent",
        default="composite",
        choices=["composite", "drop"],
        help="transparent images: composite onto a contrasting background (default) or drop alpha like the release",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="molmoe-lite",
        description="Run MolmoE-1B (vision-language mixture of experts) locally: describe images, answer questions, point at things.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_run_parser(sub)
    _add_quantize_parser(sub)
    _add_inspect_parser(sub)
    _add_compare_parser(sub)
    _add_batch_parser(sub)
    _add_demo_parser(sub)
    _add_serve_parser(sub)
    return parser


def _add_run_parser(sub) -> None:
    run = sub.add_parser(
        "run",
        help="answer a prompt about one or more images, streaming the text",
        description="Answer PROMPT about the given images with the model in MODEL (a folder, or a hub id fetched once).",
    )
    run.add_argument("model", metavar="MODEL", help="checkpoint folder, or a hub id such as allenai/MolmoE-1B-0924")
    run.add_argument("prompt", metavar="PROMPT", help="the question or instruction")
    run.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeat for several; none = text only)")
    _add_load_args(run)
    run.add_argument("--max-context", type=int, default=None, metavar="N", help="KV-cache slots (default: prompt + new tokens)")
    run.add_argument("--stats", action="store_true", help="print time to first token, decode tokens/s and the memory the model used (weights + working memory)")
    run.add_argument("--points", metavar="OUT.png", default=None, help="draw the points of a pointing answer onto the (first) image")
    _add_generation_args(run, 200)
    run.set_defaults(func=cmd_run)


def _add_quantize_parser(sub) -> None:
    quant = sub.add_parser(
        "quantize",
        help="convert a release checkpoint into a compact quantised one (int4/int8 experts)",
        description="Stream SRC (a release folder with pytorch_model.bin or safetensors, or a hub id) once into DST: "
        "safetensors shards with int4/int8 expert weights, the rest cast to --dtype. Memory stays about one layer; "
        "DST appears only when complete.",
    )
    quant.add_argument("src", metavar="SRC", help="release folder or hub id")
    quant.add_argument("dst", metavar="DST", help="output folder (must not exist or be empty, unless --force)")
    quant.add_argument("--bits", type=int, choices=[4, 8], default=4, help="expert weight bits (default %(default)s)")
    quant.add_argument("--group-size", type=int, default=None, help="int4: 32/64/128 (default 64); int8: default per output channel")
    quant.add_argument("--include", default="experts", help="comma-separated: experts[,attention][,lm_head] (default %(default)s)")
    quant.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"], help="dtype of the unquantised tensors (default %(default)s)")
    quant.add_argument("--device", default="cpu", help="where the rounding runs: cpu (default) or cuda")
    quant.add_argument("--method", default="refit", choices=["refit", "rtn"], help="rounding: refit (default, lower error) or rtn")
    quant.add_argument("--force", action="store_true", help="replace a non-empty DST")
    quant.set_defaults(func=cmd_quantize)


def _add_inspect_parser(sub) -> None:
    insp = sub.add_parser(
        "inspect",
        help="describe a checkpoint: quantisation, tensor sizes, GPU memory needed",
        description="Print the quantisation config, tensor counts and sizes, the KV cache for --context tokens, "
        "and the GPU memory of the weights (and weights + KV cache) for each way of loading it: as stored "
        "or quantised on the fly, default or small preset.",
    )
    insp.add_argument("path", metavar="DIR", help="checkpoint folder")
    insp.add_argument("--context", type=int, default=4096, help="tokens of KV cache to count (default %(default)s)")
    insp.add_argument("--batch", type=int, default=1, help="sequences of KV cache to count (default %(default)s)")
    insp.add_argument("--json", action="store_true", help="print JSON instead of a table")
    insp.set_defaults(func=cmd_inspect)


def _add_compare_parser(sub) -> None:
    cmp_ = sub.add_parser(
        "compare",
        help="top-1 agreement and KL divergence between a float and a quantised model",
        description="Run FLOAT_DIR and QUANT_DIR in turn on the same image and prompt and compare their logits at every position.",
    )
    cmp_.add_argument("float_dir", metavar="FLOAT_DIR", help="the float checkpoint (the release), the reference")
    cmp_.add_argument("quant_dir", metavar="QUANT_DIR", help="its quantised conversion (molmoe-lite quantize's output)")
    cmp_.add_argument("--image", required=True, metavar="PATH", help="the image both models see")
    cmp_.add_argument("--prompt", default="Describe this image.", help="the prompt both models see (default: %(default)r)")
    _add_device_args(cmp_)
    cmp_.add_argument("--json", action="store_true", help="print the full result as JSON")
    cmp_.set_defaults(func=cmd_compare)


def _add_batch_parser(sub) -> None:
    bat = sub.add_parser(
        "batch",
        help="answer every image of a folder or a JSONL/CSV file into a JSONL file (resumable)",
        description="Answer every image in INPUT (a folder, searched recursively, or a .jsonl/.csv file of rows with "
        "id, image relative to the file and an optional prompt) into OUT: one JSON line per input (id, image, prompt, "
        "answer, points, new_tokens, seconds, error). Lines are written after each batch; running again with the same "
        "--out skips the ids already there. Bad images become lines with their error.",
    )
    bat.add_argument("model", metavar="MODEL", help="checkpoint folder, or a hub id")
    bat.add_argument("input", metavar="INPUT", help="folder of images, or a .jsonl / .csv file of rows")
    bat.add_argument("--out", required=True, metavar="OUT.jsonl", help="output JSONL (appended to; its ids are skipped)")
    bat.add_argument("--prompt", default=None, help="prompt for rows without one (default: 'Describe this image.')")
    bat.add_argument("--max-new-tokens", type=int, default=200, help="most tokens per answer (default %(default)s)")
    bat.add_argument("--batch-size", type=int, default=8, help="images decoded together (default %(default)s)")
    _add_load_args(bat)
    _add_device_args(bat)
    bat.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                     help="run on Ray Data actors, one model per GPU (or per CPU worker); no ADDRESS starts a local Ray, "
                     "else the cluster's address (auto, ray://HOST:10001); needs the [ray] extra")
    bat.add_argument("--workers", type=int, default=None, metavar="N", help="with --ray: exactly N actors (default: from the cluster's GPUs/CPUs)")
    bat.set_defaults(func=cmd_batch)


def _add_demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="offline demo on a tiny random model (no download)",
        description="Write (once, cached) a tiny random MolmoE checkpoint in the release's layout and answer an image prompt with it. The weights are random, so the answer is gibberish: the demo shows the code path real weights take.",
    )
    demo.add_argument("--image", default=None, metavar="PATH", help="an image file (default: a synthetic scene)")
    demo.add_argument("--prompt", default="Describe this image.", help="default: %(default)r")
    demo.add_argument("--float", action="store_true", help="run the float checkpoint instead of its int4 conversion")
    _add_generation_args(demo, 24)
    demo.set_defaults(func=cmd_demo)


def _add_serve_parser(sub) -> None:
    srv = sub.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API, with a web page at /",
        description="Serve MODEL at http://HOST:PORT: POST /v1/chat/completions (OpenAI's schema, streaming, "
        "images as data URLs), GET /v1/models, GET /health, and a web page at /. Concurrent requests are "
        "batched. Needs the serve extra: pip install 'molmoe-lite[serve]'.",
    )
    srv.add_argument("model", metavar="MODEL", help="checkpoint folder, or a hub id")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s; another one "
                     "without --api-key prints a warning)")
    srv.add_argument("--port", type=int, default=8000, help="default %(default)s")
    srv.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together (default %(default)s)")
    srv.add_argument("--max-context", type=int, default=None, metavar="N",
                     help="KV-cache slots per request: prompt + answer (default: the model's maximum)")
    srv.add_argument("--max-queue", type=int, default=64, metavar="N",
                     help="requests waiting for a slot before new ones get 429 (default %(default)s)")
    srv.add_argument("--api-key", default=os.environ.get("MOLMOE_LITE_API_KEY"), metavar="KEY",
                     help="require 'Authorization: Bearer KEY' on /v1 (default: $MOLMOE_LITE_API_KEY, else none)")
    srv.add_argument("--allow-files", default=None, metavar="DIR",
                     help="let requests name image files inside DIR (default: data URLs only)")
    srv.add_argument("--max-body-mb", type=float, default=20.0, metavar="MB", help="largest request body (default %(default)s)")
    srv.add_argument("--model-name", default=None, help="the model id clients send (default: MODEL's folder name)")
    srv.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="S",
                     help="on SIGINT/SIGTERM, seconds running requests get to finish (default %(default)s)")
    _add_load_args(srv)
    _add_device_args(srv)
    srv.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from molmoe_lite.serve.server import ServeOptions, serve

    keys = ("model", "host", "port", "max_batch", "max_context", "max_queue", "api_key", "allow_files",
            "max_body_mb", "model_name", "shutdown_timeout", "quantize", "preset", "device", "dtype", "threads")
    return serve(ServeOptions(**{k: getattr(args, k) for k in keys}))


def _stream(model, images, args) -> str:
    """Print the answer as it comes; return it whole."""
    pieces = []
    for piece in model.generate(
        images,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stream=True,
        transparent=args.transparent,
        max_context=getattr(args, "max_context", None),
    ):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


def _print_stats(model) -> None:
    import torch

    s = model.last_stats
    line = (
        f"[stats] prompt {s.prompt_tokens} tokens, time to first token {s.ttft_s:.2f} s, "
        f"{s.new_tokens} new tokens, decode {s.decode_tokens_per_s:.1f} tokens/s"
    )
    if model.device.type == "cuda":
        peak = torch.cuda.max_memory_reserved(model.device) / 2**30
        free, total = torch.cuda.mem_get_info(model.device)
        # what the device has in use now minus what our allocator holds = the CUDA context
        # (and any other process on the card)
        context = max(0.0, (total - free) / 2**30 - torch.cuda.memory_reserved(model.device) / 2**30)
        line += f", peak GPU memory {peak + context:.2f} GiB ({peak:.2f} reserved by torch + {context:.2f} context)"
    else:
        peak = _peak_rss_bytes()
        weights = _weight_bytes(model)
        # the peak since the load finished: the checkpoint's page cache, which the load read
        # through and let go, is not the model's memory
        line += (f", memory {peak / 2**30:.2f} GiB at peak (weights {weights / 2**30:.2f} GiB + working memory "
                 f"{max(0, peak - weights) / 2**30:.2f} GiB)")
    print(line, file=sys.stderr)


def _reset_peak_rss() -> None:
    """Start the process's peak-RSS count afresh (Linux), so --stats leaves out the load's reading."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _weight_bytes(model) -> int:
    """Bytes of the model's tensors, the CPU kernels' packed experts included."""
    from molmoe_lite.quantized import held_tensors

    return sum(t.numel() * t.element_size() for t in held_tensors(model))


def cmd_run(args) -> int:
    from molmoe_lite.api import load

    if args.points:  # before the load and the answer, not after them
        _check_points_path(args.points, args.image)
    model = load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize, preset=args.preset,
                 threads=args.threads)
    _reset_peak_rss()
    images = args.image or None
    text = _stream(model, images, args)
    if args.stats:
        _print_stats(model)
    if args.points:
        _save_points(text, args.image, args.points)
    return 0


def _check_points_path(out: str, images: list[str]) -> None:
    """--points OUT: an image to draw on, a picture format PIL writes, a folder that exists."""
    from pathlib import Path

    from PIL import Image

    if not images:
        raise UsageError("--points needs an --image to draw on")
    path = Path(out)
    if path.is_dir():
        raise UsageError(f"--points {out}: is a folder; give a file name such as {path / 'points.png'}")
    if path.suffix.lower() not in Image.registered_extensions():
        raise UsageError(f"--points {out}: unknown picture format {path.suffix or '(no extension)'!r}; "
                         "end the name with .png or .jpg")
    if not path.parent.is_dir():
        raise UsageError(f"--points {out}: the folder {path.parent} does not exist")


def _save_points(text: str, images: list[str], out: str) -> None:
    from molmoe_lite.images import load_image
    from molmoe_lite.points import draw_points, parse_points

    image = load_image(images[0])
    points = parse_points(text, image.width, image.height)
    draw_points(image, points, out)
    print(f"[points] {len(points)} point(s) drawn into {out}", file=sys.stderr)


def cmd_quantize(args) -> int:
    from molmoe_lite.hub import resolve_model
    from molmoe_lite.quantize.convert import convert

    summary = convert(
        resolve_model(args.src),
        args.dst,
        bits=args.bits,
        group_size=args.group_size,
        include=args.include,
        dtype=args.dtype,
        device=args.device,
        force=args.force,
        method=args.method,
    )
    print(summary)
    return 0


def cmd_inspect(args) -> int:
    import json

    from molmoe_lite.quantize.inspect import format_report, inspect_checkpoint

    info = inspect_checkpoint(args.path, context=args.context, batch=args.batch)
    info["load_plans"] = _load_plans(args.path, info)
    print(json.dumps(info, indent=2) if args.json else format_report(info) + "\n" + _format_plans(info))
    return 0


def _load_plans(folder: str, info: dict) -> list[dict]:
    """What load() would put on a bf16 GPU and in CPU memory, per way of loading this checkpoint."""
    import torch

    from molmoe_lite.api import weights_plan
    from molmoe_lite.config import MolmoeConfig

    config = MolmoeConfig.from_pretrained(folder)
    ways = [(None, "default"), (None, "small")]
    if info["bits"] is None:  # a float release: quantising while loading is the usual way
        ways = [(None, "default"), ("int8", "default"), ("int4", "default"), ("int4", "small")]
    plans = []
    for quantize, preset in ways:
        plan = weights_plan(config, torch.bfloat16, quantize, preset, folder)
        plans.append({"quantize": quantize, "preset": preset, **plan,
                      "gpu_bytes": plan["device_bytes"] + info["kv_cache_bytes"]})
    return plans


def _format_plans(info: dict) -> str:
    from molmoe_lite.quantize.inspect import human_size

    lines = ["GPU memory by way of loading (bf16; weights, then weights + the KV cache above; activations "
             "and the CUDA context, a few hundred MiB, come on top):"]
    for p in info["load_plans"]:
        how = f"--quantize {p['quantize']}" if p["quantize"] else "as stored"
        cpu = f" (+ {human_size(p['cpu_bytes'])} in CPU memory)" if p["cpu_bytes"] else ""
        lines.append(f"  {how:<16} --preset {p['preset']:<8} weights {human_size(p['device_bytes']):>10}{cpu}, "
                     f"with KV cache {human_size(p['gpu_bytes'])}")
    return "\n".join(lines)


def cmd_compare(args) -> int:
    import json

    from molmoe_lite.compare import compare_models

    r = compare_models(args.float_dir, args.quant_dir, args.image, args.prompt, device=args.device, dtype=args.dtype,
                       threads=args.threads)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"positions: {r['positions']}")
        print(f"top-1 agreement: {100 * r['top1_agreement']:.1f}%")
        print(f"KL(float || quantised) per position: mean {r['kl_mean']:.4g}, max {r['kl_max']:.4g} nats")
        print(f"relative logit error: {r['rel_error']:.4g}")
    return 0


def cmd_batch(args) -> int:
    from molmoe_lite.batch import run

    run(args.model, args.input, args.out, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, preset=args.preset,
        quantize=args.quantize, threads=args.threads, ray_address=args.ray, workers=args.workers)
    return 0


def cmd_demo(args) -> int:
    from molmoe_lite.api import load
    from molmoe_lite.demo import demo_checkpoint, demo_image, demo_quantized

    float_folder = demo_checkpoint()
    try:
        folder = float_folder if args.float else demo_quantized(float_folder)
        print(f"tiny random MolmoE checkpoint: {folder}", file=sys.stderr)
        print("note: the weights are random, so the answer is meaningless text; real weights take the same path:",
              file=sys.stderr)
        print("      molmoe-lite quantize RELEASE_DIR OUT_DIR && molmoe-lite run OUT_DIR --image IMAGE \"prompt\"",
              file=sys.stderr)
        model = load(folder, device=args.device, dtype=args.dtype, threads=args.threads)
    except MolmoeLiteError as exc:
        if isinstance(exc, UsageError):  # the user's options, not the cache
            raise
        # a cached file damaged since it was written: the way out is to let the demo write it again
        raise MolmoeLiteError(f"{exc} (the demo's cached checkpoint is damaged: delete {float_folder} and "
                              f"{float_folder}-int4, and the demo writes them again)") from exc
    _reset_peak_rss()
    image = args.image or demo_image()
    print(f"prompt: {args.prompt}", file=sys.stderr)
    _stream(model, image, args)
    _print_stats(model)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    func: Callable = args.func
    # one-line notices (kernel compilation, graph capture, fallbacks) go to stderr
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[molmoe-lite] %(message)s"))
    logger = logging.getLogger("molmoe_lite")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        return func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of our output went away (`... | head`): stop quietly, as other tools do;
        # stdout goes to devnull so that the interpreter's last flush does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command ended by a closed pipe
    except (MolmoeLiteError, OSError) as exc:
        # problems we can explain (bad input, a missing or unreadable file, a full disk):
        # one readable line, not a traceback, unless --debug
        if args.debug:
            raise
        print(f"molmoe-lite {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        # anything else is a bug in molmoe-lite: show where, and ask for a report
        traceback.print_exc()
        print(
            f"molmoe-lite {args.command}: internal error (a bug in molmoe-lite {__version__}); "
            "please report it with the traceback above",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
