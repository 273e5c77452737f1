"""The ``molmoe-lite`` command: thin wrappers over the Python API.

Subcommands: ``run`` (answer a prompt about images, streaming), ``demo`` (the
offline tiny-model demo). Errors we can explain (bad paths, bad images, bad
checkpoints, bad configs) print one line naming the problem and exit with status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

EPILOG = """examples:
  molmoe-lite demo
  molmoe-lite run ./MolmoE-1B-0924 --image cat.jpg "Describe this image."
  molmoe-lite run allenai/MolmoE-1B-0924 --image cat.jpg "Point to the cat."
"""


def _add_generation_args(p: argparse.ArgumentParser, default_tokens: int) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=default_tokens, help="most tokens to generate (default %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="compute dtype (default: bfloat16 on GPU, float32 on CPU)")
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

    run = sub.add_parser(
        "run",
        help="answer a prompt about one or more images, streaming the text",
        description="Answer PROMPT about the given images with the model in MODEL (a folder, or a hub id fetched once).",
    )
    run.add_argument("model", metavar="MODEL", help="checkpoint folder, or a hub id such as allenai/MolmoE-1B-0924")
    run.add_argument("prompt", metavar="PROMPT", help="the question or instruction")
    run.add_argument("--image", action="append", default=[], metavar="PATH", help="an image file (repeat for several; none = text only)")
    _add_generation_args(run, 200)
    run.set_defaults(func=cmd_run)

    demo = sub.add_parser(
        "demo",
        help="offline demo on a tiny random model (no download)",
        description="Write (once, cached) a tiny random MolmoE checkpoint in the release's layout and answer an image prompt with it. The weights are random, so the answer is gibberish: the demo shows the code path real weights take.",
    )
    demo.add_argument("--image", default=None, metavar="PATH", help="an image file (default: a synthetic scene)")
    demo.add_argument("--prompt", default="Describe this image.", help="default: %(default)r")
    _add_generation_args(demo, 24)
    demo.set_defaults(func=cmd_demo)
    return parser


def _stream(model, images, args) -> None:
    for piece in model.generate(
        images,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stream=True,
        transparent=args.transparent,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


def cmd_run(args) -> int:
    from molmoe_lite.api import load

    model = load(args.model, device=args.device, dtype=args.dtype)
    images = args.image or None
    _stream(model, images, args)
    return 0


def cmd_demo(args) -> int:
    from molmoe_lite.api import load
    from molmoe_lite.demo import demo_checkpoint, demo_image

    folder = demo_checkpoint()
    print(f"tiny random MolmoE checkpoint: {folder}", file=sys.stderr)
    print("note: the weights are random, so the answer is meaningless text; real weights take the same path:", file=sys.stderr)
    print("      molmoe-lite run PATH_OR_HUB_ID --image IMAGE \"prompt\"", file=sys.stderr)
    model = load(folder, device=args.device, dtype=args.dtype)
    image = args.image or demo_image()
    print(f"prompt: {args.prompt}", file=sys.stderr)
    _stream(model, image, args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    func: Callable = args.func
    try:
        return func(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one readable line, not a traceback, unless --debug
        if args.debug:
            raise
        print(f"molmoe-lite {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
