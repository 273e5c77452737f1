"""Streamed text (``TextPieces``): the pieces join to the full decode, at bounded cost per id,
and ``TextPieces`` is where a stop string is found (the engine ends a row on its word).

Seeded random id sequences go through ``TextPieces`` one id at a time, over the project's
tiny tokenizer and, when the release's files are beside the checkout, the real one. After
every push the joined pieces are compared with what the full decode of the ids so far
says may be shown (written out here from the full decode, not from the class): cut before
the first stop string; else unchanged while the text ends in an incomplete UTF-8
character; else all of it, less an ending that could begin a stop string. ``stopped`` must
say, after every push, whether that full decode holds a stop string: a row ends at the id
that completes one, never an id later. After ``close`` the pieces are the full decode, cut
before the first stop string. Named cases over a tokenizer whose ids are given byte
strings pin the OpenAI ``stop`` semantics the server relies on. A counting tokenizer
measures how many ids each push decodes: a few, however long the row is.
"""

from __future__ import annotations

import random

import pytest

from molmoe_lite.sampling import TextPieces, stop_token_ids
from molmoe_lite.testing import write_tiny_tokenizer
from molmoe_lite.tokenizer import load_tokenizer

# Text with characters of 2, 3 and 4 UTF-8 bytes, whose ids split them across tokens.
WORDS = ["The", " cat", " is", " on", " the", " sofa", ".", "\n", " héllo", " 日本語", " 🙂", "🙃", "é",
         " naïve", " €5", "Assistant:", " lake", "  ", "語"]
STOPS = (" the sofa", "🙂", "日本", "\n\n", "lake.")


@pytest.fixture(scope="module", params=["tiny", "real"])
def tok(request, tmp_path_factory):
    if request.param == "tiny":
        return load_tokenizer(write_tiny_tokenizer(tmp_path_factory.mktemp("text-pieces-tok")))
    return load_tokenizer(request.getfixturevalue("real_release_dir"))


class CountingTokenizer:
    """A tokenizer whose ``decode`` records how many ids it was given."""

    def __init__(self, tok):
        self.tok = tok
        self.decoded = 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.tok.decode(ids, **kw)


def full_decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def specials(tok) -> list[int]:
    """Ids that decode to nothing (special tokens, image tokens among them)."""
    return [i for i in tok.get_added_vocab().values() if full_decode(tok, [i]) == ""]


def text_ids(tok, rng: random.Random, n: int) -> list[int]:
    """About n ids: random words (multi-byte characters among them), a special id between
    some of them (never two in a row)."""
    ids: list[int] = []
    extra = specials(tok)
    assert extra, "the tokenizer should have special tokens"
    while len(ids) < n:
        if rng.random() < 0.15 and ids and ids[-1] not in extra:
            ids.append(rng.choice(extra))
        else:
            ids.extend(tok.encode(rng.choice(WORDS), add_special_tokens=False))
    return ids[:n]


def random_ids(tok, rng: random.Random, n: int) -> list[int]:
    """Any ids of the vocabulary: invalid UTF-8 byte runs, specials, anything."""
    return [rng.randrange(len(tok)) for _ in range(n)]


class BytesTokenizer:
    """Id ``i`` is the byte string ``pieces[i]``; a decode joins the bytes and reads UTF-8."""

    def __init__(self, pieces: list[bytes]):
        self.pieces = pieces

    def decode(self, ids, **_kw):
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


def showable(text: str, stops: tuple[str, ...], before: str) -> str:
    """What may be shown of the full decode ``text``, ``before`` being what was shown before."""
    cuts = [text.find(s) for s in stops if s in text]
    if cuts:  # the characters before an incomplete one are final: a stop string among them counts
        return text[: min(cuts)]
    if text.endswith("\ufffd"):  # an incomplete character: wait for its last byte
        return before
    for n in range(min(len(text), max((len(s) for s in stops), default=0)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return text[:-n]
    return text


def stream(tok, ids, stops=()):
    """Push ids one at a time, checking the shown text and ``stopped`` after each; the pieces
    and the counter."""
    counting = CountingTokenizer(tok)
    pieces = TextPieces(counting, stops)
    shown, per_push = "", []
    for k in range(len(ids)):
        counting.decoded = 0
        shown += pieces.push(ids[k])
        per_push.append(counting.decoded)
        text = full_decode(tok, ids[: k + 1])
        assert shown == showable(text, stops, shown if k else ""), f"after {k + 1} ids"
        assert not any(s in shown for s in stops)
        assert pieces.stopped == any(s in text for s in stops), f"after {k + 1} ids"
    shown += pieces.close()
    return shown, pieces, per_push


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("make", [text_ids, random_ids], ids=["words_and_specials", "any_ids"])
def test_pieces_join_to_the_full_decode(tok, make, seed):
    ids = make(tok, random.Random(seed), 200)
    shown, pieces, _ = stream(tok, ids)
    assert shown == pieces.text == full_decode(tok, ids)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_stop_strings_hold_back_and_cut(tok, seed):
    ids = text_ids(tok, random.Random(seed), 120)
    full = full_decode(tok, ids)
    assert any(s in full for s in STOPS), "the sequence should contain a stop string"
    shown, pieces, _ = stream(tok, ids, STOPS)
    assert pieces.stopped
    assert shown == pieces.text == cut_at_stop(full, STOPS)


@pytest.mark.parametrize("stop", ["😀😀", "東京", "###", "\n\n"], ids=["emoji-4-bytes-each", "cjk", "ascii", "newlines"])
def test_a_stop_string_at_the_end_is_seen_at_its_last_id(tok, stop):
    ids = tok.encode("some answer text " + stop, add_special_tokens=False)
    assert stop not in full_decode(tok, ids[:-1])
    shown, pieces, _ = stream(tok, ids, (stop,))  # checks ``stopped`` after every id
    assert pieces.stopped and shown == "some answer text "


# (name, the ids' byte strings, stop strings, the answer, ids pushed when ``stopped`` turns true)
NAMED = [
    ("no_stop", [b"ab", b"cd"], ("x",), "abcd", None),
    ("stop_inside_a_piece", [b"abXYcd"], ("XY",), "ab", 1),
    ("stop_across_pieces", [b"abX", b"Ycd"], ("XY",), "ab", 2),
    ("false_start_released", [b"abX", b"Zcd"], ("XY",), "abXZcd", None),
    ("false_start_at_the_end", [b"abX"], ("XY",), "abX", None),
    ("earliest_of_two", [b"a1b2"], ("2", "1"), "a", 1),
    ("stop_at_start", [b"XYz"], ("XY",), "", 1),
    ("stop_then_an_incomplete_character", [b"aXY\xe2", b"\x82\xac"], ("XY",), "a", 1),
    ("stop_after_a_completed_character", [b"a\xe2", b"\x82\xacXY"], ("\u20acXY",), "a", 2),
    ("false_start_then_stop", [b"aX", b"ZX", b"Yb"], ("XY",), "aXZ", 3),
]


@pytest.mark.parametrize("name, pieces, stops, answer, stopped_at", NAMED, ids=[case[0] for case in NAMED])
def test_named_stop_cases(name, pieces, stops, answer, stopped_at):
    tok = BytesTokenizer(pieces)
    ids = list(range(len(pieces)))
    shown, text, _ = stream(tok, ids, stops)  # nothing shown is ever taken back
    assert shown == text.text == answer
    flags = []
    again = TextPieces(tok, stops)
    for i in ids:
        again.push(i)
        flags.append(again.stopped)
    assert flags == [stopped_at is not None and k + 1 >= stopped_at for k in range(len(ids))]


def test_multibyte_characters_are_split_across_ids(tok):
    """The words really exercise held-back characters: some id ends inside a character."""
    ids = tok.encode("".join(WORDS), add_special_tokens=False)
    assert any(full_decode(tok, ids[:k]).endswith("\ufffd") for k in range(1, len(ids)))
    shown, _, _ = stream(tok, ids)
    assert shown == "".join(WORDS)


def test_a_token_running_past_a_stop_string_shows_nothing_after_it(tok):
    ids = tok.encode("Assistant: The cat is on the sofa", add_special_tokens=False)
    texts = [full_decode(tok, ids[:k]) for k in range(len(ids) + 1)]
    # a stop string that ends inside an id carrying two more characters
    k = next(k for k in range(2, len(ids)) if len(texts[k + 1]) - len(texts[k]) >= 3 and texts[k][-2:].strip())
    stop = texts[k][-2:] + texts[k + 1][len(texts[k])]
    shown, pieces, _ = stream(tok, ids[: k + 1], (stop,))
    assert shown == pieces.text == texts[k][:-2]


def test_each_push_decodes_a_few_ids(tok):
    ids = text_ids(tok, random.Random(7), 300)
    shown, _, per_push = stream(tok, ids)
    assert shown == full_decode(tok, ids)
    # A push decodes the ids of the last finished piece of text (the context) and the ids
    # after it, and the context alone once after it moved. Here a piece is at most a
    # special id and a character of <= 4 byte ids, so that is <= 5 + (5 + 1) ids; decoding
    # all the ids so far would be up to 300.
    assert max(per_push) <= 11, max(per_push)


def test_no_tokenizer_gives_no_text():
    pieces = TextPieces(None, ("x",))
    assert pieces.push(5) == "" and pieces.close() == "" and pieces.text == "" and not pieces.stopped


def test_stop_strings_naming_special_tokens_are_stop_tokens(tok):
    """A special token shows no text, so its name can only end a row as a token."""
    added = tok.get_added_vocab()
    hidden = [t for t, i in added.items() if full_decode(tok, [i]) == ""]
    assert "<|endoftext|>" in hidden and "<im_end>" in hidden
    stops = ("<|endoftext|>", "<im_end>", "sofa", "<im_en")
    assert stop_token_ids(stops, tok) == {added["<|endoftext|>"], added["<im_end>"]}
    assert stop_token_ids((), tok) == set() and stop_token_ids(stops, None) == set()
