"""Sampling draws from the distribution temperature and top_p describe (public API only).

One prompt repeated over many batch rows gives many independent draws of the first new token
in a single call (``generate_from_batch`` with ``max_new_tokens=1``). The expected
distribution is written out here from the model's own logits for that prompt (its plain
forward pass): ``softmax(logits / T)``, cut to the smallest top set whose mass reaches top_p
and renormalised. Counts are compared with a chi-square statistic over the most likely tokens
plus one bucket for the rest; a fixed seed makes each run the same. Each test also shows the
statistic is far off under the wrong distribution (what a sampler that ignored the setting
would draw), so the test can fail.
"""

from __future__ import annotations

import pytest
import torch

DRAWS = 3000
CHI2_LIMIT = 30.0  # chi-square with <= 6 degrees of freedom: p < 1e-4 beyond this
BUCKETS = 6


@pytest.fixture(scope="module")
def prompt(tiny_model):
    ids = tiny_model.processor.process(images=None, text="Hi")["input_ids"]
    with torch.no_grad():
        logits = tiny_model(ids)[0, -1].double()
    return ids, logits


def draws(model, ids, seed=0, **kw) -> torch.Tensor:
    batch = {"input_ids": ids[None].repeat(DRAWS, 1)}
    out = model.generate_from_batch(batch, max_new_tokens=1, seed=seed, **kw)
    assert out.shape == (DRAWS, ids.numel() + 1)
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
def test_temperature_scales_the_logits(tiny_model, prompt, temperature):
    ids, logits = prompt
    tokens = draws(tiny_model, ids, temperature=temperature)
    assert chi2(tokens, expected(logits, temperature)) < CHI2_LIMIT
    # the draws tell this temperature from T = 1 (a sampler that ignored it)
    assert chi2(tokens, expected(logits, 1.0)) > 4 * CHI2_LIMIT


def test_top_p_keeps_only_the_nucleus_renormalised(tiny_model, prompt):
    ids, logits = prompt
    top_p = 0.1
    p = expected(logits, 1.0, top_p)
    nucleus = set(torch.nonzero(p).flatten().tolist())
    assert 2 <= len(nucleus) <= BUCKETS, "the prompt should give a small nucleus at top_p=0.1"
    tokens = draws(tiny_model, ids, temperature=1.0, top_p=top_p)
    assert set(tokens.tolist()) <= nucleus
    assert set(tokens.tolist()) == nucleus  # every member drawn at 3000 draws
    assert chi2(tokens, p) < CHI2_LIMIT


def test_top_p_and_temperature_together(tiny_model, prompt):
    ids, logits = prompt
    p = expected(logits, 0.5, 0.5)
    tokens = draws(tiny_model, ids, temperature=0.5, top_p=0.5)
    assert set(tokens.tolist()) <= set(torch.nonzero(p).flatten().tolist())
    assert chi2(tokens, p) < CHI2_LIMIT


def test_do_sample_maps_to_temperature(tiny_model, prompt):
    from transformers import GenerationConfig

    ids, logits = prompt
    sampled = draws(tiny_model, ids, generation_config=GenerationConfig(do_sample=True, temperature=0.3, top_p=0.9))
    by_keywords = draws(tiny_model, ids, temperature=0.3, top_p=0.9)
    assert torch.equal(sampled, by_keywords)
    # do_sample=False is greedy whatever the temperature says
    greedy = draws(tiny_model, ids, generation_config=GenerationConfig(do_sample=False, temperature=0.3))
    assert (greedy == logits.argmax()).all()
    # do_sample with no temperature samples at T = 1
    plain = draws(tiny_model, ids, generation_config=GenerationConfig(do_sample=True))
    assert chi2(plain, expected(logits, 1.0)) < CHI2_LIMIT


def test_temperature_zero_is_greedy_and_seeds_repeat(tiny_model, prompt):
    ids, logits = prompt
    assert (draws(tiny_model, ids, temperature=0.0) == logits.argmax()).all()
    a = draws(tiny_model, ids, seed=5, temperature=1.0)
    assert torch.equal(a, draws(tiny_model, ids, seed=5, temperature=1.0))
    assert not torch.equal(a, draws(tiny_model, ids, seed=6, temperature=1.0))


def test_generate_samples_with_its_keywords(tiny_model):
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.9)
    first = tiny_model.generate(None, "Hi", seed=123, **kw)
    assert first == tiny_model.generate(None, "Hi", seed=123, **kw)
    others = {tiny_model.generate(None, "Hi", seed=s, **kw) for s in range(4)}
    greedy = tiny_model.generate(None, "Hi", max_new_tokens=8)
    assert len(others | {first}) > 1 and others != {greedy}
