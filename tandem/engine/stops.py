"""Stop strings over a token stream: release text only once it cannot be the start of a stop string."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.text = ""  # everything released so far

    def push(self, piece: str) -> tuple[str, bool]:
        """Add decoded text; returns (text safe to release now, whether a stop string was hit)."""
        self.pending += piece
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0:
                out, self.pending = self.pending[:i], ""
                self.text += out
                return out, True
        hold = 0
        for s in self.stops:  # longest suffix of pending that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        self.text += out
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        self.text += out
        return out
