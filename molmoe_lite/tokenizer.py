"""The MolmoE tokenizer, built from ``tokenizer.json`` without remote code.

``AutoTokenizer`` on the release folder stops to ask whether to trust remote code, so
``load_tokenizer`` builds a ``PreTrainedTokenizerFast`` straight from
``tokenizer.json`` and sets BOS / EOS / PAD itself. The release's three small json
files disagree (``special_tokens_map.json`` names a ``<|pad|>`` that is not in the
vocabulary, ``tokenizer_config.json`` has no BOS), so every candidate string or id is
collected and the first one that exists in the vocabulary wins; BOS falls back to EOS,
as the release's processor does (``bos_token_id or eos_token_id``).

``TokenFloor`` bounds a text's token count from below without encoding it, so a text far
too long for the context can be refused before the tokenizer spends seconds on it.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from molmoe_lite.quantize.checkpoint import read_json_object
from molmoe_lite.errors import MolmoeLiteError

# The tokens the processor lays out around image features (strings, never ids: the
# release's added_tokens.json lists stale ids for them).
IM_START, IM_END, IM_PATCH, IM_COL, IMAGE_PROMPT = "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"
IMAGE_TOKENS = (IM_START, IM_END, IM_PATCH, IM_COL, IMAGE_PROMPT)
ENDOFTEXT, PADDING = "<|endoftext|>", "<|padding|>"


class TokenizerError(MolmoeLiteError, ValueError):
    """A tokenizer folder that is missing files or lacks a token the model needs."""


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Build the tokenizer of a MolmoE folder from its ``tokenizer.json`` (no remote code).

    BOS / EOS / PAD come from ``tokenizer_config.json``, ``special_tokens_map.json`` and
    ``generation_config.json`` (first candidate present in the vocabulary wins).
    """
    folder = Path(folder)
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise TokenizerError(f"{file}: no tokenizer.json here (needed to build the tokenizer)")
    tok_cfg = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    gen_cfg = _read_json(folder / "generation_config.json")
    try:
        # The release's config asks for clean_up_tokenization_spaces (old transformers then
        # turned " ." into "."); current transformers refuses it for BPE as destructive, and
        # so do we: decoded text keeps the spaces the model produced.
        tok = PreTrainedTokenizerFast(tokenizer_file=str(file), clean_up_tokenization_spaces=False)
    except Exception as exc:  # tokenizers raises its own exception types for bad json
        raise TokenizerError(f"{file}: cannot build a tokenizer from it: {exc}") from exc
    vocab = tok.get_vocab()
    id_to_token = {i: t for t, i in vocab.items()}

    def pick(name: str) -> str | None:
        gen_id = gen_cfg.get(f"{name}_token_id")
        candidates = [
            _token_str(tok_cfg.get(f"{name}_token")),
            _token_str(special_map.get(f"{name}_token")),
            id_to_token.get(gen_id) if isinstance(gen_id, int) else None,
        ]
        return next((c for c in candidates if c is not None and c in vocab), None)

    eos = pick("eos")
    if eos is None:
        raise TokenizerError(
            f"{folder}: no EOS token in the vocabulary named by tokenizer_config.json, "
            "special_tokens_map.json or generation_config.json"
        )
    bos = pick("bos") or eos
    pad = pick("pad")
    tok.eos_token, tok.bos_token = eos, bos
    if pad is not None:
        tok.pad_token = pad
    missing = [t for t in IMAGE_TOKENS if t not in vocab]
    if missing:
        raise TokenizerError(f"{file}: the image tokens {missing} are missing from the vocabulary")
    return tok


def _read_json(path: Path) -> dict[str, Any]:
    """The file's JSON object, or {} when the (optional) file is absent."""
    return read_json_object(path, TokenizerError) if path.is_file() else {}


def _token_str(value: Any) -> str | None:
    """Special-token entries are either a string or an AddedToken-style dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


# ---- a cheap lower bound on a text's token count -------------------------------------


class TokenFloor:
    """``floor(text)``: at least how many tokens ``text`` encodes to, without encoding it.

    Every token stands for at most ``longest`` bytes of the text the tokenizer's model sees
    (the text after its normalizer), so a text of B bytes takes at least ceil(B / longest)
    tokens. ``longest`` is measured once from the vocabulary: for a byte-level vocabulary a
    token's character count is its byte count; otherwise its UTF-8 length can only overstate
    what it stands for, which keeps the bound a true lower bound. The normalizer is applied
    only where it may change the text (NFC: Python's quick check first, so an already composed
    text, nearly every text, costs one pass).
    """

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import normalizers, pre_tokenizers

        backend = tokenizer.backend_tokenizer
        byte_level = isinstance(backend.pre_tokenizer, pre_tokenizers.ByteLevel)
        model_tokens = backend.get_vocab(with_added_tokens=False)
        added = [t.content for t in tokenizer.added_tokens_decoder.values()]
        self.longest = max(
            max((len(t) if byte_level else len(t.encode("utf-8")) for t in model_tokens), default=1),
            max((len(t.encode("utf-8")) for t in added), default=1),
            1,
        )
        self._normalizer = backend.normalizer
        self._nfc = isinstance(self._normalizer, normalizers.NFC)

    def __call__(self, text: str) -> int:
        if self._normalizer is not None and not (self._nfc and unicodedata.is_normalized("NFC", text)):
            text = self._normalizer.normalize_str(text)
        return -(-len(text.encode("utf-8", "surrogatepass")) // self.longest)


# ---- tiny tokenizer ------------------------------------------------------------------
