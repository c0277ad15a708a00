"""Token pieces -> text: incremental UTF-8 decoding and stop strings held back until decided.

A token can end in the middle of a UTF-8 character, and text that might be the start of a
stop string must not reach the client until the next tokens show whether it is one.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False  # True once a stop string was found; nothing more is accepted
        # Character counts over the whole generation, so that a token's text can be placed in it:
        self.decoded = 0  # decoded so far, sent or held
        self.released = 0  # returned by push/flush so far: the generated text's length once stopped

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to send."""
        if self.stopped:
            return ""
        return self._release(self._decoder.decode(piece))

    def flush(self) -> str:
        """End of generation: release everything held (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        text = self._release(self._decoder.decode(b"", final=True))
        text += self._held
        self.released += len(self._held)
        self._held = ""
        return text

    def _release(self, new: str) -> str:
        self.decoded += len(new)
        text = self._held + new
        cut = self._first_stop(text)
        if cut is not None:
            self.stopped = True
            self._held = ""
        else:
            keep = self._partial_stop_length(text)
            self._held = text[len(text) - keep :] if keep else ""
            cut = len(text) - keep
        self.released += cut
        return text[:cut]

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        return min(found) if found else None

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper beginning of a stop string."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
