"""The server's pieces without a server: request validation, the conversation -> prompt
format, image URLs (data URLs, --allow-files), points in replies. Stop strings are the
engine's (``TextPieces``): their cases are in test_text_pieces, over a server in test_serve."""

import base64
import io
import struct
import unicodedata
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")

from molmoe_lite.serve.errors import APIError  # noqa: E402
from molmoe_lite.serve.image_urls import MAX_ASPECT, MIN_SIDE_PX, ImageLimits, read_image  # noqa: E402
from molmoe_lite.serve.prompt import conversation_images, conversation_text  # noqa: E402
from molmoe_lite.serve.responses import Reply  # noqa: E402
from molmoe_lite.serve.schema import Turn, parse_chat_request  # noqa: E402
from molmoe_lite.testing.server_process import image_data_url  # noqa: E402


def _body(**over):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(over)
    return body


def _encoded(image, fmt):
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def _png(w, h, seed=0):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


# ---- schema -------------------------------------------------------------------------------
def test_schema_reads_every_supported_field():
    req = parse_chat_request(_body(max_completion_tokens=7, temperature=0.5, top_p=0.9, seed=3, stop="X",
                                   stream=True, stream_options={"include_usage": True}, n=1, user="u"))
    assert (req.max_tokens, req.temperature, req.top_p, req.seed, req.stop, req.stream, req.include_usage) == (
        7, 0.5, 0.9, 3, ("X",), True, True)
    assert parse_chat_request(_body(max_tokens=5)).max_tokens == 5
    assert parse_chat_request(_body()).temperature == 0.0  # the release's greedy default
    assert parse_chat_request(_body(seed=2**64 - 1)).seed == 2**64 - 1  # the largest seed torch takes
    # negative seeds (OpenAI takes them) wrap onto the generator's range: two's complement, 64 bits
    assert parse_chat_request(_body(seed=-1)).seed == int.from_bytes((-1).to_bytes(8, "little", signed=True), "little")
    assert parse_chat_request(_body(seed=-(2**63))).seed == 2**63  # the smallest signed 64-bit integer


@pytest.mark.parametrize("name, over, param", [
    ("not_an_object", None, None),
    ("no_model", {"model": None}, "model"),
    ("messages_not_list", {"messages": "hi"}, "messages"),
    ("empty_messages", {"messages": []}, "messages"),
    ("last_not_user", {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "messages[1].role"),
    ("bad_role", {"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role"),
    ("tool_role", {"messages": [{"role": "tool", "content": "a"}]}, "messages[0].role"),
    ("content_number", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("audio_part", {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "messages[0].content[0].type"),
    ("text_part_not_str", {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     "messages[0].content[0].text"),
    ("image_in_assistant", {"messages": [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}, {"role": "user", "content": "q"}]},
     "messages[0].content[0]"),
    ("n_2", {"n": 2}, "n"),
    ("tools", {"tools": [{"type": "function"}]}, "tools"),
    ("logprobs", {"logprobs": True}, "logprobs"),
    ("json_format", {"response_format": {"type": "json_object"}}, "response_format"),
    ("max_tokens_zero", {"max_tokens": 0}, "max_tokens"),
    ("max_tokens_bool", {"max_tokens": True}, "max_tokens"),
    ("temperature_high", {"temperature": 2.5}, "temperature"),
    ("top_p_zero", {"top_p": 0}, "top_p"),
    ("seed_under_64_bits", {"seed": -(2**63) - 1}, "seed"),
    ("seed_over_64_bits", {"seed": 2**64}, "seed"),
    ("lone_surrogate_content", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ("lone_surrogate_text_part", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
     "messages[0].content[0].text"),
    ("lone_surrogate_image_url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "\ud800.png"}}]}]}, "messages[0].content[0].image_url"),
    ("stop_too_many", {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("stop_empty", {"stop": [""]}, "stop"),
    ("stream_not_bool", {"stream": "yes"}, "stream"),
    ("stream_options_without_stream", {"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_schema_refuses(name, over, param):
    body = [] if over is None else _body(**over)
    with pytest.raises(APIError) as info:
        parse_chat_request(body)
    assert info.value.status == 400
    assert info.value.param == param
    assert info.value.body()["error"]["message"]


# ---- the conversation -> prompt -------------------------------------------------------------
def test_conversation_text_follows_the_processors_pattern():
    turns = [Turn("system", "Be brief."), Turn("user", "q1", ["u1"]), Turn("assistant", " a1 "),
             Turn("user", "q2"), Turn("user", "more", ["u2"])]
    assert conversation_text(turns) == "Be brief. q1 Assistant: a1 User: q2 more"
    assert conversation_text([Turn("user", "only")]) == "only"
    assert conversation_images(turns) == [("u1", "messages[1].image_url[0]"), ("u2", "messages[4].image_url[0]")]


def test_conversation_tokens_equal_the_whole_dialogue_tokenized_once(tiny_model):
    """The processor's ids for the conversation = [BOS] + the dialogue string tokenized as one."""
    proc = tiny_model.processor
    turns = [Turn("user", "What is it?"), Turn("assistant", "A cat."), Turn("user", "Point to it.")]
    ids = proc.process(images=None, text=conversation_text(turns))["input_ids"].tolist()
    dialogue = " User: What is it? Assistant: A cat. User: Point to it. Assistant:"
    assert ids == [proc.bos_id] + proc.tokenizer.encode(dialogue, add_special_tokens=False)


# ---- the prompt's token floor against the context ---------------------------------------------
FLOOR_TEXTS = {
    "ascii": "many words, and some more words " * 40,
    "longest_token_repeated": None,  # the vocabulary's longest token, spelled out, many times
    "multibyte": "ü€𝄞 " * 60,
    "combining_marks_nfc_composes": "e\u0301a\u0308" * 80,  # fewer bytes once normalized
    "special_token_inside": "a <|endoftext|> b " * 30,
    "empty": "",
}


def _spelled_longest(tok):
    """The text of the vocabulary's longest token (its byte-level characters decoded)."""
    return tok.convert_tokens_to_string([max(tok.backend_tokenizer.get_vocab(with_added_tokens=False), key=len)])


@pytest.mark.parametrize("tokenizer", ["tiny", "release"])
@pytest.mark.parametrize("name", list(FLOOR_TEXTS))
def test_token_floor_never_exceeds_the_token_count(request, tiny_model, tokenizer, name):
    from molmoe_lite.tokenizer import TokenFloor, load_tokenizer

    if tokenizer == "tiny":
        tok = tiny_model.processor.tokenizer
    else:
        tok = load_tokenizer(request.getfixturevalue("real_release_dir"))
    text = FLOOR_TEXTS[name] if FLOOR_TEXTS[name] is not None else _spelled_longest(tok) * 50
    floor = TokenFloor(tok)
    assert floor(text) <= len(tok.encode(text, add_special_tokens=False))
    # both tokenizers normalize with NFC: the floor counts the bytes the model sees
    assert floor(text) == -(-len(unicodedata.normalize("NFC", text).encode()) // floor.longest)


def _loaded(tiny_model, max_context):
    from molmoe_lite.serve.app import Loaded

    return Loaded(model=tiny_model, engine=None, max_context=max_context)


# name, the text's floor as an offset from the context, max_tokens, refused before encoding
FLOOR_EDGES = [
    ("floor_equals_context", 0, None, True),
    ("floor_over_context", 1, None, True),
    ("floor_one_under_context", -1, None, False),
    ("floor_plus_max_tokens_over", -5, 6, True),
    ("floor_plus_max_tokens_equal", -5, 5, False),
]


@pytest.mark.parametrize("name, offset, max_tokens, refused", FLOOR_EDGES, ids=[e[0] for e in FLOOR_EDGES])
def test_prompt_over_its_token_floor_is_refused_before_encoding(tiny_model, monkeypatch, name, offset,
                                                                max_tokens, refused):
    from molmoe_lite.serve.app import _prepare_inputs

    context = 64
    loaded = _loaded(tiny_model, context)
    tok = tiny_model.processor.tokenizer
    calls = []
    real_encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    floor = context + offset
    text = "a" * (loaded.token_floor.longest * floor)
    assert loaded.token_floor(text) == floor  # the text sits exactly on the edge
    over = {"max_tokens": max_tokens} if max_tokens is not None else {}
    req = parse_chat_request(_body(messages=[{"role": "user", "content": text}], **over))
    if refused:
        with pytest.raises(APIError) as caught:
            _prepare_inputs(loaded, req, ImageLimits())
        error = caught.value
        assert (error.status, error.code, error.param) == (400, "context_length_exceeded", "messages")
        assert f"at least {floor} in the messages" in str(error.body()["error"]["message"])
        assert calls == []
    else:
        inputs, _ = _prepare_inputs(loaded, req, ImageLimits())
        assert calls and int(inputs["input_ids"].numel()) >= floor


# ---- image URLs -------------------------------------------------------------------------------
def test_data_url_gives_the_same_pixels():
    image = _png(40, 30)
    out = read_image(image_data_url(image), ImageLimits(), "p")
    assert out.size == (40, 30) and np.array_equal(np.asarray(out), np.asarray(image))


def _png_header_only(w, h):
    """A PNG that claims w x h but holds a few bytes of pixels: size checks must come first."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


REFUSED_URLS = [
    ("not_an_image", "data:image/png;base64," + base64.b64encode(b"hello, not a picture").decode(), "invalid_image"),
    ("bad_base64", "data:image/png;base64,@@@@", "invalid_image"),
    ("truncated_png", image_data_url(_png(64, 48))[:200], "invalid_image"),
    ("text_mime", "data:text/plain;base64,aGk=", "invalid_image"),
    ("not_base64_encoded", "data:image/png,rawbytes", "invalid_image"),
    ("one_pixel", image_data_url(_png(1, 1)), "image_too_small"),
    ("below_min_side", image_data_url(_png(MIN_SIDE_PX - 1, 64)), "image_too_small"),
    ("elongated", image_data_url(_png(int(20 * MAX_ASPECT) + 20, 20)), "invalid_image_shape"),
    ("too_many_pixels", "data:image/png;base64," + base64.b64encode(_png_header_only(9000, 9000)).decode(),
     "image_too_large"),
    ("eps_read_through_ghostscript", "data:image/eps;base64," + base64.b64encode(_encoded(_png(32, 24), "EPS")).decode(),
     "invalid_image"),
    ("ppm_not_served", "data:image/png;base64," + base64.b64encode(_encoded(_png(32, 24), "PPM")).decode(),
     "invalid_image"),
    ("remote_http", "https://example.com/cat.png", "remote_url_refused"),
    ("file_without_allow", "file:///etc/hostname", "files_not_allowed"),
    ("odd_scheme", "ftp://host/x.png", None),
]


@pytest.mark.parametrize("name, url, code", REFUSED_URLS, ids=[r[0] for r in REFUSED_URLS])
def test_image_url_refusals(name, url, code):
    with pytest.raises(APIError) as info:
        read_image(url, ImageLimits(), "messages[0].content[1]")
    assert info.value.status == 400 and info.value.code == code
    if name in ("eps_read_through_ghostscript", "ppm_not_served"):  # refused before any decoder runs
        assert "not an image in a format the server reads" in info.value.message
    assert info.value.param == "messages[0].content[1]"


def test_data_url_parameters_before_base64_are_allowed():
    image = _png(32, 24)
    payload = base64.b64encode(_encoded(image, "PNG")).decode()
    for head in ("data:image/png;name=cat.png;base64", "data:image/png;charset=binary;BASE64"):
        got = read_image(f"{head},{payload}", ImageLimits(), "p")
        assert np.array_equal(np.asarray(got), np.asarray(image)), head


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_common_formats_are_read(fmt):
    image = _png(32, 24)
    got = read_image(f"data:image/{fmt.lower()};base64," + base64.b64encode(_encoded(image, fmt)).decode(),
                     ImageLimits(), "p")
    assert got.size == (32, 24) and got.mode == "RGB"


def test_image_limits_allow_the_edges():
    assert read_image(image_data_url(_png(MIN_SIDE_PX, MIN_SIDE_PX)), ImageLimits(), "p").size == (14, 14)
    w = int(MIN_SIDE_PX * MAX_ASPECT)
    assert read_image(image_data_url(_png(w, MIN_SIDE_PX)), ImageLimits(), "p").size == (w, MIN_SIDE_PX)


def test_allow_files_reads_only_inside_the_folder(tmp_path):
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    image = _png(32, 24)
    image.save(root / "sub" / "a.png")
    image.save(tmp_path / "outside.png")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    limits = ImageLimits(allow_files=root.resolve())
    for url in (str(root / "sub" / "a.png"), f"file://{root}/sub/a.png", "sub/a.png"):
        assert np.array_equal(np.asarray(read_image(url, limits, "p")), np.asarray(image)), url
    for url in (str(tmp_path / "outside.png"), "../outside.png", "sub/../../outside.png", "link.png",
                f"file://{tmp_path}/outside.png"):
        with pytest.raises(APIError) as info:
            read_image(url, limits, "p")
        assert info.value.code == "files_not_allowed", url
    with pytest.raises(APIError, match="no such file"):
        read_image("sub/missing.png", limits, "p")


UNOPENABLE = [
    ("nul_byte", "sub/a.png\x00"),
    ("nul_byte_in_file_url", "file:///sub/a.png%00"),
    ("name_too_long", "x" * 5000 + ".png"),
    ("symlink_loop", "loop1.png"),
]


@pytest.mark.parametrize("name, url", UNOPENABLE, ids=[u[0] for u in UNOPENABLE])
def test_allow_files_refuses_names_the_file_system_cannot_open(tmp_path, name, url):
    root = tmp_path / "allowed"
    (root / "sub").mkdir(parents=True)
    _png(32, 24).save(root / "sub" / "a.png")
    (root / "loop1.png").symlink_to(root / "loop2.png")
    (root / "loop2.png").symlink_to(root / "loop1.png")
    with pytest.raises(APIError) as info:
        read_image(url, ImageLimits(allow_files=root.resolve()), "p")
    assert info.value.status == 400 and info.value.param == "p"


# ---- replies ----------------------------------------------------------------------------------
def test_points_in_pixels_of_the_first_image():
    reply = Reply(model="m", image_size=(200, 100))
    text = 'There <point x="50.0" y="25.0" alt="cat">cat</point> and <points x1="10" y1="10" x2="100" y2="100">d</points>'
    points = reply.completion(text, "stop", 3, 4)["choices"][0]["message"]["points"]
    assert points == [{"x": 100.0, "y": 25.0, "label": "cat"}, {"x": 20.0, "y": 10.0, "label": "d"},
                      {"x": 200.0, "y": 100.0, "label": "d"}]
    assert reply.last_chunk(text, "stop")["choices"][0]["delta"]["points"] == points
    assert "points" not in reply.completion("no points here", "stop", 1, 1)["choices"][0]["message"]
    assert "points" not in Reply(model="m").completion(text, "stop", 1, 1)["choices"][0]["message"]  # no image
