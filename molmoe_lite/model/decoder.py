"""The OLMoE language model of MolmoE: embeddings, 16 pre-norm MoE blocks, final norm.

The module tree reproduces the release's state-dict keys under ``model.transformer.``
(``wte.embedding``, ``blocks.{i}.attn.att_proj``, ``blocks.{i}.mlp.experts.{e}.up_proj``,
``ln_f``...), so release checkpoints load with no renaming. Per block:

    x = x + attn_out(SDPA(rope(q_norm(q)), rope(k_norm(k)), v))   with q|k|v = att_proj(attn_norm(x))
    x = x + sum_{e in top-k} p_e * down_e(silu(gate_e(h)) * up_e(h)),  h = ff_norm(x), p = softmax(router(h))

Quirks kept from the release: q_norm/k_norm act on the whole projection before the
head split; router softmax in fp32 over all experts, top-k *without* renormalisation;
experts accumulate with ``index_add_`` in expert order; padded keys get the dtype's
finite minimum added to the attention bias (never -inf), so all-pad rows stay finite.

Dtypes: matmul weights live in the compute dtype; the residual stream and every RMSNorm
weight stay in fp32 and each matmul input is cast to the compute dtype. That is what the
authors' setup did (fp32 weights under bf16 autocast keep the residual stream fp32), it
keeps fp16 from overflowing (OLMoE's residual stream can exceed 65504), and its cost is a
few adds per token.

One forward (``Transformer.run``) serves the prefill, the eager decode step and the decode
step captured in a CUDA graph: each row writes its new keys and values into the static KV
cache at its own slots (``slots[b]`` onwards), and its queries see the keys at or before
their own slot that the key mask marks real. Rows may therefore sit at different lengths
(the engine's running batch); a row at slot p has position p unless padding says otherwise.

Shape legend: B batch, L new tokens, S keys read (a prefix of the cache's slots), H heads,
D head dim, d model width, T = B*L tokens, E experts, K top-k, I expert hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from molmoe_lite.config import MolmoeConfig
from molmoe_lite.model.layers import RMSNorm, rope_cos_sin, use_fused_kernels
from molmoe_lite.errors import MolmoeLiteError


class DecoderInputError(MolmoeLiteError, ValueError):
    """Inputs to the decoder with the wrong shape, dtype or range, or a full KV cache."""


def residual_dtype_for(compute_dtype: torch.dtype) -> torch.dtype:
    """The residual stream (and norm weights) stay fp32 whatever the matmul dtype."""
    return torch.float32


# ---------------------------------------------------------------------------------------
# KV cache
# ---------------------------------------------------------------------------------------
class KVCache:
    """Preallocated (static) keys and values of every layer: ``batch`` rows of ``max_len`` slots.

    Static buffers keep addresses fixed across decode steps (CUDA-graph friendly). A forward
    writes each row's new keys and values at that row's slots (``write``); ``length`` is
    the filled length when every row advances together (``Transformer.forward``), which
    advances it once after all layers ran. The engine tracks each row's length itself.
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [layers, B, H, max_len, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [layers, B, H, max_len, D]
        self.length = 0

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store k, v [B, H, L, D] of row b at slots ``slots[b] .. slots[b] + L - 1`` (slots: a device
        tensor [B]; no Python ints from the device, so graph-capturable)."""
        B, _, L, _ = k.shape
        index = slots[:, None] + torch.arange(L, device=slots.device)  # [B, L]
        rows = torch.arange(B, device=slots.device)[:, None].expand(B, L)  # [B, L]
        # advanced indices on dims 0 and 2 around a slice: the value is [B, L, H, D]
        self.k[layer][rows, :, index] = k.transpose(1, 2)
        self.v[layer][rows, :, index] = v.transpose(1, 2)

    def reset(self) -> None:
        self.length = 0

    def rows(self, start: int, stop: int) -> "KVCache":
        """A cache over rows [start, stop) of this one, sharing its memory (length 0)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, start:stop], self.v[:, start:stop]
        view.length = 0
        return view


# ---------------------------------------------------------------------------------------
# Embedding
# ---------------------------------------------------------------------------------------
class Embedding(nn.Module):
    """Token embedding split in two tables: ids < embedding_size read ``embedding``, the
    rest read ``new_embedding`` (Molmo's extra rows). Id -1 (batch padding) embeds as id 0."""

    def __init__(self, num_embeddings: int, num_new: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding = nn.Parameter(torch.zeros(num_embeddings, dim, dtype=dtype))  # [V, d]
        if num_new:
            self.new_embedding = nn.Parameter(torch.zeros(num_new, dim, dtype=dtype))  # [V_new, d]
        else:  # configs without additional_vocab_size have no such key in the checkpoint
            self.register_parameter("new_embedding", None)
        self.use_kernels: bool | None = None  # None: the one-launch Triton lookup on CUDA

    @property
    def total(self) -> int:
        extra = 0 if self.new_embedding is None else self.new_embedding.shape[0]
        return self.num_embeddings + extra

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] long -> [..., d]
        if use_fused_kernels(self.use_kernels, ids):
            from molmoe_lite.kernels.norms import embedding

            return embedding(ids, self.embedding, self.new_embedding)
        ids = ids.masked_fill(ids == -1, 0)
        if self.new_embedding is None:
            return F.embedding(ids, self.embedding)
        # Two lookups and a select instead of concatenating the tables (a 400 MB copy at fp32).
        is_new = ids >= self.num_embeddings
        base = F.embedding(ids.masked_fill(is_new, 0), self.embedding)
        new = F.embedding((ids - self.num_embeddings).clamp(min=0), self.new_embedding)
        return torch.where(is_new[..., None], new, base)


# ---------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------
def attention_bias(key_mask: torch.Tensor, slots: torch.Tensor | None, n_new: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """Additive bias [B, 1, L, S]: 0 where query i of row b (at slot slots[b] + i; slots None: 0 + i)
    may see key j (j at or before its slot, and key_mask[b, j]), the dtype's finite minimum elsewhere."""
    S = key_mask.shape[1]
    first = 0 if slots is None else slots[:, None]  # [B, 1]
    q_slot = first + torch.arange(n_new, device=key_mask.device)[None]  # [B or 1, L]
    k_slot = torch.arange(S, device=key_mask.device)  # [S]
    allowed = (k_slot[None, None, :] <= q_slot[:, :, None]) & key_mask[:, None, :]  # [B, L, S]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]  # [B, 1, L, S]


@dataclass
class StepInputs:
    """What every layer's attention needs besides its hidden states, made once per forward."""

    cos: torch.Tensor  # [B, L, D] fp32 rotary angles of the new tokens
    sin: torch.Tensor  # [B, L, D] fp32
    bias: torch.Tensor  # [B, 1, L, S] compute dtype
    cache: KVCache | None = None  # None: attend over the new tokens only, store nothing
    slots: torch.Tensor | None = None  # [B] long: the first slot each row writes

    @property
    def n_keys(self) -> int:
        return self.bias.shape[-1]


class Attention(nn.Module):
    """attn_norm -> att_proj (q|k|v) -> q_norm/k_norm on full projections -> RoPE -> SDPA -> attn_out."""

    def __init__(self, cfg: MolmoeConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        d, H, KV, D = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        norm_dtype = residual_dtype_for(dtype)
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = H, KV, D
        self.compute_dtype = dtype
        self.attn_norm = RMSNorm(d, cfg.layer_norm_eps, norm_dtype)
        self.att_proj = nn.Linear(d, (H + 2 * KV) * D, bias=False, dtype=dtype)  # rows: q, k, v
        self.q_norm = RMSNorm(H * D, cfg.layer_norm_eps, norm_dtype)
        self.k_norm = RMSNorm(KV * D, cfg.layer_norm_eps, norm_dtype)
        self.attn_out = nn.Linear(H * D, d, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """x [B, L, d] residual stream -> [B, L, d] compute dtype."""
        return self.attend(self.attn_norm(x, self.compute_dtype), inputs)

    def attend(self, h: torch.Tensor, inputs: StepInputs) -> torch.Tensor:
        """``forward`` from attn_norm's output h [B, L, d] (compute dtype) on."""
        B, L, _ = h.shape
        H, KV, D = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.att_proj(h).split([H * D, KV * D, KV * D], dim=-1)  # [B, L, H*D] each
        q = self.q_norm.rope(q, inputs.cos, inputs.sin, H, self.compute_dtype)  # [B, H, L, D]
        keys, values = self.keys_values(k, v, inputs)  # [B, KV, S, D]
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=inputs.bias, scale=1.0 / math.sqrt(D))
        return self.attn_out(o.transpose(1, 2).reshape(B, L, H * D))  # o: [B, H, L, D]

    def keys_values(self, k: torch.Tensor, v: torch.Tensor, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The new k (normed, rotated) and v [B, L, KV*D] stored at their slots; the keys and values
        the queries read, [B, KV, S, D]: the cache's first S slots, or the new ones without a cache."""
        B, L, _ = k.shape
        KV, D = self.n_kv_heads, self.head_dim
        cache, layer = inputs.cache, self.layer_idx
        if cache is not None and self.k_norm.rope_to_cache(
                k, v, inputs.cos, inputs.sin, cache.k[layer], cache.v[layer], inputs.slots):
            pass  # one token per row, fused: normed, rotated and stored at each row's slot in one launch
        else:
            k = self.k_norm.rope(k, inputs.cos, inputs.sin, KV, self.compute_dtype)  # [B, KV, L, D]
            v = v.view(B, L, KV, D).transpose(1, 2)  # [B, KV, L, D]
            if cache is None:
                return k, v
            cache.write(layer, k, v, inputs.slots)
        S = inputs.n_keys
        return cache.k[layer, :, :, :S], cache.v[layer, :, :, :S]


# ---------------------------------------------------------------------------------------
# Mixture of experts
# ---------------------------------------------------------------------------------------
class Expert(nn.Module):
    """SwiGLU MLP: down(silu(gate x) * up x), no biases."""

    def __init__(self, d: int, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d, hidden, bias=False, dtype=dtype)  # [I, d]
        self.up_proj = nn.Linear(d, hidden, bias=False, dtype=dtype)  # [I, d]
        self.down_proj = nn.Linear(hidden, d, bias=False, dtype=dtype)  # [d, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, d] -> [T, d]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DenseExperts(nn.ModuleList):
    """The experts of one layer as float ``Expert`` modules (keys ``experts.{e}.*``).

    Called as ``experts(h, weights, ids)``: the plain-torch reference that the quantised,
    kernel-backed experts (``molmoe_lite.quantized.QuantizedExperts``) replace.
    """

    def forward(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{ids[t, k]}(h[t]) -> [T, d], accumulated in h's dtype
        in expert order 0..E-1 (the order matters only below fp32), skipping idle experts."""
        out = torch.zeros_like(h)  # [T, d]
        hit = torch.bincount(ids.flatten(), minlength=len(self)).nonzero().flatten().tolist()
        for e in hit:
            tok, slot = torch.where(ids == e)  # tokens routed to e, and which of their K slots
            y = self[e](h[tok]) * weights[tok, slot, None]  # [T_e, d]
            out.index_add_(0, tok, y)
        return out


class MoEBlock(nn.Module):
    """ff_norm -> router softmax (fp32) over all experts -> top-k (no renorm) -> weighted experts."""

    def __init__(self, cfg: MolmoeConfig, dtype: torch.dtype) -> None:
        super().__init__()
        d, E = cfg.d_model, cfg.moe_num_experts
        self.top_k = cfg.moe_top_k
        self.compute_dtype = dtype
        self.ff_norm = RMSNorm(d, cfg.layer_norm_eps, residual_dtype_for(dtype))
        self.gate = nn.Linear(d, E, bias=False, dtype=dtype)  # router [E, d]
        self.experts = DenseExperts(Expert(d, cfg.expert_hidden, dtype) for _ in range(E))

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h [T, d] -> routing weights [T, K] and expert ids [T, K].

        Float experts: the release's way, weights in h's dtype, ids long. Experts modules that
        route themselves (the quantised ones: one fused kernel) get the logits instead and
        return fp32 weights.
        """
        logits = self.gate(h)  # [T, E]
        fused = getattr(self.experts, "route", None)
        if fused is not None:
            return fused(logits, self.top_k)
        probs = torch.softmax(logits.float(), dim=-1)  # [T, E] fp32, over all experts
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]; no renormalisation
        return weights.to(h.dtype), ids

    def experts_forward(self, h: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The weighted top-k sum of the experts, [T, d] (whichever experts module is installed)."""
        return self.experts(h, weights, ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, d] residual -> [B, L, d] compute dtype
        return self.mix(self.ff_norm(x, self.compute_dtype))

    def mix(self, h: torch.Tensor) -> torch.Tensor:
        """``forward`` from ff_norm's output h [B, L, d] (compute dtype) on."""
        B, L, d = h.shape
        h = h.reshape(B * L, d)  # [T, d]
        weights, ids = self.route(h)
        return self.experts_forward(h, weights, ids).view(B, L, d)


# ---------------------------------------------------------------------------------------
# Block and model
# ---------------------------------------------------------------------------------------
class Block(nn.Module):
    """Pre-norm residual block; the norms live inside attn and mlp (release key layout).

    The math is x += attn(attn_norm(x)); x += mlp(ff_norm(x)), as in the release. Each residual
    add is done by the norm that follows it (``RMSNorm.add_forward``: one kernel on a GPU for
    the add and the norm), so a block hands its MoE output on unadded: the next block's
    attn_norm adds it, and after the last block ln_f does. Adding a compute-dtype update to
    the fp32 residual promotes to fp32.
    """

    def __init__(self, cfg: MolmoeConfig, layer_idx: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.attn = Attention(cfg, layer_idx, dtype)
        self.mlp = MoEBlock(cfg, dtype)

    def forward(self, x: torch.Tensor, moe_in: torch.Tensor | None,
                inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream [B, L, d]; moe_in: the previous block's MoE output, not yet added
        (None for the first block). Returns (the residual stream, this block's MoE output)."""
        cd = self.attn.compute_dtype
        x, h = self.attn.attn_norm.add_forward(x, moe_in, cd)  # add the previous MoE output, norm
        attn_out = self.attn.attend(h, inputs)
        x, h = self.mlp.ff_norm.add_forward(x, attn_out, cd)  # add the attention output, norm
        moe_out = self.mlp.mix(h)
        return x, moe_out


class Transformer(nn.Module):
    """The decoder stack (``model.transformer`` in the release): wte, blocks, ln_f.

    Build it under ``torch.device("meta")`` and load with
    ``layers.assign_state_dict`` (or ``load_state_dict(..., assign=True)`` after casting each
    tensor to its parameter's dtype). ``compute_dtype`` is fixed at construction; do not
    ``.to(dtype)`` the module afterwards.
    """

    def __init__(self, cfg: MolmoeConfig, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise DecoderInputError(f"compute dtype {dtype} is not supported (float32, bfloat16, float16)")
        self.cfg = cfg
        self.compute_dtype = dtype
        self.residual_dtype = residual_dtype_for(dtype)
        self.wte = Embedding(cfg.embedding_size, cfg.additional_vocab_size, cfg.d_model, dtype)
        self.blocks = nn.ModuleList(Block(cfg, i, dtype) for i in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.layer_norm_eps, self.residual_dtype)
        self._rope_cache: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def embed(self, input_ids: torch.Tensor, check: bool = True) -> torch.Tensor:
        """input_ids [B, L] long (-1 = padding) -> embeddings [B, L, d] in the compute dtype.

        ``check=False`` skips the id range check (two host syncs), for ids our sampler made.
        """
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise DecoderInputError(f"input_ids must be integer token ids, got dtype {input_ids.dtype}")
        if check and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < -1 or hi >= self.wte.total:
                raise DecoderInputError(
                    f"input_ids contain {lo if lo < -1 else hi}, outside the embedding's ids "
                    f"-1..{self.wte.total - 1} (-1 is padding)"
                )
        table = self.wte.embedding.device
        out = self.wte(input_ids.long().to(table))
        # no-ops unless the table lives elsewhere or is stored narrower than the compute dtype
        return out.to(self.ln_f.weight.device, self.compute_dtype)

    def new_cache(self, batch: int, max_len: int | None = None, device=None) -> KVCache:
        """An empty KV cache sized for this model (max_len defaults to max_sequence_length)."""
        cfg = self.cfg
        if device is None:
            device = self.ln_f.weight.device
        return KVCache(
            cfg.n_layers, batch, cfg.n_kv_heads, max_len or cfg.max_sequence_length,
            cfg.head_dim, self.compute_dtype, device,
        )

    def _check(self, inputs_embeds, position_ids, key_mask, cache) -> None:
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.cfg.d_model:
            raise DecoderInputError(
                f"inputs_embeds must be [B, L, {self.cfg.d_model}], got {tuple(inputs_embeds.shape)}"
            )
        B, L, _ = inputs_embeds.shape
        past = cache.length if cache is not None else 0
        if tuple(position_ids.shape) != (B, L):
            raise DecoderInputError(
                f"position_ids must be [B, L] = {(B, L)}, got {tuple(position_ids.shape)}"
            )
        if key_mask.dtype != torch.bool or tuple(key_mask.shape) != (B, past + L):
            raise DecoderInputError(
                f"key_mask must be bool [B, cache length + L] = {(B, past + L)}, "
                f"got {key_mask.dtype} {tuple(key_mask.shape)}"
            )
        if cache is not None:
            if cache.batch != B:
                raise DecoderInputError(f"KV cache holds batch {cache.batch}, inputs have batch {B}")
            if past + L > cache.max_len:
                raise DecoderInputError(
                    f"KV cache full: {past} cached + {L} new tokens > max_len {cache.max_len}"
                )

    def forward(
        self,
        inputs_embeds: torch.Tensor,  # [B, L, d]
        position_ids: torch.Tensor,  # [B, L] long
        key_mask: torch.Tensor,  # [B, S] bool, True = real key, S = cache.length + L
        cache: KVCache | None = None,
    ) -> torch.Tensor:  # [B, L, d] after ln_f, compute dtype
        """Every row continues the cache at slot ``cache.length`` (then advanced by L)."""
        self._check(inputs_embeds, position_ids, key_mask, cache)
        B, L, _ = inputs_embeds.shape
        slots = None
        if cache is not None:
            slots = torch.full((B,), cache.length, dtype=torch.long, device=inputs_embeds.device)
        hidden = self.run(inputs_embeds, position_ids, key_mask, cache, slots)
        if cache is not None:
            cache.length += L
        return hidden

    def run(
        self,
        inputs_embeds: torch.Tensor,  # [B, L, d]
        position_ids: torch.Tensor,  # [B, L] long, the rotary positions
        key_mask: torch.Tensor,  # [B, S] bool: True = a real key; S keys are read
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,  # [B] long: row b writes slots[b] .. slots[b] + L - 1
    ) -> torch.Tensor:  # [B, L, d] after ln_f, compute dtype
        """The one forward: prefill, eager decode step and the captured decode step. No host sync
        (what a CUDA graph captures); no checks (``forward`` checks its callers' inputs). With the
        fused kernels, a step of one token per row writes each layer's keys and values in one
        launch (the k-norm's), each row at its own slot."""
        inputs = self.step_inputs(position_ids, key_mask, cache, slots)
        x, moe_out = inputs_embeds.to(self.residual_dtype), None
        for block in self.blocks:
            x, moe_out = block(x, moe_out, inputs)
        return self.ln_f.add_forward(x, moe_out, self.compute_dtype)[1]

    def step_inputs(self, position_ids: torch.Tensor, key_mask: torch.Tensor, cache: KVCache | None,
                    slots: torch.Tensor | None) -> StepInputs:
        """Rotary angles (looked up in a per-cache table when there is a cache), the attention
        bias, and where the keys go."""
        if cache is None:
            cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta)  # [B, L, D]
        else:
            cos_table, sin_table = self._rope_tables(cache.max_len, position_ids.device)
            cos, sin = cos_table[position_ids], sin_table[position_ids]  # [B, L, D]
        bias = attention_bias(key_mask, slots, position_ids.shape[1], self.compute_dtype)
        return StepInputs(cos, sin, bias, cache, slots)

    def _rope_tables(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, D] for positions 0..n-1, made once per (n, device): a step then looks its
        angles up (one gather each) instead of computing them (eight small kernels). The same
        formula on the same integers, so the same values as ``rope_cos_sin``."""
        key = (n, device)
        if key not in self._rope_cache:
            positions = torch.arange(n, device=device)[None]
            cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
            self._rope_cache[key] = (cos[0], sin[0])
        return self._rope_cache[key]


def real_positions(key_mask: torch.Tensor, slots: torch.Tensor, kv_len: int | None) -> torch.Tensor:
    """[B, 1] rotary position of the token at slot slots[b]: its row's real keys at or before that
    slot, less one (key_mask [B, >= kv_len] bool). No host sync."""
    seen = key_mask[:, :kv_len]
    before = torch.arange(seen.shape[1], device=seen.device)[None] <= slots[:, None]  # [B, S]
    return ((seen & before).sum(-1, keepdim=True) - 1).clamp(min=0)
