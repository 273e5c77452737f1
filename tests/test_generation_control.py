"""What ends a generation and how rows are laid out, through the public API only.

The reference for every test is greedy decoding written out here: the model's plain forward
pass over the whole sequence so far, argmax of the last position, one token at a time. So
``generate_from_batch`` and ``generate`` are checked token by token (stop strings, EOS,
``max_new_tokens`` counts, padding of rows that finished early, input already left-padded)
without trusting the generation code.
"""

from __future__ import annotations

import pytest
import torch

from molmoe_lite.demo import demo_image
from molmoe_lite.errors import MolmoeLiteError

NEVER = 10**9  # an EOS id no step can produce: rows run to max_new_tokens


def greedy_by_hand(model, inputs: dict, n: int, eos: set[int] = frozenset()) -> list[int]:
    """Up to n greedy tokens by full recomputation (stops after an EOS id, which is kept)."""
    ids = inputs["input_ids"]
    image_kw = {k: inputs[k] for k in ("images", "image_input_idx", "image_masks") if k in inputs}
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([ids, torch.tensor(out, dtype=ids.dtype)])
            t = int(model(seq, **image_kw)[0, -1].argmax())
            out.append(t)
            if t in eos:
                break
    return out


@pytest.fixture(scope="module")
def text_inputs(tiny_model):
    return tiny_model.processor.process(images=None, text="Tell me a story.")


@pytest.fixture(scope="module")
def greedy12(tiny_model, text_inputs):
    return greedy_by_hand(tiny_model, text_inputs, 12)


def new_tokens(out: torch.Tensor, inputs: dict) -> list[int]:
    return out[0, inputs["input_ids"].numel():].tolist()


def test_max_new_tokens_is_the_count_of_new_tokens(tiny_model, text_inputs, greedy12):
    from transformers import GenerationConfig

    for n in (1, 5, 12):
        out = tiny_model.generate_from_batch(text_inputs, GenerationConfig(max_new_tokens=n, eos_token_id=NEVER))
        assert out.shape == (1, text_inputs["input_ids"].numel() + n)
        assert new_tokens(out, text_inputs) == greedy12[:n]


def test_max_new_tokens_zero_returns_the_prompt(tiny_model, text_inputs):
    out = tiny_model.generate_from_batch(text_inputs, max_new_tokens=0)
    assert torch.equal(out, text_inputs["input_ids"][None])
    assert tiny_model.generate(None, "Tell me a story.", max_new_tokens=0) == ""
    assert list(tiny_model.generate(None, "Tell me a story.", max_new_tokens=0, stream=True)) == []


def test_generate_text_is_the_decoded_greedy_tokens(tiny_model, greedy12):
    tok = tiny_model.processor.tokenizer
    eos = tok.eos_token_id
    kept = greedy12[: greedy12.index(eos)] if eos in greedy12 else greedy12
    want = tok.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert tiny_model.generate(None, "Tell me a story.", max_new_tokens=12) == want
    assert "".join(tiny_model.generate(None, "Tell me a story.", max_new_tokens=12, stream=True)) == want


def _first_hit(tokens: list[int], stop: str, tok) -> int:
    """Tokens up to and including the first at which the text (as a user is shown it) holds ``stop``."""
    for k in range(1, len(tokens) + 1):
        if stop in tok.decode(tokens[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False):
            return k
    raise AssertionError("the stop string never appears")


def test_a_stop_string_ends_the_generation_where_it_appears(tiny_model, text_inputs, greedy12):
    tok = tiny_model.processor.tokenizer
    # a stop string the greedy answer really produces: the text of its 4th token
    pieces = [tok.decode([t], skip_special_tokens=False) for t in greedy12]
    j = next(i for i in range(3, 12) if pieces[i].strip() and "\ufffd" not in pieces[i])
    stop = pieces[j]
    k = _first_hit(greedy12, stop, tok)
    assert k < 12
    out = tiny_model.generate_from_batch(text_inputs, max_new_tokens=12, stop_strings=[stop, "never-there"],
                                         tokenizer=tok)
    assert new_tokens(out, text_inputs) == greedy12[:k]
    from transformers import GenerationConfig

    out = tiny_model.generate_from_batch(text_inputs, GenerationConfig(max_new_tokens=12, stop_strings=stop),
                                         tokenizer=tok)
    assert new_tokens(out, text_inputs) == greedy12[:k]


def test_stop_strings_without_any_tokenizer_are_refused(tiny_model, text_inputs, monkeypatch):
    monkeypatch.setattr(tiny_model, "processor", None)
    with pytest.raises(MolmoeLiteError, match="tokenizer"):
        tiny_model.generate_from_batch(text_inputs, max_new_tokens=3, stop_strings="x")


def test_rows_that_finish_early_are_padded(tiny_model):
    from transformers import GenerationConfig

    proc = tiny_model.processor
    a = proc.process(images=None, text="Tell me a story.")
    b = proc.process(images=None, text="What is the weather like today?")
    first_a = greedy_by_hand(tiny_model, a, 1)[0]
    rest_b = greedy_by_hand(tiny_model, b, 6, eos={first_a})
    assert len(rest_b) == 6, "row b must not stop on row a's first token"
    pad = 7
    settings = GenerationConfig(max_new_tokens=6, eos_token_id=first_a, pad_token_id=pad)
    out = tiny_model.generate_from_batch(proc.collate([a, b]), settings)
    width = max(a["input_ids"].numel(), b["input_ids"].numel())
    assert out.shape == (2, width + 6)
    assert out[0, width:].tolist() == [first_a] + [pad] * 5  # stopped at its EOS, then padded
    assert out[1, width:].tolist() == rest_b


def test_input_already_left_padded_gives_what_each_row_gets_alone(tiny_model):
    proc = tiny_model.processor
    a = proc.process(images=demo_image(300, 200), text="Describe this image.")
    b = proc.process(images=demo_image(536, 354), text="What is the colour of the roof in this picture?")
    assert a["input_ids"].numel() != b["input_ids"].numel()
    batch = proc.collate([a, b])
    # move the shorter row's pads to the left by hand; its image indices shift by the pad count
    width = batch["input_ids"].shape[1]
    short = 0 if a["input_ids"].numel() < b["input_ids"].numel() else 1
    n_short = min(a["input_ids"].numel(), b["input_ids"].numel())
    shift = width - n_short
    ids = batch["input_ids"].clone()
    ids[short] = torch.cat([torch.full((shift,), -1), batch["input_ids"][short, :n_short]])
    idx = batch["image_input_idx"].clone()
    idx[short] = torch.where(idx[short] >= 0, idx[short] + shift, idx[short])
    left = {**batch, "input_ids": ids, "image_input_idx": idx}
    out = tiny_model.generate_from_batch(left, max_new_tokens=4)
    for row, single in ((0, a), (1, b)):
        alone = greedy_by_hand(tiny_model, single, 4, eos={proc.tokenizer.eos_token_id})
        assert out[row, width:].tolist()[: len(alone)] == alone, row


def test_float16_overflow_is_a_clear_error(tiny_release):
    from molmoe_lite import load

    model = load(tiny_release, device="cpu", dtype="float16")
    with torch.no_grad():
        model.lm_head.weight.mul_(6e4)  # logits past float16's 65504
    inputs = model.processor.process(images=None, text="Hi")
    with pytest.raises(FloatingPointError, match="float16.*bfloat16"):
        model.generate_from_batch(inputs, max_new_tokens=2)
