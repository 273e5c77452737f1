"""The whole model through ``load``: checkpoint formats, KV cache, batching, generation.

All on a tiny random checkpoint in the release's layout (``conftest.tiny_release``).
"""

import pytest
import torch

from molmoe_lite import load
from molmoe_lite.demo import demo_image
from molmoe_lite.generation import to_left_padding

PROMPT = "Describe this image."


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def image_inputs(tiny_model):
    return tiny_model.processor.process(images=demo_image(536, 354), text=PROMPT)


def test_bin_and_sharded_safetensors_give_identical_logits(tmp_path, tiny_model, image_inputs):
    from molmoe_lite.testing import write_tiny_release

    # same seed, another container: several shards plus an index
    folder = write_tiny_release(tmp_path / "sharded", seed=0, fmt="sharded", max_shard_bytes=200_000)
    assert len(list(folder.glob("model-*.safetensors"))) >= 3
    other = load(folder, device="cpu", dtype="float32")
    with torch.no_grad():
        a = tiny_model(**image_inputs)
        b = other(**image_inputs)
    assert a.shape == (1, image_inputs["input_ids"].numel(), tiny_model.config.embedding_size)
    assert torch.equal(a, b)


def test_image_features_are_added_at_their_patch_positions(tiny_model, image_inputs):
    # the merge written out by hand, index by index: feature (crop c, patch p) is added to the
    # token embedding at image_input_idx[c, p]; negative indices (dropped patches) add nothing
    ids, idx = image_inputs["input_ids"], image_inputs["image_input_idx"]
    with torch.no_grad():
        feats = tiny_model.model.vision_backbone(image_inputs["images"][None], image_inputs["image_masks"][None])[0]
        by_hand = tiny_model.model.transformer.embed(ids[None])[0].clone()
        placed = 0
        for c in range(idx.shape[0]):
            for p in range(idx.shape[1]):
                pos = int(idx[c, p])
                if pos >= 0:
                    by_hand[pos] += feats[c, p]
                    placed += 1
        merged = tiny_model.embed(ids[None], image_inputs["images"][None], idx[None],
                                  image_inputs["image_masks"][None])[0]
    assert placed > 0 and placed == int((ids == tiny_model.processor.tokenizer.convert_tokens_to_ids("<im_patch>")).sum())
    assert torch.allclose(merged, by_hand, rtol=0, atol=1e-6)
    # and the forward pass uses exactly that merge: the image changes the logits
    with torch.no_grad():
        with_image = tiny_model(**image_inputs)[0, -1]
        ids_only = tiny_model(image_inputs["input_ids"])[0, -1]
    assert _rel(with_image, ids_only) > 1e-3


def test_kv_cache_decoding_equals_full_recomputation(tiny_model, image_inputs):
    ids = image_inputs["input_ids"]
    n_extra = 5
    extra = torch.randint(3, 400, (n_extra,), generator=torch.Generator().manual_seed(0))
    full_ids = torch.cat([ids, extra])
    with torch.no_grad():
        full = tiny_model(full_ids, images=image_inputs["images"], image_input_idx=image_inputs["image_input_idx"],
                          image_masks=image_inputs["image_masks"])[0]
        cache = tiny_model.new_cache(1, full_ids.numel())
        first = tiny_model(**image_inputs, cache=cache, logits_at="last")[0, -1]
        steps = [first]
        mask = torch.ones(1, ids.numel(), dtype=torch.bool)
        for t in extra:
            mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.bool)], dim=1)
            steps.append(tiny_model(t.view(1, 1), attention_mask=mask, cache=cache, logits_at="last")[0, -1])
    stepped = torch.stack(steps)
    expected = full[ids.numel() - 1 :]
    assert _rel(stepped, expected) <= 1e-4


def test_right_padded_batch_equals_single_runs(tiny_model):
    proc = tiny_model.processor
    a = proc.process(images=demo_image(536, 354), text=PROMPT)
    b = proc.process(images=demo_image(300, 900), text="What is the colour of the roof?")
    batch = proc.collate([a, b])
    assert (batch["input_ids"] == -1).any(), "the two prompts should differ in length"
    with torch.no_grad():
        logits = tiny_model(**batch)
        for row, single in enumerate((a, b)):
            n = single["input_ids"].numel()
            alone = tiny_model(**single)[0]
            assert _rel(logits[row, :n], alone) <= 1e-4
    gen = tiny_model.generate_from_batch(batch, max_new_tokens=6)
    for row, single in enumerate((a, b)):
        alone = tiny_model.generate_from_batch(single, max_new_tokens=6)
        n = single["input_ids"].numel()
        assert gen[row, batch["input_ids"].shape[1] :].tolist() == alone[0, n:].tolist()


def test_to_left_padding_moves_image_indices_with_their_tokens():
    ids = torch.tensor([[5, 6, 7, -1, -1], [8, 9, 10, 11, 12]])
    idx = torch.tensor([[[1, 2, -100]], [[0, 4, -1]]])
    out = to_left_padding({"input_ids": ids, "image_input_idx": idx})
    assert out["input_ids"].tolist() == [[-1, -1, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert out["image_input_idx"].tolist() == [[[3, 4, -100]], [[0, 4, -1]]]


def test_generate_from_batch_with_the_model_cards_call(tiny_model, image_inputs):
    from transformers import GenerationConfig

    batch = {k: v[None] for k, v in image_inputs.items()}
    tok = tiny_model.processor.tokenizer
    out = tiny_model.generate_from_batch(
        batch, GenerationConfig(max_new_tokens=7, stop_strings="<|endoftext|>"), tokenizer=tok
    )
    n = batch["input_ids"].shape[1]
    assert out.shape[0] == 1 and n < out.shape[1] <= n + 7
    assert torch.equal(out[0, :n], batch["input_ids"][0])
    # greedy: the first new token is the argmax of the prompt's last logits
    with torch.no_grad():
        expected_first = tiny_model(**image_inputs)[0, -1].argmax()
    assert int(out[0, n]) == int(expected_first)


def test_generate_text_equals_stream_and_stops_at_max(tiny_model):
    from transformers import GenerationConfig

    image = demo_image()
    text = tiny_model.generate(image, PROMPT, max_new_tokens=10)
    pieces = list(tiny_model.generate(image, PROMPT, max_new_tokens=10, stream=True))
    assert "".join(pieces) == text
    assert all(pieces)
    # the text is the decode of exactly the first 10 greedy tokens (fewer only at EOS)
    tok = tiny_model.processor.tokenizer
    inputs = tiny_model.processor.process(images=image, text=PROMPT)
    out = tiny_model.generate_from_batch(inputs, GenerationConfig(max_new_tokens=10, eos_token_id=10**9))
    new = out[0, inputs["input_ids"].numel():].tolist()
    assert len(new) == 10
    kept = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert text == tok.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_text_only_prompt(tiny_model):
    tok = tiny_model.processor.tokenizer
    ids = tiny_model.processor.process(images=None, text="Hello there")["input_ids"]
    assert "<im_patch>" not in tok.decode(ids.tolist(), skip_special_tokens=False)
    out = []
    with torch.no_grad():  # greedy by full recomputation, no image
        for _ in range(4):
            t = int(tiny_model(torch.cat([ids, torch.tensor(out, dtype=ids.dtype)]))[0, -1].argmax())
            if t == tok.eos_token_id:
                break
            out.append(t)
    want = tok.decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert tiny_model.generate(None, "Hello there", max_new_tokens=4) == want


def test_streaming_holds_back_partial_multibyte_characters(tiny_model, monkeypatch):
    tok = tiny_model.processor.tokenizer
    text = "naïve 🙂 café — 東京"
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    # at least one character spans several byte tokens, or the test shows nothing
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))

    def fake_tokens(self, batch, settings, tokenizer=None):
        for t in ids + [tok.eos_token_id]:
            yield torch.tensor([t])

    monkeypatch.setattr(type(tiny_model), "stream_tokens", fake_tokens)
    pieces = list(tiny_model.generate(None, "x", stream=True))
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_prompt_longer_than_context_is_a_clear_error(tiny_model):
    inputs = tiny_model.processor.process(images=None, text="word " * 50)
    ctx = tiny_model.config.max_sequence_length
    with pytest.raises(ValueError, match="context"):
        tiny_model.generate_from_batch(inputs, max_new_tokens=ctx)


@pytest.mark.parametrize("embed_in_step", [True, False], ids=["lookup_in_step", "table_elsewhere"])
def test_static_decode_steps_equal_full_recomputation(tiny_model, image_inputs, embed_in_step):
    # table_elsewhere: the lookup runs before the step, as with `small`'s CPU-resident table on a GPU
    from molmoe_lite.fast_decode import StaticDecoder

    ids = image_inputs["input_ids"]
    extra = torch.randint(3, 400, (4,), generator=torch.Generator().manual_seed(1))
    full_ids = torch.cat([ids, extra])
    with torch.no_grad():
        full = tiny_model(full_ids, images=image_inputs["images"], image_input_idx=image_inputs["image_input_idx"],
                          image_masks=image_inputs["image_masks"])[0]
        # a cache with spare slots: the static step must mask the unfilled ones out
        cache = tiny_model.new_cache(1, full_ids.numel() + 3)
        first = tiny_model(**image_inputs, cache=cache, logits_at="last")[0, -1]
        decoder = StaticDecoder(tiny_model, cache, torch.ones(1, ids.numel(), dtype=torch.bool))
        assert not decoder.use_graph and not decoder.captured  # CPU: eager
        assert decoder.embed_in_step  # the table is on the model's device
        decoder.embed_in_step = embed_in_step
        steps = [first] + [decoder.step(t.view(1)).clone()[0] for t in extra]
    assert cache.length == full_ids.numel()
    assert _rel(torch.stack(steps), full[ids.numel() - 1 :]) <= 1e-4


def _decode_at_slot(t, embeds, key_mask, cache, slot, kv_len):
    """One decode step of every row at the same cache slot, attending over the first kv_len slots
    (what a captured step does); each row's position is its count of real keys so far."""
    from molmoe_lite.model.decoder import real_positions

    slots = slot.expand(embeds.shape[0])
    return t.run(embeds, real_positions(key_mask, slots, kv_len), key_mask[:, :kv_len], cache, slots)


@pytest.mark.parametrize("extra_slots", [0, 1, 7, None], ids=["exact", "one-spare", "bucket", "whole-cache"])
def test_static_step_is_independent_of_how_many_unfilled_slots_it_reads(tiny_model, image_inputs, extra_slots):
    # a captured step reads up to a bucket boundary; masked, unfilled slots must not matter
    ids = image_inputs["input_ids"]
    n = ids.numel()
    t = tiny_model.model.transformer
    with torch.no_grad():
        cache = tiny_model.new_cache(1, n + 8)
        tiny_model(**image_inputs, cache=cache, logits_at="last")
        mask = torch.zeros(1, n + 8, dtype=torch.bool)
        mask[:, : n + 1] = True
        pos = torch.tensor([n])
        embeds = t.embed(torch.tensor([[42]]))
        exact = _decode_at_slot(t, embeds, mask, cache, pos, n + 1)
        kv_len = None if extra_slots is None else n + 1 + extra_slots
        got = _decode_at_slot(t, embeds, mask, cache, pos, kv_len)
    assert _rel(got, exact) <= 1e-6


def test_any_of_several_eos_ids_stops_a_row(tiny_model, image_inputs):
    from transformers import GenerationConfig

    with torch.no_grad():
        first = int(tiny_model(**image_inputs)[0, -1].argmax())
    other = (first + 1) % 400
    out = tiny_model.generate_from_batch(image_inputs, GenerationConfig(max_new_tokens=6, eos_token_id=[other, first]))
    n = image_inputs["input_ids"].numel()
    assert out[0, n:].tolist() == [first]
