"""Cut streamed text at the first stop string, holding back what might be the start of one.

OpenAI's ``stop`` ends the answer *before* the stop string. While text arrives in pieces,
a piece may end with the first characters of a stop string whose rest comes later; those
characters are held back until it is clear whether they begin a stop string, so a client
never sees text that the final answer does not contain.
"""

from __future__ import annotations


class StopTrimmer:
    """Feed pieces in, get the text that is safe to send out; ``stopped`` once a stop matched."""

    def __init__(self, stops: tuple[str, ...] | list[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._held = ""

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self._held + piece
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            self.stopped, self._held = True, ""
            return text[: min(cuts)]
        hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - hold:] if hold else ""
        return text[: len(text) - hold]

    def finish(self) -> str:
        """What is still held when the text ends (it did not begin a stop string after all)."""
        rest, self._held = ("" if self.stopped else self._held), ""
        return rest
