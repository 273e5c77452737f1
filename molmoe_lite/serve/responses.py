"""The JSON a chat completion answers with: whole responses, stream chunks, usage, points.

Shapes follow OpenAI's ``chat.completion`` and ``chat.completion.chunk`` objects. One
extra field: when the answer holds Molmo points and the request had an image, the
message (or, streaming, the last chunk's delta) carries ``points``: a list of
``{"x", "y", "label"}`` in pixels of the request's first image (Molmo writes them in
percent of the image it was shown; ``molmoe_lite.points`` scales them).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from molmoe_lite.points import parse_points


@dataclass
class Reply:
    """What one request answers: everything but the text, which streams or comes whole."""

    model: str
    id: str = ""
    created: int = 0
    image_size: tuple[int, int] | None = None  # (width, height) of the first image

    def __post_init__(self) -> None:
        self.id = self.id or f"chatcmpl-{uuid.uuid4().hex}"
        self.created = self.created or int(time.time())

    def points(self, text: str) -> list[dict[str, Any]]:
        if self.image_size is None:
            return []
        return [{"x": p.x, "y": p.y, "label": p.label} for p in parse_points(text, *self.image_size)]

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def completion(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        points = self.points(text)
        if points:
            message["points"] = points
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict:
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def last_chunk(self, text: str, finish_reason: str) -> dict:
        """The chunk that ends the answer: empty delta (plus ``points`` when there are any)."""
        points = self.points(text)
        return self.chunk({"points": points} if points else {}, finish_reason)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        """``stream_options.include_usage``: one more chunk, no choices, the usage."""
        return {**self._head("chat.completion.chunk"), "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()
