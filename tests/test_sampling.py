"""Sampling draws from the distribution temperature and top_p describe.

The expected distribution is written out here from the model's own logits for one prompt
(its plain forward pass): ``softmax(logits / T)``, cut to the smallest top set whose mass
reaches top_p and renormalised. Many draws from those logits (``sample_rows``, the sampler
every decode step uses, one row per draw, seeded through torch's global generator) are
compared with a chi-square statistic over the most likely tokens plus one bucket for the rest;
each test also shows the statistic is far off under the wrong distribution (what a sampler
that ignored the setting would draw), so the test can fail. Through ``generate_from_batch``
and ``generate`` (each row prefilled alone, so fewer draws): the nucleus is respected, the
GenerationConfig path equals the keyword path, seeds repeat, and row b of a seeded batch
samples with seed + b.
"""

from __future__ import annotations

import pytest
import torch

from molmoe_lite.sampling import SamplingSettings, sample_rows

DRAWS = 3000
CHI2_LIMIT = 30.0  # chi-square with <= 6 degrees of freedom: p < 1e-4 beyond this
BUCKETS = 6
ROWS = 48  # draws through generate_from_batch (one prefill per row)


@pytest.fixture(scope="module")
def prompt(tiny_model):
    ids = tiny_model.processor.process(images=None, text="Hi")["input_ids"]
    with torch.no_grad():
        logits = tiny_model(ids)[0, -1].double()
    return ids, logits


def draws(logits: torch.Tensor, temperature: float, top_p: float = 1.0, seed: int = 0) -> torch.Tensor:
    """DRAWS independent tokens from the sampler, one row each."""
    settings = SamplingSettings(temperature=temperature, top_p=top_p)
    torch.manual_seed(seed)
    rows = logits.float().expand(DRAWS, -1).clone()
    return torch.tensor(sample_rows(rows, [settings] * DRAWS, [None] * DRAWS))


def model_draws(model, ids, rows=ROWS, seed=None, **kw) -> torch.Tensor:
    batch = {"input_ids": ids[None].repeat(rows, 1)}
    torch.manual_seed(0)
    out = model.generate_from_batch(batch, max_new_tokens=1, seed=seed, **kw)
    assert out.shape == (rows, ids.numel() + 1)
    return out[:, -1]


def expected(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    p = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        order = p.argsort(descending=True)
        mass, keep = 0.0, []
        for i in order.tolist():  # the smallest most-likely set whose mass reaches top_p
            keep.append(i)
            mass += float(p[i])
            if mass >= top_p:
                break
        cut = torch.zeros_like(p)
        cut[keep] = p[keep]
        p = cut / cut.sum()
    return p


def chi2(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """Chi-square of the counts of the BUCKETS most likely tokens and of all the others."""
    top = p.argsort(descending=True)[:BUCKETS]
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    obs = torch.cat([counts[top], (counts.sum() - counts[top].sum()).view(1)])
    exp = torch.cat([p[top], (1 - p[top].sum()).view(1)]) * tokens.numel()
    keep = exp > 0
    if bool((obs[~keep] > 0).any()):
        return float("inf")  # a token drawn that had probability 0
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())


@pytest.mark.parametrize("temperature", [0.3, 2.5], ids=["sharper", "flatter"])
def test_temperature_scales_the_logits(prompt, temperature):
    _, logits = prompt
    tokens = draws(logits, temperature)
    assert chi2(tokens, expected(logits, temperature)) < CHI2_LIMIT
    # the draws tell this temperature from T = 1 (a sampler that ignored it)
    assert chi2(tokens, expected(logits, 1.0)) > 4 * CHI2_LIMIT


def test_top_p_keeps_only_the_nucleus_renormalised(prompt):
    _, logits = prompt
    p = expected(logits, 1.0, 0.1)
    nucleus = set(torch.nonzero(p).flatten().tolist())
    assert 2 <= len(nucleus) <= BUCKETS, "the prompt should give a small nucleus at top_p=0.1"
    tokens = draws(logits, 1.0, 0.1)
    assert set(tokens.tolist()) == nucleus  # only the nucleus, and all of it at 3000 draws
    assert chi2(tokens, p) < CHI2_LIMIT


def test_top_p_and_temperature_together(prompt):
    _, logits = prompt
    p = expected(logits, 0.5, 0.5)
    tokens = draws(logits, 0.5, 0.5)
    assert set(tokens.tolist()) <= set(torch.nonzero(p).flatten().tolist())
    assert chi2(tokens, p) < CHI2_LIMIT


def test_generate_from_batch_samples_inside_the_nucleus(tiny_model, prompt):
    ids, logits = prompt
    nucleus = set(torch.nonzero(expected(logits, 1.0, 0.1)).flatten().tolist())
    tokens = set(model_draws(tiny_model, ids, temperature=1.0, top_p=0.1).tolist())
    # a sampler that ignored top_p would leave the 11%-mass nucleus at almost every draw
    assert tokens <= nucleus and len(tokens) > 1


def test_do_sample_maps_to_temperature(tiny_model, prompt):
    from transformers import GenerationConfig

    ids, logits = prompt
    sampled = model_draws(tiny_model, ids, 8, seed=4,
                          generation_config=GenerationConfig(do_sample=True, temperature=0.3, top_p=0.9))
    assert torch.equal(sampled, model_draws(tiny_model, ids, 8, seed=4, temperature=0.3, top_p=0.9))
    # do_sample=False is greedy whatever the temperature says
    greedy = model_draws(tiny_model, ids, 4, generation_config=GenerationConfig(do_sample=False, temperature=0.3))
    assert (greedy == logits.argmax()).all()
    settings = SamplingSettings.merge(GenerationConfig(do_sample=True, temperature=0.3, top_p=0.9))
    assert (settings.temperature, settings.top_p) == (0.3, 0.9)
    assert SamplingSettings.merge(GenerationConfig(do_sample=True)).temperature == 1.0
    assert SamplingSettings.merge(GenerationConfig(do_sample=False, temperature=0.3)).temperature == 0.0


def test_temperature_zero_is_greedy_and_seeds_repeat(tiny_model, prompt):
    ids, logits = prompt
    assert (model_draws(tiny_model, ids, 4, temperature=0.0) == logits.argmax()).all()
    kw = dict(max_new_tokens=6, temperature=1.0)
    batch = {"input_ids": ids[None]}
    a = tiny_model.generate_from_batch(batch, seed=5, **kw)
    assert torch.equal(a, tiny_model.generate_from_batch(batch, seed=5, **kw))
    assert any(not torch.equal(a, tiny_model.generate_from_batch(batch, seed=s, **kw)) for s in (6, 7, 8))


def test_generate_samples_with_its_keywords(tiny_model):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    first = tiny_model.generate(None, "Hi", seed=123, **kw)
    assert first == tiny_model.generate(None, "Hi", seed=123, **kw)
    others = {tiny_model.generate(None, "Hi", seed=s, **kw) for s in range(4)}
    greedy = tiny_model.generate(None, "Hi", max_new_tokens=8)
    assert len(others | {first}) > 1 and others != {greedy}


def test_batch_rows_sample_with_their_own_seeds(tiny_model, prompt):
    """Row b of a seeded batch samples with seed + b: identical prompts differ, row 0 is the seed's
    own sample, row 1 is seed + 1's."""
    ids, _ = prompt
    kw = dict(max_new_tokens=8, temperature=1.0)
    out = tiny_model.generate_from_batch({"input_ids": ids[None].repeat(2, 1)}, seed=11, **kw)
    assert not torch.equal(out[0], out[1]), "identical prompts with one seed should sample differently"
    for row, seed in [(0, 11), (1, 12)]:
        alone = tiny_model.generate_from_batch({"input_ids": ids[None]}, seed=seed, **kw)
        assert torch.equal(out[row, : alone.shape[1]], alone[0])
        assert (out[row, alone.shape[1] :] == tiny_model.processor.tokenizer.pad_token_id).all()
    tok = tiny_model.processor.tokenizer
    text = tok.decode(out[0, ids.numel() :], skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert tiny_model.generate(None, "Hi", seed=11, **kw) == text
