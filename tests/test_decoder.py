"""The OLMoE decoder against transformers' OlmoeForCausalLM, and its KV cache, padding and dtypes.

Weights are the tiny random release-layout checkpoint (molmoe_lite.testing) loaded through the
meta device + assign path the runtime uses. transformers' model gets the same tensors mapped
to its names (q/k/v from att_proj rows; experts fused as gate_up_proj [E, 2I, d] =
cat(gate_proj, up_proj) and down_proj [E, d, I]; the two embedding tables concatenated).
Errors are relative L2 per position: ||ours_t - ref_t|| / ||ref_t||, worst position reported.
"""

from __future__ import annotations

import math

import pytest
import torch

from molmoe_lite.config import MolmoeConfig
from molmoe_lite.model.decoder import DecoderInputError, KVCache, MoEBlock, Transformer
from molmoe_lite.model.layers import RMSNorm, apply_rope, assign_state_dict, rope_cos_sin
from molmoe_lite.quantize.layout import LLM_PREFIX, expected_shapes
from molmoe_lite.testing import random_state_dict, tiny_config_dict

PREFIX = LLM_PREFIX + "."

# dtype -> max relative L2 error per position vs the fp32 model on the same weights
# (measured on this tiny model: fp16 ~1e-3, bf16 ~1e-2; bounds leave ~5-10x headroom)
LOW_PRECISION_TOL = {torch.float16: 1e-2, torch.bfloat16: 8e-2}
FP32_VS_HF_TOL = 1e-4  # the spec's bound for fp32 logits against transformers
FP32_SELF_TOL = 1e-5  # same code, different matmul shapes (cache vs full, padded vs single)


# ---------------------------------------------------------------------------------------
# helpers and fixtures
# ---------------------------------------------------------------------------------------
def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Worst per-position relative L2 error over [..., d] vectors."""
    ours, ref = ours.double(), ref.double()
    return ((ours - ref).norm(dim=-1) / ref.norm(dim=-1)).max().item()


def decoder_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}


def build(cfg: MolmoeConfig, state: dict[str, torch.Tensor], dtype=torch.float32) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg, dtype)
    assign_state_dict(model, decoder_state(state), device="cpu")
    return model.eval()


def positions(mask: torch.Tensor) -> torch.Tensor:
    """The release's positions: clamp(cumsum(mask) - 1, 0)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


@pytest.fixture(scope="module")
def tiny():
    cfg_dict = tiny_config_dict()
    cfg = MolmoeConfig.from_dict(cfg_dict)
    state = random_state_dict(cfg_dict, seed=0)
    model = build(cfg, state)
    lm_head = torch.nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)
    lm_head.weight.data = state["lm_head.weight"]
    return cfg, state, model, lm_head


def make_hf_model(cfg: MolmoeConfig, state: dict[str, torch.Tensor]):
    """transformers' OlmoeForCausalLM holding the same weights (fp32, eager attention/experts)."""
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.OlmoeConfig(
        vocab_size=cfg.total_vocab,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.expert_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        num_experts=cfg.moe_num_experts,
        num_experts_per_tok=cfg.moe_top_k,
        norm_topk_prob=False,
        rope_theta=cfg.rope_theta,  # transformers 5 turns this into rope_parameters
        rms_norm_eps=cfg.layer_norm_eps,
        max_position_embeddings=cfg.max_sequence_length,
        pad_token_id=cfg.pad_token_id,
        eos_token_id=None,
        attn_implementation="eager",
        experts_implementation="eager",
    )
    hf = transformers.OlmoeForCausalLM(hf_cfg).eval()
    fused = "model.layers.0.mlp.experts.gate_up_proj" in hf.state_dict()
    t = PREFIX
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    mapped = {
        "model.embed_tokens.weight": torch.cat(
            [state[t + "wte.embedding"], state[t + "wte.new_embedding"]]
        ),
        "model.norm.weight": state[t + "ln_f.weight"],
        # transformers' head covers all total_vocab rows; the release's has embedding_size rows.
        "lm_head.weight": torch.cat(
            [state["lm_head.weight"], torch.zeros(cfg.additional_vocab_size, cfg.d_model)]
        ),
    }
    for i in range(cfg.n_layers):
        b, h = f"{t}blocks.{i}.", f"model.layers.{i}."
        att = state[b + "attn.att_proj.weight"]
        mapped[h + "self_attn.q_proj.weight"] = att[:q]
        mapped[h + "self_attn.k_proj.weight"] = att[q : q + kv]
        mapped[h + "self_attn.v_proj.weight"] = att[q + kv :]
        mapped[h + "self_attn.o_proj.weight"] = state[b + "attn.attn_out.weight"]
        mapped[h + "self_attn.q_norm.weight"] = state[b + "attn.q_norm.weight"]
        mapped[h + "self_attn.k_norm.weight"] = state[b + "attn.k_norm.weight"]
        mapped[h + "input_layernorm.weight"] = state[b + "attn.attn_norm.weight"]
        mapped[h + "post_attention_layernorm.weight"] = state[b + "mlp.ff_norm.weight"]
        mapped[h + "mlp.gate.weight"] = state[b + "mlp.gate.weight"]
        experts = range(cfg.moe_num_experts)
        gate = [state[f"{b}mlp.experts.{e}.gate_proj.weight"] for e in experts]  # [I, d] each
        up = [state[f"{b}mlp.experts.{e}.up_proj.weight"] for e in experts]  # [I, d] each
        down = [state[f"{b}mlp.experts.{e}.down_proj.weight"] for e in experts]  # [d, I] each
        if fused:  # transformers >= 5: 3-D expert tensors
            mapped[h + "mlp.experts.gate_up_proj"] = torch.stack(
                [torch.cat([g, u]) for g, u in zip(gate, up)]
            )  # [E, 2I, d]
            mapped[h + "mlp.experts.down_proj"] = torch.stack(down)  # [E, d, I]
        else:  # transformers 4.x: one Linear per expert
            for e in experts:
                mapped[f"{h}mlp.experts.{e}.gate_proj.weight"] = gate[e]
                mapped[f"{h}mlp.experts.{e}.up_proj.weight"] = up[e]
                mapped[f"{h}mlp.experts.{e}.down_proj.weight"] = down[e]
    hf.load_state_dict(mapped, strict=True)
    return hf


@pytest.fixture(scope="module")
def hf_model(tiny):
    cfg, state, _, _ = tiny
    return make_hf_model(cfg, state)


def random_ids(cfg: MolmoeConfig, shape, seed: int) -> torch.Tensor:
    """Ids over the whole embedding, with the last few from new_embedding's rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.embedding_size, shape, generator=gen)
    ids[..., -2:] = torch.randint(cfg.embedding_size, cfg.total_vocab, ids[..., -2:].shape, generator=gen)
    return ids


def full_forward(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    """No padding, no cache: [B, L] ids -> hidden [B, L, d]."""
    mask = torch.ones(ids.shape, dtype=torch.bool)
    with torch.no_grad():
        return model(model.embed(ids), positions(mask), mask)


def cached_forward(model: Transformer, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed ids [B, L] through a KV cache in chunks of the given sizes; concat the outputs."""
    B, L = ids.shape
    assert sum(chunks) == L
    cache = model.new_cache(B, max_len=L)
    outs, start = [], 0
    with torch.no_grad():
        for n in chunks:
            piece = ids[:, start : start + n]
            pos = torch.arange(start, start + n).expand(B, n)
            outs.append(model(model.embed(piece), pos, torch.ones(B, start + n, dtype=torch.bool), cache))
            start += n
    assert cache.length == L
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------
# layout and loading
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [{}, {"additional_vocab_size": 0}, {"moe_top_k": 8, "n_layers": 3}],
    ids=["tiny", "no_new_embedding", "top_k_equals_experts"],
)
def test_keys_and_shapes_are_the_release_layout(overrides):
    cfg_dict = tiny_config_dict(**overrides)
    expected = {
        k[len(PREFIX):]: shape for k, shape in expected_shapes(cfg_dict).items() if k.startswith(PREFIX)
    }
    with torch.device("meta"):
        model = Transformer(MolmoeConfig.from_dict(cfg_dict))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"]
)
def test_meta_build_and_assign_load(tiny, dtype):
    cfg, state, _, _ = tiny
    model = build(cfg, state, dtype)
    assert not any(p.is_meta for p in model.parameters())
    norm_dtype = torch.float32  # norms (and the residual stream) stay fp32 in every compute dtype
    for name, p in model.named_parameters():
        want = norm_dtype if name.endswith(("norm.weight", "ln_f.weight")) else dtype
        assert p.dtype == want, name
    ref = decoder_state(state)["blocks.1.mlp.experts.3.up_proj.weight"]
    assert torch.equal(model.blocks[1].mlp.experts[3].up_proj.weight.float(), ref.to(dtype).float())


# ---------------------------------------------------------------------------------------
# against transformers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch,length", [(1, 1), (1, 13), (2, 9)], ids=["one_token", "seq13", "batch2"])
def test_prefill_matches_transformers(tiny, hf_model, batch, length):
    cfg, _, model, lm_head = tiny
    ids = random_ids(cfg, (batch, length), seed=length)
    with torch.no_grad():
        ours = lm_head(full_forward(model, ids))
        ref = hf_model(input_ids=ids).logits[..., : cfg.embedding_size]
    err = rel_err(ours, ref)
    assert err <= FP32_VS_HF_TOL, f"fp32 logits vs transformers: relative error {err:.2e}"


@pytest.mark.parametrize(
    "chunks", [[1] * 10, [6, 1, 1, 1, 1]], ids=["token_by_token", "prefill_then_decode"]
)
def test_cached_decode_matches_transformers(tiny, hf_model, chunks):
    cfg, _, model, lm_head = tiny
    ids = random_ids(cfg, (1, sum(chunks)), seed=7)
    with torch.no_grad():
        ours = lm_head(cached_forward(model, ids, chunks))
        ref = hf_model(input_ids=ids).logits[..., : cfg.embedding_size]
    err = rel_err(ours, ref)
    assert err <= FP32_VS_HF_TOL, f"cached decode vs transformers: relative error {err:.2e}"


def test_rope_theta_is_read_from_config(tiny):
    """A theta other than transformers' default 10000 must reach the rotary angles."""
    _, state, _, lm_head = tiny
    cfg = MolmoeConfig.from_dict(tiny_config_dict(rope_theta=500.0))
    model, hf = build(cfg, state), make_hf_model(cfg, state)
    ids = random_ids(cfg, (1, 12), seed=9)
    with torch.no_grad():
        ours = lm_head(full_forward(model, ids))
        ref = hf(input_ids=ids).logits[..., : cfg.embedding_size]
    err = rel_err(ours, ref)
    assert err <= FP32_VS_HF_TOL, f"rope_theta=500 vs transformers: relative error {err:.2e}"


# ---------------------------------------------------------------------------------------
# KV cache and padding, against our own full recomputation
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "chunks",
    [[1] * 8, [5, 1, 1, 1], [3, 4, 1]],
    ids=["token_by_token", "prefill_then_steps", "uneven_chunks"],
)
def test_cache_equals_full_recomputation(tiny, chunks):
    cfg, _, model, _ = tiny
    ids = random_ids(cfg, (2, sum(chunks)), seed=3)
    err = rel_err(cached_forward(model, ids, chunks), full_forward(model, ids))
    assert err <= FP32_SELF_TOL, f"cache vs full: relative error {err:.2e}"


@pytest.mark.parametrize("side", ["left", "right"], ids=["left_padded", "right_padded"])
def test_padded_batch_equals_single_runs(tiny, side):
    """Prefill a padded batch of 2 (pad id -1), then decode 3 tokens each through the cache."""
    cfg, _, model, _ = tiny
    lengths, steps = [9, 4], 3
    seqs = [random_ids(cfg, (1, n + steps), seed=20 + n)[0] for n in lengths]
    P = max(lengths)
    ids = torch.full((2, P), -1)
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        if side == "left":
            ids[b, P - n :] = seq[:n]
        else:
            ids[b, :n] = seq[:n]
    mask = ids != -1
    cache = model.new_cache(2, max_len=P + steps)
    with torch.no_grad():
        prefill = model(model.embed(ids), positions(mask), mask, cache)
        decoded = []
        for s in range(steps):
            step_ids = torch.stack([seq[n + s] for seq, n in zip(seqs, lengths)])[:, None]  # [2, 1]
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], dim=1)
            pos = mask.sum(-1, keepdim=True) - 1  # next position = real tokens so far
            decoded.append(model(model.embed(step_ids), pos, mask, cache))
    decoded = torch.cat(decoded, dim=1)  # [2, steps, d]

    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        single = full_forward(model, seq[None])[0]  # [n + steps, d]
        real = ids[b] != -1
        err_prefill = rel_err(prefill[b, real], single[:n])
        err_decode = rel_err(decoded[b], single[n:])
        assert err_prefill <= FP32_SELF_TOL, f"row {b} prefill vs single run: {err_prefill:.2e}"
        assert err_decode <= FP32_SELF_TOL, f"row {b} decode vs single run: {err_decode:.2e}"
    assert torch.isfinite(prefill).all(), "all-pad query rows must stay finite"


# ---------------------------------------------------------------------------------------
# low precision
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_finite_and_close(tiny, dtype):
    """Left-padded batch (so some query rows see only padding) in fp16/bf16 vs the fp32 model."""
    cfg, state, model32, _ = tiny
    model = build(cfg, state, dtype)
    ids = random_ids(cfg, (2, 10), seed=11)
    ids[1, :4] = -1
    mask = ids != -1
    with torch.no_grad():
        out = model(model.embed(ids), positions(mask), mask)
        ref = model32(model32.embed(ids), positions(mask), mask)
    assert out.dtype == dtype
    assert torch.isfinite(out).all(), f"{dtype}: non-finite outputs"
    err = rel_err(out[mask], ref[mask])
    print(f"{dtype}: relative error vs fp32 {err:.2e}")
    assert err <= LOW_PRECISION_TOL[dtype], f"{dtype} vs fp32: relative error {err:.2e}"


def test_fp16_residual_survives_values_beyond_fp16_range(tiny):
    """Embeddings scaled to 1e5 (> fp16 max 65504): a pure-fp16 residual would be inf."""
    cfg, state, model32, _ = tiny
    model16 = build(cfg, state, torch.float16)
    gen = torch.Generator().manual_seed(5)
    x = 1e5 * torch.randn(1, 6, cfg.d_model, generator=gen)  # fp32 input
    mask = torch.ones(1, 6, dtype=torch.bool)
    with torch.no_grad():
        out = model16(x, positions(mask), mask)
        ref = model32(x, positions(mask), mask)
    assert torch.isfinite(out).all()
    err = rel_err(out, ref)
    assert err <= LOW_PRECISION_TOL[torch.float16], f"fp16 with huge residual vs fp32: {err:.2e}"


# ---------------------------------------------------------------------------------------
# MoE routing and expert accumulation
# ---------------------------------------------------------------------------------------
def dense_moe_reference(moe: MoEBlock, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor):
    """One token and one slot at a time, in float64."""
    out = torch.zeros(h.shape, dtype=torch.float64)
    for t in range(h.shape[0]):
        for k in range(ids.shape[1]):
            ex = moe.experts[int(ids[t, k])]
            x = h[t].double()
            y = ex.down_proj.weight.double() @ (
                torch.nn.functional.silu(ex.gate_proj.weight.double() @ x) * (ex.up_proj.weight.double() @ x)
            )
            out[t] += weights[t, k].double() * y
    return out


@pytest.mark.parametrize(
    "case", ["T1", "natural", "all_tokens_to_two_experts", "k_equals_e"],
    ids=["T=1", "natural_routing_idle_experts", "all_tokens_one_pair", "K=E"],
)
def test_experts_forward_matches_dense_reference(tiny, case):
    cfg, _, model, _ = tiny
    moe = model.blocks[0].mlp
    E, K = cfg.moe_num_experts, cfg.moe_top_k
    gen = torch.Generator().manual_seed(13)
    T = 1 if case == "T1" else 12
    h = torch.randn(T, cfg.d_model, generator=gen)
    if case == "all_tokens_to_two_experts":
        ids = torch.tensor([[3, 5]] * T)[:, :K]
        weights = torch.rand(T, K, generator=gen)
    elif case == "k_equals_e":
        ids = torch.stack([torch.randperm(E, generator=gen) for _ in range(T)])
        weights = torch.rand(T, E, generator=gen)
    else:
        weights, ids = moe.route(h)
    got = moe.experts_forward(h, weights, ids)
    err = rel_err(got, dense_moe_reference(moe, h, weights, ids))
    assert err <= 1e-5, f"{case}: experts_forward vs dense reference {err:.2e}"


def test_route_is_softmax_topk_without_renormalisation(tiny):
    cfg, _, model, _ = tiny
    moe = model.blocks[1].mlp
    h = torch.randn(16, cfg.d_model, generator=torch.Generator().manual_seed(17))
    weights, ids = moe.route(h)
    probs = torch.softmax(h.double() @ moe.gate.weight.double().T, dim=-1)  # [T, E]
    assert ids.shape == weights.shape == (16, cfg.moe_top_k)
    # the chosen experts are the K most probable ones, with their (unrenormalised) probabilities
    torch.testing.assert_close(weights.double(), probs.gather(1, ids), rtol=1e-5, atol=1e-7)
    kth = probs.gather(1, ids).min(-1).values
    others = probs.scatter(1, ids, -1.0).max(-1).values
    assert (kth >= others).all()
    assert (weights.sum(-1) < 0.999).all(), "top-k weights must not be renormalised to sum 1"


# ---------------------------------------------------------------------------------------
# small pieces: embedding, RMSNorm, RoPE, input errors
# ---------------------------------------------------------------------------------------
def test_embedding_tables_and_padding_id(tiny):
    cfg, state, model, _ = tiny
    table = decoder_state(state)
    ids = torch.tensor([[-1, 0, 5, cfg.embedding_size - 1, cfg.embedding_size, cfg.total_vocab - 1]])
    emb = model.embed(ids)[0]
    want = torch.stack(
        [
            table["wte.embedding"][0],  # -1 embeds as 0
            table["wte.embedding"][0],
            table["wte.embedding"][5],
            table["wte.embedding"][-1],
            table["wte.new_embedding"][0],
            table["wte.new_embedding"][-1],
        ]
    )
    assert torch.equal(emb, want)


@pytest.mark.parametrize("bad", [-2, 10**6], ids=["below_pad_id", "beyond_vocab"])
def test_embedding_rejects_out_of_range_ids(tiny, bad):
    _, _, model, _ = tiny
    with pytest.raises(DecoderInputError, match=str(bad)):
        model.embed(torch.tensor([[3, bad]]))


def test_rmsnorm_formula():
    gen = torch.Generator().manual_seed(2)
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.rand(8, generator=gen) + 0.5
    x = 100 * torch.randn(3, 8, generator=gen)
    want = x.double() / torch.sqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(norm(x).double(), want, rtol=1e-6, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    """<rope(q, m), rope(k, n)> is a function of m - n; rotation keeps norms."""
    D, theta = 16, 10000.0
    gen = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, 1, 1, D, generator=gen), torch.randn(1, 1, 1, D, generator=gen)

    def rot(x, p):
        cos, sin = rope_cos_sin(torch.tensor([[p]]), D, theta)
        return apply_rope(x, cos, sin)

    s1 = (rot(q, 7) * rot(k, 3)).sum()
    s2 = (rot(q, 104) * rot(k, 100)).sum()
    s0 = (rot(q, 4) * rot(k, 4)).sum()
    torch.testing.assert_close(s1, s2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s0, (q * k).sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rot(q, 37).norm(), q.norm(), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(s1, (q * k).sum(), atol=1e-3), "rotation must change the score"


def test_bad_inputs_give_clear_errors(tiny):
    cfg, _, model, _ = tiny
    x = torch.zeros(1, 3, cfg.d_model)
    pos = torch.arange(3)[None]
    mask = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(DecoderInputError, match="key_mask"):
        model(x, pos, torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(DecoderInputError, match="key_mask"):
        model(x, pos, mask.long())
    with pytest.raises(DecoderInputError, match="position_ids"):
        model(x, pos[:, :2], mask)
    with pytest.raises(DecoderInputError, match="inputs_embeds"):
        model(x[..., :-1], pos, mask)
    cache = model.new_cache(1, max_len=4)
    model(x, pos, mask, cache)
    with pytest.raises(DecoderInputError, match="KV cache full"):
        model(x[:, :2], pos[:, :2], torch.ones(1, 5, dtype=torch.bool), cache)
    assert cache.length == 3, "a rejected call must not advance the cache"
    with pytest.raises(DecoderInputError, match="batch"):
        model(x.expand(2, -1, -1), pos.expand(2, -1), mask.expand(2, -1), model.new_cache(1, max_len=8))


# ---------------------------------------------------------------------------------------
# the one forward: per-row slots in a static cache (what the engine's running batch does)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "slots,L", [([3], 1), ([0, 5, 2], 1), ([1, 4], 3), ([6, 6], 2)],
    ids=["one_row", "rows_at_different_slots", "several_tokens_per_row", "shared_slot"],
)
def test_cache_write_stores_each_rows_slots_and_nothing_else(slots, L):
    B, H, S, D = len(slots), 2, 10, 4
    cache = KVCache(n_layers=2, batch=B, n_heads=H, max_len=S, head_dim=D, dtype=torch.float32)
    cache.k.fill_(float("nan"))
    cache.v.fill_(float("nan"))
    gen = torch.Generator().manual_seed(1)
    k, v = torch.randn(B, H, L, D, generator=gen), torch.randn(B, H, L, D, generator=gen)
    cache.write(1, k, v, torch.tensor(slots))
    for b, first in enumerate(slots):
        assert torch.equal(cache.k[1, b, :, first : first + L], k[b])
        assert torch.equal(cache.v[1, b, :, first : first + L], v[b])
    written = torch.zeros(B, S, dtype=torch.bool)
    for b, first in enumerate(slots):
        written[b, first : first + L] = True
    assert cache.k[1].isnan().permute(0, 2, 1, 3).all(-1).all(-1).eq(~written).all()
    assert cache.k[0].isnan().all() and cache.v[0].isnan().all(), "another layer was written"


@pytest.mark.parametrize(
    "lengths", [[7], [7, 3, 5], [4, 4]], ids=["one_row", "rows_at_different_lengths", "rows_at_one_length"]
)
def test_rows_at_different_lengths_decode_together_as_each_alone(tiny, lengths):
    """Each row prefilled alone into its cache row (over stale garbage from an earlier, longer
    occupant), then three decode steps of all rows together through ``run``, each row at its
    own slot and position: every row's outputs equal its own full recomputation."""
    cfg, _, model, _ = tiny
    B, steps, max_len = len(lengths), 3, 16
    seqs = [random_ids(cfg, (1, n + steps), seed=40 + n + b)[0] for b, n in enumerate(lengths)]
    cache = model.new_cache(B, max_len=max_len)
    gen = torch.Generator().manual_seed(3)
    cache.k.copy_(100 * torch.randn(cache.k.shape, generator=gen))  # stale keys must stay unseen
    cache.v.copy_(100 * torch.randn(cache.v.shape, generator=gen))
    with torch.no_grad():
        prefill = []
        for b, (seq, n) in enumerate(zip(seqs, lengths)):
            row = cache.rows(b, b + 1)
            ones = torch.ones(1, n, dtype=torch.bool)
            prefill.append(model(model.embed(seq[None, :n]), positions(ones), ones, row)[0])
        slots = torch.tensor(lengths)
        decoded = []
        for s in range(steps):
            kv_len = int(slots.max()) + 1
            tokens = torch.stack([seq[n + s] for seq, n in zip(seqs, lengths)])[:, None]  # [B, 1]
            key_mask = torch.ones(B, kv_len, dtype=torch.bool)
            decoded.append(model.run(model.embed(tokens), slots[:, None], key_mask, cache, slots))
            slots = slots + 1
    decoded = torch.cat(decoded, dim=1)  # [B, steps, d]
    for b, (seq, n) in enumerate(zip(seqs, lengths)):
        single = full_forward(model, seq[None])[0]
        assert rel_err(prefill[b], single[:n]) <= FP32_SELF_TOL, f"row {b} prefill"
        assert rel_err(decoded[b], single[n:]) <= FP32_SELF_TOL, f"row {b} decode"
