"""The MolmoE tokenizer, built from ``tokenizer.json`` without remote code.

``AutoTokenizer`` on the release folder stops to ask whether to trust remote code, so
``load_tokenizer`` builds a ``PreTrainedTokenizerFast`` straight from
``tokenizer.json`` and sets BOS / EOS / PAD itself. The release's three small json
files disagree (``special_tokens_map.json`` names a ``<|pad|>`` that is not in the
vocabulary, ``tokenizer_config.json`` has no BOS), so every candidate string or id is
collected and the first one that exists in the vocabulary wins; BOS falls back to EOS,
as the release's processor does (``bos_token_id or eos_token_id``).

``write_tiny_tokenizer`` makes a small deterministic byte-level BPE tokenizer with the
release's pre-tokenizer, decoder, normaliser and special tokens, for tests and the
offline demo (real weights and tokenizer cannot be downloaded where this is built).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from molmoe_lite.quantize.checkpoint import read_json_object

# The tokens the processor lays out around image features (strings, never ids: the
# release's added_tokens.json lists stale ids for them).
IM_START, IM_END, IM_PATCH, IM_COL, IMAGE_PROMPT = "<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"
IMAGE_TOKENS = (IM_START, IM_END, IM_PATCH, IM_COL, IMAGE_PROMPT)
ENDOFTEXT, PADDING = "<|endoftext|>", "<|padding|>"


class TokenizerError(ValueError):
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


# ---- tiny tokenizer ------------------------------------------------------------------

# Training text for the tiny tokenizer: fixed, so the merges (and every id) are the same
# on every machine. Written for this project; the words of prompts and captions.
_TINY_TEXT = """\
User: Describe this image. Assistant: The image shows a small red boat on a calm lake.
User: What is in this picture? Assistant: There is a dog sitting on the grass next to a tree.
User: Point to the cat. Assistant: The cat is on the left side of the sofa, near the window.
User: How many people are there? Assistant: There are three people standing in the street.
A photo of a kitchen with a white table, two chairs and a bowl of green apples.
The sky is blue and the sun is shining over the mountains in the distance.
A close-up of a yellow flower with a bee collecting pollen from its centre.
The man in the picture is wearing a black jacket and holding an umbrella in the rain.
Children are playing football in a park while their parents watch from a bench.
This is a chart that shows the number of visitors for each month of the year.
The text on the sign says that the shop opens at nine in the morning.
A city street at night with cars, bright lights and tall buildings on both sides.
An old wooden house stands at the end of a long road between the fields.
The woman is reading a book at a desk beside a lamp and a cup of tea.
Describe the colours, the shapes and the objects that you can see in the image.
Where is the red ball? It is under the chair, close to the wall and the door.
"""


def write_tiny_tokenizer(folder: str | Path, vocab_size: int = 480) -> Path:
    """Write a small byte-level BPE tokenizer folder laid out like the release's.

    Ids: ``<|endoftext|>`` 0, ``<|padding|>`` 1, the 256 byte tokens and merges up to
    ``vocab_size`` (the tiny config's ``vocab_size``); the five image tokens follow at
    ``vocab_size .. vocab_size + 4``, beyond the text vocabulary but inside the
    embedding, as in the release (50280..50284 with vocab_size 50280). Files:
    tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    generation_config.json. Deterministic: the same bytes on every call.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 258 + 16:
        raise ValueError(f"vocab_size={vocab_size}: need room for 256 bytes, 2 specials and some merges")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[ENDOFTEXT, PADDING],  # ids 0 and 1 (the tiny config's pad_token_id is 1)
    )
    tok.train_from_iterator(_TINY_TEXT.splitlines(), trainer=trainer)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in IMAGE_TOKENS])
    tok.save(str(folder / "tokenizer.json"), pretty=True)

    eos_id = tok.token_to_id(ENDOFTEXT)
    pad_id = tok.token_to_id(PADDING)
    added = {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in (ENDOFTEXT, PADDING, *IMAGE_TOKENS)
    }

    def special(content: str) -> dict[str, Any]:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    files = {
        "tokenizer_config.json": {
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "added_tokens_decoder": added,
            "bos_token": None,
            "clean_up_tokenization_spaces": True,
            "eos_token": ENDOFTEXT,
            "model_max_length": 4096,
            "pad_token": PADDING,
            "tokenizer_class": "GPTNeoXTokenizer",
            "unk_token": None,
        },
        # The release names "<|pad|>" here, a string absent from its vocabulary; kept so
        # the tiny folder exercises the same fallback as the real one.
        "special_tokens_map.json": {
            "additional_special_tokens": list(IMAGE_TOKENS),
            "bos_token": special(ENDOFTEXT),
            "eos_token": special(ENDOFTEXT),
            "pad_token": special("<|pad|>"),
            "unk_token": special(ENDOFTEXT),
        },
        "generation_config.json": {"eos_token_id": eos_id, "pad_token_id": pad_id},
    }
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return folder
