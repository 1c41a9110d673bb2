"""Stop sequences over text that arrives in pieces, in a window: the work per piece is bounded by the stop
sequences' lengths, never by how much text came before. The text ends where the stop sequence that
completes first begins, however the text is cut into pieces.

The matcher holds back the longest tail of the text so far that is a proper prefix of some stop sequence,
and releases the rest. Any stop sequence that completes later starts inside that held tail (every suffix
that is a prefix of a stop sequence lies within the longest one), so only the tail plus the new piece is
ever searched.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.held = ""         # released text's successor: what could still begin a stop sequence
        self.stopped = False

    def push(self, piece: str, match: bool = True) -> str:
        """The text `piece` makes final ('' if none). A stop sequence sets `stopped` and releases only the
        text before it. With match=False the piece is released as it is, and no stop sequence can begin in
        it (what was held is released too)."""
        if self.stopped:
            return ""
        if not match or not self.stops:
            out, self.held = self.held + piece, ""
            return out
        window = self.held + piece
        # the stop sequence that completes first (at the earliest end; of two ending together, the longer)
        hits = [(i + len(s), i) for s in self.stops if (i := window.find(s)) != -1]
        if hits:
            self.stopped, self.held = True, ""
            return window[: min(hits)[1]]
        hold = self._partial(window)
        self.held = window[len(window) - hold:] if hold else ""
        return window[: len(window) - hold]

    def flush(self) -> str:
        """At the end: what was held back (it never became a stop sequence)."""
        out, self.held = ("" if self.stopped else self.held), ""
        return out

    def _partial(self, text: str) -> int:
        """The length of the longest tail of `text` that is a proper prefix of a stop sequence."""
        best = 0
        for s in self.stops:
            # candidate starts: where s's first character occurs within the last len(s) - 1 characters
            i = text.find(s[0], max(len(text) - len(s) + 1, 0))
            while i != -1:
                if len(text) - i <= best:
                    break
                if s.startswith(text[i:]):
                    best = len(text) - i
                    break
                i = text.find(s[0], i + 1)
        return best
