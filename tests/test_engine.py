"""The engine: continuous batching over one static KV cache, on the tiny random model (CPU).

Scheduling is checked by counting steps (``Engine.step`` when the loop is not started), never
by timing; answers are checked against ``model.generate`` / ``generate_from_batch`` on the
same prompt alone.
"""

from __future__ import annotations

import threading

import pytest
import torch

from molmoe_lite.demo import demo_image
from molmoe_lite.engine import Completion, ContextLengthError, Engine, EngineFullError
from molmoe_lite.errors import MolmoeLiteError
from molmoe_lite.generation import SamplingSettings

# (image size or None for text only, prompt): different lengths, so rows sit at different positions
PROMPTS = [
    ((536, 354), "Describe this image."),
    (None, "Hello there, how are you today?"),
    ((300, 900), "What is the colour of the roof?"),
    (None, "Hi"),
]


def inputs_for(model, case):
    size, text = case
    return model.processor.process(images=None if size is None else demo_image(*size), text=text)


def solo_text(model, case, **kw) -> str:
    size, text = case
    return model.generate(None if size is None else demo_image(*size), text, **kw)


def solo_ids(model, inputs, **kw) -> list[int]:
    out = model.generate_from_batch(inputs, **kw)
    return out[0, inputs["input_ids"].numel():].tolist()


def run_to_end(engine: Engine, limit: int = 200) -> int:
    """Step until nothing runs or waits; the number of steps."""
    for steps in range(1, limit + 1):
        if engine.step() == 0 and engine.waiting == 0:
            return steps
    raise AssertionError("the engine did not finish")


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


def test_greedy_rows_equal_their_solo_answers(model):
    engine = Engine(model, max_batch=4, max_context=1024)
    settings = SamplingSettings(max_new_tokens=7)
    handles = [engine.submit(inputs_for(model, case), settings) for case in PROMPTS]
    run_to_end(engine)
    for case, handle in zip(PROMPTS, handles):
        result = handle.result(timeout=0)
        inputs = inputs_for(model, case)
        assert result.text == solo_text(model, case, max_new_tokens=7), case
        assert result.token_ids == solo_ids(model, inputs, max_new_tokens=7), case
        assert result.prompt_tokens == inputs["input_ids"].numel()
        assert result.completion_tokens == len(result.token_ids)
        assert result.finish_reason in ("stop", "length")


def cache_rows_close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm() / b.norm()) <= 1e-5


def test_a_request_arriving_mid_decode_joins_before_the_running_ones_finish(model):
    """The late request joins at the next step, finishes first, and its cache row (written by its
    prefill and by decode steps shared with the other row) holds what it holds alone."""
    engine = Engine(model, max_batch=2, max_context=1024)
    first = engine.submit(inputs_for(model, PROMPTS[0]), SamplingSettings(max_new_tokens=12, eos_token_id=-5))
    for _ in range(3):  # prefill, then two decode steps
        assert engine.step() == 1
    late = engine.submit(inputs_for(model, PROMPTS[3]), SamplingSettings(max_new_tokens=5, eos_token_id=-5))
    assert engine.step() == 2, "the late request must join at the next step"
    assert not first.done
    steps = run_to_end(engine)
    assert late.done and first.done
    # the late one (5 tokens) ends while the first (12) still runs: 4 more steps after its prefill
    assert len(late.result().token_ids) == 5 and len(first.result().token_ids) == 12
    assert steps == 12 - 4  # the first row's remaining steps
    for case, handle, n in ((PROMPTS[0], first, 12), (PROMPTS[3], late, 5)):
        ids = solo_ids(model, inputs_for(model, case), max_new_tokens=n, eos_token_id=-5)
        assert handle.result().token_ids == ids

    alone = Engine(model, max_batch=1, max_context=1024)
    alone.submit(inputs_for(model, PROMPTS[3]), SamplingSettings(max_new_tokens=5, eos_token_id=-5))
    run_to_end(alone)
    filled = late.prompt_tokens + 5 - 1  # the last token is never fed back
    for got, want in ((engine.cache.k, alone.cache.k), (engine.cache.v, alone.cache.v)):
        assert cache_rows_close(got[:, 1, :, :filled], want[:, 0, :, :filled])


def test_a_finished_rows_slot_is_reused_without_leaking_its_keys(model):
    """One row: the long prompt's cache row is refilled by a shorter prompt; its stale keys beyond
    the new prompt must not be seen."""
    engine = Engine(model, max_batch=1, max_context=1024)
    settings = SamplingSettings(max_new_tokens=4, eos_token_id=-5)
    long_one = engine.submit(inputs_for(model, PROMPTS[0]), settings)
    short_one = engine.submit(inputs_for(model, PROMPTS[3]), settings)
    for _ in range(4):
        engine.step()
        assert engine.waiting == 1 and not short_one.done
    assert long_one.done
    assert engine.step() == 1 and engine.rows[0] is not None  # the short one took row 0 at once
    run_to_end(engine)
    assert short_one.result().token_ids == solo_ids(model, inputs_for(model, PROMPTS[3]), max_new_tokens=4,
                                                     eos_token_id=-5)


def test_seeded_sampling_is_the_same_alone_or_in_a_batch(model):
    sampled = SamplingSettings(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=7, eos_token_id=-5)
    alone = Engine(model, max_batch=1, max_context=1024)
    h_alone = alone.submit(inputs_for(model, PROMPTS[1]), sampled)
    run_to_end(alone)
    batch = Engine(model, max_batch=3, max_context=1024)
    others = [batch.submit(inputs_for(model, PROMPTS[0]), SamplingSettings(
        max_new_tokens=8, temperature=1.0, seed=1, eos_token_id=-5))]
    h_batch = batch.submit(inputs_for(model, PROMPTS[1]), sampled)
    others.append(batch.submit(inputs_for(model, PROMPTS[2]), SamplingSettings(max_new_tokens=3)))
    run_to_end(batch)
    assert h_batch.result().token_ids == h_alone.result().token_ids
    greedy = solo_ids(model, inputs_for(model, PROMPTS[1]), max_new_tokens=8, eos_token_id=-5)
    assert h_alone.result().token_ids != greedy, "temperature 1 should leave the greedy path"


def first_stop(model, ids: list[int], stop: str) -> int:
    """How many of ``ids`` it takes for their text (as a user is shown it) to hold ``stop``."""
    tok = model.processor.tokenizer
    decode = lambda k: tok.decode(ids[:k], skip_special_tokens=True, clean_up_tokenization_spaces=False)  # noqa: E731
    return next(k for k in range(1, len(ids) + 1) if stop in decode(k))


def test_stop_string_ends_the_row_and_is_cut_from_the_text(model):
    case, other = PROMPTS[1], PROMPTS[3]
    full = solo_text(model, case, max_new_tokens=12)
    assert len(full) >= 6, full
    stop = full[3:5]
    greedy = solo_ids(model, inputs_for(model, case), max_new_tokens=12, eos_token_id=-5)
    k = first_stop(model, greedy, stop)
    assert k < 12, "the stop string should end the row before max_new_tokens"
    engine = Engine(model, max_batch=2, max_context=1024)
    handle = engine.submit(inputs_for(model, case), SamplingSettings(max_new_tokens=12, stop_strings=(stop,)))
    # a row beside it, without stop strings, runs on to its own end
    beside = engine.submit(inputs_for(model, other), SamplingSettings(max_new_tokens=12, eos_token_id=-5))
    run_to_end(engine)
    pieces = list(handle.stream())
    result = handle.result()
    assert result.finish_reason == "stop"
    assert result.text == full[: full.find(stop)]
    assert "".join(pieces) == result.text
    # decoding ends at the id that completes the stop string, not one later
    assert result.token_ids == greedy[:k] and result.completion_tokens == k
    alone = beside.result()
    assert alone.finish_reason == "length"
    assert alone.token_ids == solo_ids(model, inputs_for(model, other), max_new_tokens=12, eos_token_id=-5)


def test_a_stop_string_naming_a_special_token_ends_the_row_at_it(model, monkeypatch):
    """Special tokens show no text, so their stop strings end a row as an EOS id does."""
    import molmoe_lite.engine as engine_module

    tok = model.processor.tokenizer
    special = tok.convert_tokens_to_ids("<im_end>")
    real_sample = engine_module.sample_rows
    calls = []

    def third_is_special(logits, settings, generators):  # the model emits <im_end> as its 3rd token
        calls.append(1)
        tokens = real_sample(logits, settings, generators)
        return [special] * len(tokens) if len(calls) == 3 else tokens

    monkeypatch.setattr(engine_module, "sample_rows", third_is_special)
    results = {}
    for stops in [("<im_end>",), ("never-there",)]:
        calls.clear()
        engine = Engine(model, max_batch=1, max_context=1024)
        handle = engine.submit(inputs_for(model, PROMPTS[1]),
                               SamplingSettings(max_new_tokens=6, stop_strings=stops, eos_token_id=-5))
        run_to_end(engine)
        results[stops[0]] = handle.result()
    named, unnamed = results["<im_end>"], results["never-there"]
    assert named.finish_reason == "stop" and named.token_ids == unnamed.token_ids[:3]
    assert named.token_ids[2] == special
    assert unnamed.finish_reason == "length" and len(unnamed.token_ids) == 6
    assert named.text == tok.decode(named.token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_streamed_pieces_join_to_the_text(model):
    engine = Engine(model, max_batch=2, max_context=1024)
    handle = engine.submit(inputs_for(model, PROMPTS[0]), SamplingSettings(max_new_tokens=10))
    run_to_end(engine)
    assert "".join(handle.stream()) == handle.result().text == solo_text(model, PROMPTS[0], max_new_tokens=10)


def test_cancel_frees_the_row_at_the_next_step(model):
    engine = Engine(model, max_batch=1, max_context=1024)
    settings = SamplingSettings(max_new_tokens=50, eos_token_id=-5)
    gone = engine.submit(inputs_for(model, PROMPTS[1]), settings)
    waiting = engine.submit(inputs_for(model, PROMPTS[3]), SamplingSettings(max_new_tokens=2))
    engine.step()
    engine.step()
    gone.cancel()
    assert engine.step() == 1 and engine.rows[0] is not None and not waiting.done
    result = gone.result(timeout=0)
    assert result.finish_reason == "cancelled" and len(result.token_ids) == 2
    run_to_end(engine)
    assert waiting.result().token_ids == solo_ids(model, inputs_for(model, PROMPTS[3]), max_new_tokens=2)


@pytest.mark.parametrize("over", [1, 1000], ids=["one_over", "far_over"])
def test_a_request_that_cannot_fit_is_refused_at_once(model, over):
    engine = Engine(model, max_batch=1, max_context=256)
    inputs = inputs_for(model, PROMPTS[1])
    fits = 256 - inputs["input_ids"].numel()
    engine.submit(inputs, SamplingSettings(max_new_tokens=fits))  # exactly full: accepted
    with pytest.raises(ContextLengthError, match="context") as err:
        engine.submit(inputs, SamplingSettings(max_new_tokens=fits + over))
    assert isinstance(err.value, MolmoeLiteError) and isinstance(err.value, ValueError)
    assert engine.waiting == 1


def test_a_full_queue_is_refused(model):
    engine = Engine(model, max_batch=1, max_context=1024, max_queue=2)
    for _ in range(2):
        engine.submit(inputs_for(model, PROMPTS[3]), SamplingSettings(max_new_tokens=1))
    with pytest.raises(EngineFullError):
        engine.submit(inputs_for(model, PROMPTS[3]), SamplingSettings(max_new_tokens=1))
    assert issubclass(EngineFullError, MolmoeLiteError)


def test_zero_new_tokens_finishes_without_a_row(model):
    engine = Engine(model, max_batch=1, max_context=1024)
    handle = engine.submit(inputs_for(model, PROMPTS[3]), SamplingSettings(max_new_tokens=0))
    assert engine.step() == 0
    assert handle.result(timeout=0) == Completion("", [], "length", handle.prompt_tokens, 0)


def test_the_loop_thread_answers_concurrent_submissions_and_shuts_down(model):
    engine = Engine(model, max_batch=2, max_context=1024).start()
    results: dict[int, str] = {}

    def ask(i: int) -> None:
        handle = engine.submit(inputs_for(model, PROMPTS[i]), SamplingSettings(max_new_tokens=5))
        results[i] = "".join(handle.stream())

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    with pytest.raises(Exception, match="step"):
        engine.step()  # the loop owns the model
    never_admitted = engine.submit(inputs_for(model, PROMPTS[3]), SamplingSettings(max_new_tokens=500))
    engine.shutdown()
    assert never_admitted.result(timeout=5).finish_reason in ("cancelled", "length", "stop")
    for i in range(len(PROMPTS)):
        assert results[i] == solo_text(model, PROMPTS[i], max_new_tokens=5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decode_step_with_rows_at_different_slots_equals_eager(tiny_release):
    """The captured step over a row bucket (one row free, rows at different slots) against the same
    step run eagerly with the same shapes; then the engine with graphs against the engine without."""
    from molmoe_lite import load
    from molmoe_lite.fast_decode import DecodeStep

    model = load(tiny_release, device="cuda", dtype=torch.bfloat16, quantize="int4")
    prompts = [inputs_for(model, case) for case in PROMPTS[:3]]
    logits = {}
    for use_graph in (False, True):
        engine = Engine(model, max_batch=4, max_context=1024)
        for p in prompts:
            engine.submit(p, SamplingSettings(max_new_tokens=40, eos_token_id=-5))
        engine.step()  # three prefills: rows at three lengths, row 3 free
        step = DecodeStep(model, engine.cache, use_graph=use_graph)
        step.key_mask.fill_(True)
        lengths = [engine.rows[b].length for b in range(3)] + [0]
        step.set_tokens(4, torch.tensor([5, 17, 42, 0], device="cuda"))
        step.slots.copy_(torch.tensor(lengths, device="cuda"))
        logits[use_graph] = step.run(4, 1024)[:3].float().clone()
        assert step.captured == use_graph
    rel = float((logits[True] - logits[False]).norm() / logits[False].norm())
    assert rel <= 1e-3, rel

    # the whole engine, captured against eager steps of the very same shapes (row and slot buckets)
    answers = {}
    for use_graph in (False, True):
        engine = Engine(model, max_batch=4, max_context=1024)
        assert engine.decoder.bucketed
        engine.decoder.use_graph = use_graph
        handles = [engine.submit(p, SamplingSettings(max_new_tokens=12, eos_token_id=-5)) for p in prompts[:2]]
        engine.step()
        engine.step()
        handles.append(engine.submit(prompts[2], SamplingSettings(max_new_tokens=12, eos_token_id=-5)))
        run_to_end(engine)
        assert engine.decoder.captured == use_graph
        answers[use_graph] = [h.result().token_ids for h in handles]
    assert answers[True] == answers[False]
