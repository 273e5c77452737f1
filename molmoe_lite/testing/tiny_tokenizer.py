"""A small deterministic tokenizer folder laid out like the release's.

``write_tiny_tokenizer`` trains a byte-level BPE tokenizer with the release's
pre-tokenizer, decoder, normaliser and special tokens on a fixed text, so every id is
the same on every machine; tests and the offline demo use it because the real
tokenizer cannot be downloaded where this project is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from molmoe_lite.tokenizer import ENDOFTEXT, IMAGE_TOKENS, PADDING

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
