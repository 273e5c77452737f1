"""``molmoe-lite serve`` as a real process on a loopback port, spoken to by OpenAI's client and httpx.

Answers equal ``model.generate`` for the same greedy request (non-streaming, streaming,
16 concurrent clients with different prompts and images, a multi-turn conversation);
a battery of bad requests each gets its status and an OpenAI error JSON, and ``/health``
answers after every one; API keys, ``--allow-files``, a full queue (429 + Retry-After), a
client that disconnects mid-stream (its row is freed: the engine ends it "cancelled"),
and SIGINT / SIGTERM (a graceful exit with status 0).
"""

import base64
import json
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from conftest import SERVE_CONTEXT, SERVE_MODEL  # noqa: E402
from molmoe_lite.serve.prompt import conversation_text  # noqa: E402
from molmoe_lite.serve.schema import Turn  # noqa: E402
from molmoe_lite.testing.server_process import ServerProcess, image_data_url  # noqa: E402

TOKENS = 8


def _image(seed, w=64, h=48):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _client(server, key="unused"):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=120)


def _user(prompt, image=None):
    content = [{"type": "text", "text": prompt}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": image_data_url(image)}})
    return [{"role": "user", "content": content}]


def _get(url, **kw):
    return httpx.get(url, timeout=120, **kw)  # generous: the CI machine may be busy


def _post(url, **kw):
    return httpx.post(url, timeout=120, **kw)


def _stream_events(server, body) -> list[str]:
    """The server-sent events of one streamed request, ``data: [DONE]`` last."""
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return [line for line in r.iter_lines() if line]


def _poll(check, timeout=60.0, show=None):
    """Wait (bounded) until check() is truthy; return its value. ``show()`` goes into the failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"condition not met in {timeout} s" + (f": {show()}" if show else ""))


# ---- answers equal model.generate -------------------------------------------------------------
def test_openai_client_answer_equals_generate(serve_server, tiny_model):
    image = _image(0)
    expected = tiny_model.generate(image, "Describe this image.", max_new_tokens=TOKENS)
    r = _client(serve_server).chat.completions.create(
        model=SERVE_MODEL, messages=_user("Describe this image.", image), max_tokens=TOKENS, temperature=0)
    assert r.choices[0].message.content == expected
    assert r.choices[0].finish_reason in ("stop", "length")
    prompt = tiny_model.processor.process(images=image, text="Describe this image.")["input_ids"].numel()
    assert r.usage.prompt_tokens == prompt
    assert 1 <= r.usage.completion_tokens <= TOKENS
    assert r.usage.total_tokens == prompt + r.usage.completion_tokens
    assert (r.choices[0].finish_reason == "length") == (r.usage.completion_tokens == TOKENS)


def test_openai_client_stream_equals_generate(serve_server, tiny_model):
    image = _image(1, 80, 40)
    expected = tiny_model.generate(image, "What is this?", max_new_tokens=TOKENS)
    chunks = list(_client(serve_server).chat.completions.create(
        model=SERVE_MODEL, messages=_user("What is this?", image), max_tokens=TOKENS, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # it streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert len({c.id for c in chunks}) == 1


def test_negative_seed_is_accepted_and_reproducible(serve_server):
    """OpenAI takes any integer seed: a negative one samples like its 64-bit two's complement."""
    def answer(seed):
        r = _client(serve_server).chat.completions.create(
            model=SERVE_MODEL, messages=_user("Tell a story."), max_tokens=TOKENS, temperature=1.0, seed=seed)
        return r.choices[0].message.content

    first = answer(-12345)
    assert answer(-12345) == first
    assert answer(2**64 - 12345) == first


def test_stream_ends_with_done(serve_server):
    body = {"model": SERVE_MODEL, "messages": _user("hi"), "max_tokens": 3, "stream": True}
    events = _stream_events(serve_server, body)
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


def test_multi_turn_conversation_is_one_prompt(serve_server, tiny_model):
    image = _image(2)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                     {"type": "image_url", "image_url": {"url": image_data_url(image)}}]},
        {"role": "assistant", "content": "A pattern."},
        {"role": "user", "content": "Point to the middle."},
    ]
    turns = [Turn("system", "Be brief."), Turn("user", "What is it?"), Turn("assistant", "A pattern."),
             Turn("user", "Point to the middle.")]
    expected = tiny_model.generate(image, conversation_text(turns), max_new_tokens=TOKENS)
    r = _client(serve_server).chat.completions.create(model=SERVE_MODEL, messages=messages, max_tokens=TOKENS)
    assert r.choices[0].message.content == expected


def test_stop_string_cuts_the_answer(serve_server, tiny_model):
    image = _image(0)
    full = tiny_model.generate(image, "Describe this image.", max_new_tokens=TOKENS)
    stop = full[3:6]
    assert stop and full.index(stop) >= 1
    r = _client(serve_server).chat.completions.create(
        model=SERVE_MODEL, messages=_user("Describe this image.", image), max_tokens=TOKENS, stop=[stop])
    assert r.choices[0].message.content == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_streamed_stop_string_never_shows_its_start(serve_server, tiny_model):
    image = _image(0)
    solo = list(tiny_model.generate(image, "Describe this image.", max_new_tokens=TOKENS, stream=True))
    full = "".join(solo)
    # a stop string whose characters come in different pieces: its start is decoded (and
    # could be streamed) before the stop string is complete
    ends = {len("".join(solo[: i + 1])) for i in range(len(solo))}
    start = next(i for i in range(1, len(full) - 2) if any(i < e < i + 3 for e in ends) and full[i:i + 3].strip())
    stop = full[start : start + 3]
    events = [json.loads(line[6:]) for line in _stream_events(serve_server, {
        "model": SERVE_MODEL, "messages": _user("Describe this image.", image), "max_tokens": TOKENS,
        "stream": True, "stop": [stop], "stream_options": {"include_usage": True}})[:-1]]
    sent = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert sent == full[: full.index(stop)]  # a leaked start of the stop string would show here
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert finishes == ["stop"]
    # decoding ended at the id that completed the stop string, not later
    inputs = tiny_model.processor.process(images=image, text="Describe this image.")
    ids = tiny_model.generate_from_batch(inputs, max_new_tokens=TOKENS)[0, inputs["input_ids"].numel():].tolist()
    tok = tiny_model.processor.tokenizer
    needed = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(
        ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False))
    assert events[-1]["usage"]["completion_tokens"] == needed


def test_sixteen_concurrent_clients_each_get_their_solo_answer(serve_server, tiny_model):
    cases = [(f"Question {i}: what do you see?", _image(10 + i, 32 + 4 * i, 48)) for i in range(16)]
    expected = [tiny_model.generate(image, prompt, max_new_tokens=6) for prompt, image in cases]
    client = _client(serve_server)
    answers = [None] * 16
    errors = []

    def ask(i):
        try:
            prompt, image = cases[i]
            r = client.chat.completions.create(model=SERVE_MODEL, messages=_user(prompt, image), max_tokens=6,
                                               temperature=0, stream=bool(i % 2))
            answers[i] = r.choices[0].message.content if not i % 2 else "".join(
                c.choices[0].delta.content or "" for c in r if c.choices)
        except Exception as exc:  # reported below, with the request's index
            errors.append((i, exc))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors
    assert answers == expected
    assert len(set(expected)) > 1  # the prompts really differ


# ---- models, health ----------------------------------------------------------------------------
def test_models_and_health(serve_server):
    models = _client(serve_server).models.list()
    assert [m.id for m in models.data] == [SERVE_MODEL]
    assert _get(f"{serve_server.url}/v1/models/{SERVE_MODEL}").json()["id"] == SERVE_MODEL
    missing = _get(f"{serve_server.url}/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    status, body = serve_server.health()
    assert status == 200 and body["status"] == "ok"


# ---- the bad-input battery ---------------------------------------------------------------------
def _long_prompt():
    return "many words " * SERVE_CONTEXT


def _b64(image):
    return image_data_url(image)


BAD = [
    # name, request (json body, or raw bytes), status, error code (None: any)
    ("malformed_json", b'{"model": "tiny", "messages": [', 400, "invalid_json"),
    ("body_not_object", b"[1, 2]", 400, None),
    ("not_utf8", b"\xff\xfe{}", 400, "invalid_json"),
    ("schema_messages_string", {"messages": "hello"}, 400, None),
    ("empty_messages", {"messages": []}, 400, None),
    ("wrong_content_part_type", {"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]},
     400, None),
    ("n_is_3", {"n": 3}, 400, "unsupported_parameter"),
    ("tools", {"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter"),
    ("temperature_out_of_range", {"temperature": -1}, 400, None),
    ("seed_over_64_bits", {"seed": 2**64, "temperature": 1}, 400, None),
    ("lone_surrogate_in_text", {"text": "a\ud800b"}, 400, None),
    ("not_an_image", {"image": "data:image/png;base64," + base64.b64encode(b"GIF89a? no").decode()}, 400,
     "invalid_image"),
    ("truncated_base64_image", {"image": lambda: _b64(_image(3))[:-37]}, 400, "invalid_image"),
    ("one_pixel_image", {"image": lambda: _b64(_image(4, 1, 1))}, 400, "image_too_small"),
    ("image_20000x20", {"image": lambda: _b64(Image.new("RGB", (20000, 20), (200, 10, 10)))}, 400,
     "invalid_image_shape"),
    ("remote_image_url", {"image": "http://example.com/cat.png"}, 400, "remote_url_refused"),
    ("local_file_not_allowed", {"image": "/etc/hostname"}, 400, "files_not_allowed"),
    ("prompt_over_context", {"text": _long_prompt()}, 400, "context_length_exceeded"),
    ("max_tokens_over_context", {"max_tokens": SERVE_CONTEXT}, 400, "context_length_exceeded"),
    ("unknown_model", {"model": "gpt-4o"}, 404, "model_not_found"),
    ("body_over_limit", {"text": "x" * (3 * 2**20 // 2)}, 413, "request_too_large"),
]


def _bad_body(spec):
    if isinstance(spec, bytes):
        return spec
    content = [{"type": "text", "text": spec.get("text", "hi")}]
    if "image" in spec:
        image = spec["image"]() if callable(spec["image"]) else spec["image"]
        content.append({"type": "image_url", "image_url": {"url": image}})
    body = {"model": SERVE_MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    body.update({k: v for k, v in spec.items() if k not in ("text", "image")})
    return json.dumps(body).encode()


@pytest.mark.parametrize("name, spec, status, code", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_its_status_and_an_error_json(serve_server, name, spec, status, code):
    r = httpx.post(serve_server.url + "/v1/chat/completions", content=_bad_body(spec),
                   headers={"Content-Type": "application/json"}, timeout=120)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    assert serve_server.health()[0] == 200  # still up


def test_bad_input_through_openai_client_raises_its_exceptions(serve_server):
    client = _client(serve_server)
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model=SERVE_MODEL, messages=_user("hi"), n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=_user("hi"))


def test_wrong_method_and_path_get_error_json(serve_server):
    r = _get(serve_server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = _post(serve_server.url + "/v1/completions", json={})
    assert r.status_code == 404 and "error" in r.json()


# ---- a client gone mid-stream ------------------------------------------------------------------
def test_disconnect_mid_stream_frees_the_row(serve_server):
    before = serve_server.health()[1]["finished"].get("cancelled", 0)
    # "go on" runs past 1500 tokens on the tiny model without an EOS, so only a cancel ends it early
    body = {"model": SERVE_MODEL, "messages": _user("go on"), "max_tokens": 600, "stream": True}
    with httpx.stream("POST", serve_server.url + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk and a few text chunks arrived
    assert any('"content"' in line for line in got)
    # the connection is closed; the engine ends the request as "cancelled" (600 tokens would
    # take far longer and end as "length") and no row stays taken
    _poll(lambda: serve_server.health()[1]["finished"].get("cancelled", 0) > before, show=serve_server.health)
    _poll(lambda: serve_server.health()[1]["running"] == 0, show=serve_server.health)


# ---- API key, allowed files, a full queue ------------------------------------------------------
@pytest.fixture(scope="module")
def keyed_server(tiny_release, tmp_path_factory):
    pytest.importorskip("starlette")
    allowed = tmp_path_factory.mktemp("allowed")
    _image(5).save(allowed / "cat.png")
    _image(6).save(allowed.parent / "secret.png")
    server = ServerProcess.start(
        tiny_release, "--model-name", SERVE_MODEL, "--api-key", "s3cret", "--allow-files", str(allowed),
        "--max-batch", "1", "--max-queue", "1", "--max-context", "4096",
        log_dir=tmp_path_factory.mktemp("keyed-logs"),
    ).wait_ready()
    server.allowed = allowed
    yield server
    assert server.stop(signal.SIGINT) == 0, server.log()  # SIGINT: a graceful exit, status 0


def test_api_key_is_required_on_v1(keyed_server):
    url = keyed_server.url
    assert _get(url + "/v1/models").status_code == 401
    assert _get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert _get(url + "/v1/models", headers={"Authorization": "Basic s3cret"}).status_code == 401
    r = _post(url + "/v1/chat/completions", json={"model": SERVE_MODEL, "messages": _user("hi")})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert _get(url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        _client(keyed_server, "wrong").models.list()
    assert [m.id for m in _client(keyed_server, "s3cret").models.list().data] == [SERVE_MODEL]
    assert _get(url + "/health").status_code == 200 and _get(url + "/").status_code == 200


def test_allowed_files_are_read_and_others_refused(keyed_server, tiny_model):
    client = _client(keyed_server, "s3cret")
    expected = tiny_model.generate(_image(5), "hi", max_new_tokens=4)
    for url in ("cat.png", f"file://{keyed_server.allowed}/cat.png"):
        messages = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                 {"type": "image_url", "image_url": {"url": url}}]}]
        r = client.chat.completions.create(model=SERVE_MODEL, messages=messages, max_tokens=4)
        assert r.choices[0].message.content == expected
    for url in ("../secret.png", str(keyed_server.allowed.parent / "secret.png")):
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]
        with pytest.raises(openai.BadRequestError, match="outside"):
            client.chat.completions.create(model=SERVE_MODEL, messages=messages, max_tokens=4)


def test_full_queue_gets_429_with_retry_after(keyed_server):
    auth = {"Authorization": "Bearer s3cret"}
    url = keyed_server.url + "/v1/chat/completions"
    # 4000 tokens keep the row busy far longer than this test takes; the clients leave early
    long = {"model": SERVE_MODEL, "messages": _user("go on"), "max_tokens": 4000, "stream": True}
    with httpx.Client(headers=auth, timeout=120) as first, httpx.Client(headers=auth, timeout=120) as second:
        with first.stream("POST", url, json=long) as running:
            # keep the line iterator: a discarded one, once collected, closes the response
            lines = running.iter_lines()
            next(lines)
            _poll(lambda: keyed_server.health()[1]["running"] == 1, show=keyed_server.health)  # the row is taken
            with second.stream("POST", url, json=long) as waiting:
                _poll(lambda: keyed_server.health()[1]["waiting"] == 1, show=keyed_server.health)  # queue full
                r = httpx.post(url, json={"model": SERVE_MODEL, "messages": _user("me too")}, headers=auth,
                               timeout=120)
                assert r.status_code == 429, (r.text, keyed_server.health())
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
                assert waiting.status_code == 200
    # both clients gone: their rows are freed, and the server answers again
    _poll(lambda: (h := keyed_server.health()[1])["running"] == 0 and h["waiting"] == 0, show=keyed_server.health)
    r = httpx.post(url, json={"model": SERVE_MODEL, "messages": _user("now?"), "max_tokens": 2}, headers=auth,
                   timeout=120)
    assert r.status_code == 200


# ---- shutdown ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_shuts_down_gracefully_mid_stream(tiny_release, tmp_path, sig):
    server = ServerProcess.start(tiny_release, "--model-name", SERVE_MODEL, "--max-context", "4096",
                                 "--shutdown-timeout", "1", log_dir=tmp_path).wait_ready()
    try:
        body = {"model": SERVE_MODEL, "messages": _user("go on"), "max_tokens": 4000, "stream": True}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)
            server.proc.send_signal(sig)
            rest = list(lines)  # the stream ends (the request is cancelled), it does not hang
        assert server.proc.wait(60) == 0, server.log()
        assert "Shutting down" in server.log() or "shutting down" in server.log()
        # cut by the shutdown after the grace period: an error event, then [DONE]
        assert any('"server_shutdown"' in line for line in rest), rest[-4:]
        assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    finally:
        server.stop(signal.SIGKILL)
