"""Answering one batch of rows: images in, one record per row out.

Method: each row's image is opened (``images.load_image``: EXIF orientation, alpha,
bit depth) and turned into model inputs by the processor; a row whose image cannot be
read becomes a record with its error. The good rows are decoded together by
``generate_answers``, the one place that decides how a batch is decoded (batched greedy
generation over a collated batch; each row gets exactly what it would get alone). If
the batch as a whole is refused (a prompt too long for the context, out of GPU memory),
its rows are answered one at a time so that the error lands on the row that caused it.
Pointing answers also get their points in pixels of the image as the model saw it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from molmoe_lite.batch.rows import Row
from molmoe_lite.errors import MolmoeLiteError, UsageError


@dataclass
class Prepared:
    """A row with its model inputs, or the reason it has none."""

    row: Row
    inputs: dict[str, Any] | None
    size: tuple[int, int] | None  # (width, height) of the image, upright
    seconds: float  # reading and preprocessing
    error: str | None = None


@dataclass
class Answer:
    text: str
    new_tokens: int  # generated for this row, the end-of-text token included when it came
    seconds: float  # from the start of decoding to this row's last token


def prepare(processor: Any, row: Row, transparent: str = "composite") -> Prepared:
    """Read ``row``'s image and run the processor on it; a bad image becomes ``error``."""
    from molmoe_lite.images import load_image

    start = time.perf_counter()
    try:
        image = load_image(row.path, transparent)
        inputs = processor.process(images=image, text=row.prompt, transparent=transparent)
    except (MolmoeLiteError, OSError) as exc:
        return Prepared(row, None, None, time.perf_counter() - start, str(exc))
    return Prepared(row, inputs, image.size, time.perf_counter() - start)


def generate_answers(model: Any, inputs: list[dict[str, Any]], max_new_tokens: int) -> list[Answer]:
    """Greedy answers of several prompts (processor outputs), decoded as one batch."""
    from molmoe_lite.generation import SamplingSettings

    settings = SamplingSettings.merge(None, max_new_tokens=max_new_tokens)
    tok = model.processor.tokenizer
    eos = tok.eos_token_id
    batch = model.processor.collate(inputs)
    ids: list[list[int]] = [[] for _ in inputs]
    finished = [False] * len(inputs)
    seconds = [0.0] * len(inputs)
    start = time.perf_counter()
    for step in model.stream_tokens(batch, settings, tok):
        now = time.perf_counter() - start
        for b, token in enumerate(step.tolist()):
            if not finished[b]:
                ids[b].append(token)
                seconds[b] = now
                finished[b] = token == eos
    # as model.generate: the text before the end-of-text token, special tokens left out
    return [
        Answer(
            tok.decode([t for t in row if t != eos], skip_special_tokens=True, clean_up_tokenization_spaces=False),
            len(row),
            s,
        )
        for row, s in zip(ids, seconds)
    ]


def record(p: Prepared, answer: Answer | None = None, error: str | None = None) -> dict[str, Any]:
    """The output line of one row."""
    from molmoe_lite.points import parse_points

    error = error or p.error
    out: dict[str, Any] = {"id": p.row.id, "image": p.row.image, "prompt": p.row.prompt,
                           "answer": None, "points": None, "new_tokens": 0,
                           "seconds": round(p.seconds, 4), "error": error}
    if answer is not None and error is None:
        width, height = p.size
        out["answer"] = answer.text
        out["points"] = [{"x": round(pt.x, 1), "y": round(pt.y, 1), "label": pt.label}
                         for pt in parse_points(answer.text, width, height)]
        out["new_tokens"] = answer.new_tokens
        out["seconds"] = round(p.seconds + answer.seconds, 4)
    return out


def answer_prepared(model: Any, prepared: list[Prepared], max_new_tokens: int) -> list[dict[str, Any]]:
    """Records for ``prepared``, in order: the good rows decoded together, the bad ones with their error."""
    if getattr(model, "processor", None) is None:
        raise UsageError("this model has no processor attached; load it with molmoe_lite.load()")
    good = [p for p in prepared if p.error is None]
    results: list[Answer | str] = []
    if good:
        try:
            results = list(generate_answers(model, [p.inputs for p in good], max_new_tokens))
        except MolmoeLiteError as exc:
            # find the row the batch was refused for; the others still get their answers
            results = [str(exc)] if len(good) == 1 else [_alone(model, p, max_new_tokens) for p in good]
    by_row = {id(p): r for p, r in zip(good, results)}
    out = []
    for p in prepared:
        r = by_row.get(id(p))
        out.append(record(p, error=r) if isinstance(r, str) else record(p, r))
    return out


def _alone(model: Any, p: Prepared, max_new_tokens: int) -> Answer | str:
    try:
        return generate_answers(model, [p.inputs], max_new_tokens)[0]
    except MolmoeLiteError as exc:
        return str(exc)


def answer_rows(model: Any, rows: list[Row], max_new_tokens: int, transparent: str = "composite") -> list[dict[str, Any]]:
    """``prepare`` then ``answer_prepared``: records for ``rows``, in order."""
    return answer_prepared(model, [prepare(model.processor, r, transparent) for r in rows], max_new_tokens)
