"""Answer text as tokens arrive: pieces that are final, the whole answer at the end.

``TextStream(tokenizer, stop=())``: ``add(token)`` returns the text that became final with
that token ("" when nothing did), ``finish()`` the rest. The pieces concatenate to the
answer: ``decode(tokens)`` without special tokens, cut before the first stop string,
stripped of whitespace at both ends (as ``generate.answer`` and the reference strip
answers). Held back until it is final: whitespace at the end (it may be the answer's last),
an incomplete character (byte-fallback pieces decode to U+FFFD until the rest arrives), and
an end that could be the start of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

INCOMPLETE = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.emitted = ""
        self.stopped = False  # a stop string was reached: the answer ends before it

    def _visible(self) -> str:
        text = self.tokenizer.decode(self.tokens).lstrip()
        cuts = [text.find(s) for s in self.stop if s in text]
        if cuts:
            self.stopped = True
            text = text[:min(cuts)]
        return text

    def _take(self, text: str) -> str:
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted += piece
        return piece

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(int(token))
        text = self._visible()
        if self.stopped:
            return self._take(text.rstrip())
        known = text.rstrip(INCOMPLETE)  # (a half character may complete a stop string)
        final = len(known.rstrip())
        for stop in self.stop:  # an end that may grow into a stop string
            for k in range(min(len(stop) - 1, len(known)), 0, -1):
                if known.endswith(stop[:k]):
                    final = min(final, len(known) - k)
                    break
        return self._take(known[:final].rstrip())

    def finish(self) -> str:
        return self._take(self._visible().rstrip())

    @property
    def text(self) -> str:
        return self.emitted
