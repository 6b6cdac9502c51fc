"""Stop strings over a token stream: release text only once it cannot be the start of a stop string.

The EARLIEST match in the text wins whatever the order of the list: a complete match is final only once no stop
string that would start before it can still complete.
"""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.text = ""  # everything released so far
        self.hit = False  # a stop string ended the text (nothing after it is ever released)

    def _earliest(self) -> int:
        """Start of the earliest complete match in pending, or -1."""
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else -1

    def _open_before(self, end: int) -> int:
        """Earliest start < end where a stop string is still only partly seen (pending ends inside it), or -1."""
        p = self.pending
        for j in range(max(0, len(p) - max(map(len, self.stops)) + 1), min(end, len(p))):
            if any(len(p) - j < len(s) and s.startswith(p[j:]) for s in self.stops):
                return j
        return -1

    def push(self, piece: str) -> tuple[str, bool]:
        """Add decoded text; returns (text safe to release now, whether a stop string was hit)."""
        if self.hit:
            return "", True
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            self.text += out
            return out, False
        i = self._earliest()
        j = self._open_before(i if i >= 0 else len(self.pending))
        if i >= 0 and j < 0:
            return self._stop_at(i), True
        keep = j if j >= 0 else len(self.pending)  # release up to the first place a stop string may begin
        out, self.pending = self.pending[:keep], self.pending[keep:]
        self.text += out
        return out, False

    def _stop_at(self, i: int) -> str:
        out, self.pending, self.hit = self.pending[:i], "", True
        self.text += out
        return out

    def flush(self) -> tuple[str, bool]:
        """The request ended: release what was held back, cut at a complete match if one is in it."""
        if self.hit:
            return "", True
        i = self._earliest() if self.stops else -1
        if i >= 0:
            return self._stop_at(i), True
        out, self.pending = self.pending, ""
        self.text += out
        return out, False
