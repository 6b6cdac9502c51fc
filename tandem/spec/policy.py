"""The draft-length policy, in one place: how many tokens a slot may draft this round, and how a draft is cut.

Drafters do not read these settings: they get `k_max` and a confidence floor (`p_floor`, to stop early) in their
DraftContext; the rule itself is applied here, to every drafter's output alike:
    k_max = min(n_max, drafter.max_draft, room left in the context, token budget left)   (one token of each round
            is the target's own: the recovered or bonus token)
    cut   = the draft up to (not including) its first token whose confidence is < p_min;
            a cut draft shorter than n_min is dropped (the round then verifies no draft: a plain decode step).
"""

from __future__ import annotations

from dataclasses import dataclass

from tandem.config import SpecConfig
from tandem.spec.drafter import Draft


@dataclass(frozen=True)
class DraftPolicy:
    spec: SpecConfig
    max_draft: int = 16  # the drafter's own limit

    @property
    def p_floor(self) -> float:
        return self.spec.p_min

    def k_max(self, position: int, max_len: int, tokens_left: int) -> int:
        """Most draft tokens for a slot whose last emitted token sits at `position`, with `tokens_left` of its
        budget unspent (the round's own target token included)."""
        return max(0, min(self.spec.n_max, self.max_draft, max_len - position - 1, tokens_left - 1))

    def cut(self, draft: Draft) -> Draft:
        n = draft.k
        for i, c in enumerate(draft.confidence[:n]):
            if c < self.spec.p_min:
                n = i
                break
        return draft.head(n) if n >= self.spec.n_min else draft.head(0)
