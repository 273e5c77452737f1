"""A conversation (OpenAI messages) -> the images and the text the processor turns into a prompt.

The processor lays out one prompt as ``[BOS] [image tokens...] " User: " + text + " Assistant:"``.
Molmo's multi-turn format continues that pattern, each earlier answer following its
``" Assistant:"`` after one space, so a conversation becomes::

    " User: q1 Assistant: a1 User: q2 Assistant: a2 User: q3 Assistant:"

``conversation_text`` returns the inner part (``"q1 Assistant: a1 User: q2 ... User: q3"``),
which ``processor.process`` wraps with the outer ``" User: "`` and ``" Assistant:"``: one
string, tokenized once, exactly as the processor tokenizes a single question. Molmo has no
system role: system (and developer) messages are put before the first user message's text,
separated by one space. Images go where the processor puts them, before all the text, in
the order they appear in the conversation (Molmo places images only at the start).
"""

from __future__ import annotations

from molmoe_lite.serve.schema import Turn


def conversation_text(turns: list[Turn]) -> str:
    """The text for ``processor.process(images, text)`` (see the module docstring)."""
    system = " ".join(t.text.strip() for t in turns if t.role == "system" and t.text.strip())
    full, previous = "", None
    for turn in (t for t in turns if t.role != "system"):
        text = turn.text.strip()
        if turn.role == "user" and previous is None and system:
            text = f"{system} {text}".strip()
        if turn.role == previous:  # consecutive messages of one role read as one
            full += f" {text}"
        else:
            full += f" {'User' if turn.role == 'user' else 'Assistant'}: {text}"
        previous = turn.role
    # the processor adds the first " User: " and the final " Assistant:" itself
    return full[len(" User: "):] if full.startswith(" User: ") else full.lstrip()


def conversation_images(turns: list[Turn]) -> list[tuple[str, str]]:
    """(url, param) of every image in the conversation, in order; param names it in errors."""
    return [(url, f"messages[{i}].image_url[{j}]") for i, t in enumerate(turns) for j, url in enumerate(t.image_urls)]
