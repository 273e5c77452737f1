"""Validate an OpenAI chat-completions request body into a ``ChatRequest``.

Accepted: ``model``, ``messages`` (roles system/developer, user, assistant; content a
string or a list of ``text`` and ``image_url`` parts), ``max_tokens`` /
``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``,
``stream_options.include_usage``. Things this server cannot do (``n`` other than 1,
tools and function calls, log-probabilities, JSON response formats, audio or file parts)
are refused with a 400 that names the field, rather than silently ignored; fields that
only tune what OpenAI's service bills or stores (``user``, ``metadata``, ``store``...)
are ignored. Every check raises ``APIError`` (400) naming the offending ``param``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from molmoe_lite.serve.errors import bad_request

MAX_STOP_STRINGS = 4  # OpenAI's limit
SEED_LIMIT = 2**64  # a torch generator's seed is an unsigned 64-bit integer
SEED_MIN = -(2**63)  # OpenAI takes any integer seed; negative ones fit a signed 64-bit integer


@dataclass
class Turn:
    """One message: its role, its text (parts joined), and its image URLs in order."""

    role: str  # "system", "user" or "assistant" ("developer" is read as "system")
    text: str
    image_urls: list[str] = field(default_factory=list)


@dataclass
class ChatRequest:
    model: str
    turns: list[Turn]
    max_tokens: int | None = None  # None: the server's default, capped by the context left
    temperature: float = 0.0  # the release's generation is greedy; 0 keeps it so
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False


# fields whose presence (with a value other than "off") asks for something unsupported
_UNSUPPORTED = {
    "tools": "tools (function calling) are not supported by this server",
    "tool_choice": "tool_choice is not supported (this server has no tools)",
    "functions": "functions (function calling) are not supported by this server",
    "function_call": "function_call is not supported (this server has no functions)",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def parse_chat_request(body: Any) -> ChatRequest:
    """The validated request, or an ``APIError`` (400) naming the first problem."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required and must be a non-empty string", param="model")
    for name, why in _UNSUPPORTED.items():
        value = body.get(name)
        if value not in (None, [], "none", False):
            raise bad_request(why, param=name, code="unsupported_parameter")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request(f"n={n!r}: this server returns exactly one choice (n must be 1)", param="n",
                          code="unsupported_parameter")
    if body.get("logprobs") or body.get("top_logprobs"):
        raise bad_request("logprobs are not supported by this server", param="logprobs",
                          code="unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad_request("only response_format {'type': 'text'} is supported", param="response_format",
                          code="unsupported_parameter")

    req = ChatRequest(model=model, turns=_parse_messages(body.get("messages")))
    req.max_tokens = _max_tokens(body)
    if body.get("temperature") is not None:
        t = body["temperature"]
        if not _is_number(t) or not 0 <= t <= 2:
            raise bad_request(f"temperature must be a number in [0, 2], got {t!r}", param="temperature")
        req.temperature = float(t)
    if body.get("top_p") is not None:
        p = body["top_p"]
        if not _is_number(p) or not 0 < p <= 1:
            raise bad_request(f"top_p must be a number in (0, 1], got {p!r}", param="top_p")
        req.top_p = float(p)
    if body.get("seed") is not None:
        if not _is_int(body["seed"]) or not SEED_MIN <= body["seed"] < SEED_LIMIT:
            raise bad_request(f"seed must be an integer in [-2**63, 2**64), got {body['seed']!r}", param="seed")
        # a negative seed wraps onto the generator's range, as a cast to uint64 would
        req.seed = body["seed"] % SEED_LIMIT
    req.stop = _stop(body.get("stop"))
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad_request(f"stream must be true or false, got {stream!r}", param="stream")
    req.stream = bool(stream)
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad_request("stream_options must be an object", param="stream_options")
        if not req.stream:
            raise bad_request("stream_options is only allowed with stream: true", param="stream_options")
        req.include_usage = bool(opts.get("include_usage"))
    return req


def _max_tokens(body: dict) -> int | None:
    # max_completion_tokens is OpenAI's current name; max_tokens the older one
    for name in ("max_completion_tokens", "max_tokens"):
        value = body.get(name)
        if value is not None:
            if not _is_int(value) or value < 1:
                raise bad_request(f"{name} must be a positive integer, got {value!r}", param=name)
            return value
    return None


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad_request("stop must be a non-empty string or a list of non-empty strings", param="stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad_request(f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS}", param="stop")
    return tuple(stops)


def _encodable(text: str, param: str) -> str:
    # JSON may carry lone surrogates ("\ud800"), which no tokenizer or file system can encode
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad_request(f"{param} is not valid Unicode: {exc.reason} at character {exc.start}",
                          param=param) from None
    return text


def _parse_messages(messages: Any) -> list[Turn]:
    if not isinstance(messages, list):
        raise bad_request("'messages' is required and must be a list of messages", param="messages")
    if not messages:
        raise bad_request("'messages' is empty: send at least one user message", param="messages")
    turns = [_parse_message(m, i) for i, m in enumerate(messages)]
    if turns[-1].role != "user":
        raise bad_request(f"the last message must come from the user (it is {turns[-1].role!r})",
                          param=f"messages[{len(turns) - 1}].role")
    return turns


def _parse_message(message: Any, i: int) -> Turn:
    where = f"messages[{i}]"
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object with 'role' and 'content'", param=where)
    role = message.get("role")
    if role in ("tool", "function"):
        raise bad_request(f"{where}: role {role!r} is not supported (this server has no tools)",
                          param=f"{where}.role", code="unsupported_parameter")
    if role not in ("system", "developer", "user", "assistant"):
        raise bad_request(f"{where}.role must be one of system, developer, user, assistant; got {role!r}",
                          param=f"{where}.role")
    if role == "assistant" and message.get("tool_calls"):
        raise bad_request(f"{where}: tool_calls are not supported", param=f"{where}.tool_calls",
                          code="unsupported_parameter")
    role = "system" if role == "developer" else role
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return Turn(role, _encodable(content, f"{where}.content"))
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    texts, urls = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{at}.text must be a string", param=f"{at}.text")
            texts.append(_encodable(part["text"], f"{at}.text"))
        elif kind == "image_url":
            if role != "user":
                raise bad_request(f"{at}: images are only accepted in user messages", param=at)
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str) or not url:
                raise bad_request(f"{at}.image_url.url must be a non-empty string", param=f"{at}.image_url")
            urls.append(_encodable(url, f"{at}.image_url"))
        else:
            raise bad_request(
                f"{at}: content part type {kind!r} is not supported (use 'text' or 'image_url')",
                param=f"{at}.type",
            )
    return Turn(role, " ".join(texts), urls)
