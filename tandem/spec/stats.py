"""Speculation counters: acceptance rate, mean acceptance length, acceptance per draft position."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecStats:
    """drafts: rounds that verified a non-empty draft; drafted: draft tokens verified; accepted: draft tokens kept.
    rounds: all target forwards of the speculative loop (including those without a draft).
    drafted_at[i] / accepted_at[i]: drafts reaching position i (0-based) / accepted there.
    by_drafter: kind -> {"won": rounds its draft was verified, "proposed": its tokens verified, "accepted"}.
    A draft tree counts its nodes as drafted (nodes verified) and its accepted path as accepted; drafted_at counts
    the depths it reaches. trees: rounds that verified a tree (more than one branch)."""

    rounds: int = 0
    drafts: int = 0
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0  # tokens produced by the rounds (accepted + one recovered/bonus per round)
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)
    by_drafter: dict[str, dict[str, int]] = field(default_factory=dict)
    trees: int = 0

    def record(self, k: int, a: int, draft_ms: float = 0.0, verify_ms: float = 0.0, drafter: str = "",
               depth: int | None = None, tree: bool = False) -> None:
        """One round: k tokens (tree nodes) drafted (by `drafter`, a kind name) reaching `depth` (a chain: k), a of
        them accepted."""
        assert 0 <= a <= k
        self.trees += bool(tree)
        depth = k if depth is None else depth
        self.rounds += 1
        self.emitted += a + 1
        self.draft_ms += draft_ms
        self.verify_ms += verify_ms
        if k == 0:
            return
        self.drafts += 1
        self.drafted += k
        self.accepted += a
        if drafter:
            self._add_drafter(drafter, {"won": 1, "proposed": k, "accepted": a})
        for lst in (self.drafted_at, self.accepted_at):
            if len(lst) < depth:
                lst.extend([0] * (depth - len(lst)))
        for i in range(depth):
            self.drafted_at[i] += 1
        for i in range(a):
            self.accepted_at[i] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def mean_len(self) -> float:
        """Mean tokens per verified draft: 1 + accepted / drafts (the +1 is the recovered/bonus token)."""
        return 1.0 + self.accepted / self.drafts if self.drafts else 0.0

    @property
    def nodes_per_draft(self) -> float:
        """Mean draft tokens (tree nodes) verified per round that verified a draft."""
        return self.drafted / self.drafts if self.drafts else 0.0

    @property
    def acceptance_by_position(self) -> list[float]:
        """P(accepted at position i | drafted at position i)."""
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    def line(self) -> str:
        per = "; ".join(f"{k}: won {v['won']}, {v['accepted']}/{v['proposed']} accepted"
                        for k, v in self.by_drafter.items()) if len(self.by_drafter) > 1 else ""
        return (f"draft acceptance = {self.acceptance_rate:.2f} ({self.accepted} accepted / {self.drafted} generated)"
                f", mean len = {self.mean_len:.1f}" + (f", {self.nodes_per_draft:.1f} nodes per draft ({self.trees} "
                                                       f"trees)" if self.trees else "") + (f" ({per})" if per else ""))

    def _add_drafter(self, name: str, counts: dict[str, int]) -> None:
        mine = self.by_drafter.setdefault(name, {"won": 0, "proposed": 0, "accepted": 0})
        for key, v in counts.items():
            mine[key] += v

    def merge(self, other: "SpecStats") -> "SpecStats":
        """In place: add another's counters (e.g. over requests); returns self."""
        for name in ("rounds", "drafts", "drafted", "accepted", "emitted", "draft_ms", "verify_ms", "trees"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.drafted_at, other.drafted_at), (self.accepted_at, other.accepted_at)):
            if len(mine) < len(theirs):
                mine.extend([0] * (len(theirs) - len(mine)))
            for i, v in enumerate(theirs):
                mine[i] += v
        for name, counts in other.by_drafter.items():
            self._add_drafter(name, counts)
        return self

    def __add__(self, other: "SpecStats") -> "SpecStats":
        return SpecStats().merge(self).merge(other)

    def to_dict(self) -> dict:
        return {"rounds": self.rounds, "drafts": self.drafts, "drafted": self.drafted, "accepted": self.accepted,
                "emitted": self.emitted, "acceptance_rate": self.acceptance_rate, "mean_len": self.mean_len,
                "acceptance_by_position": self.acceptance_by_position, "draft_ms": self.draft_ms,
                "verify_ms": self.verify_ms, "trees": self.trees, "nodes_per_draft": self.nodes_per_draft,
                "by_drafter": {k: dict(v) for k, v in self.by_drafter.items()}}
