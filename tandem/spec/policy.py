"""The draft-length policy, in one place: how many tokens a slot may draft this round, and how a draft is cut.

Drafters do not read these settings: they get `k_max` (a chain: `k_by_member`) and a confidence floor (`p_floor`,
to stop early) in their DraftContext; the rule itself is applied here, to every drafter's output alike:
    cap   = min(n_max, drafter.max_draft, room left in the context, token budget left)   (one token of each round
            is the target's own: the recovered or bonus token)
    k_max = cap (spec.adaptive False), else AdaptiveLength.choose(cap): the k in {0} u [n_min, cap] with the most
            expected tokens per unit of round time
    cut   = the draft up to (not including) its first token whose confidence is < p_min;
            a cut draft shorter than n_min is dropped (the round then verifies no draft: a plain decode step).
            A tree: every branch cut so; a tree shallower than n_min is dropped.
    tree  = tree_budget(): whether the request drafts trees (speculative.tree, deterministic drafts, a cache whose
            attention takes tree rows) and their largest node budget; TreeShape picks each round's budget (k =
            the depth from above: a tree of k nodes is the chain) from the request's measured tokens per ms.
Terms: a MEMBER is one drafter of a request's chain (tandem.spec.chain); a single drafter is a chain of one. Each
member has its own AdaptiveLength (acceptance counts of the rounds it WON, and a RoundCost keyed per engine, method
and member kind: ChainLengths); a member whose k is 0 this round is skipped, so the next member gets the round.
A round nobody drafted refreshes only the k = 0 (plain) cost of every member.
n_max / p_min unset in the request: the drafter's recommendation (Drafter.recommended), else SpecConfig's default.
A seeded sampled request (SamplingParams.seed, T > 0) learns no timing: its RoundCost is the fixed prior model,
and its drafters read only its own text (ngram: no suffix cache), so its lengths, hence its random stream, depend
only on the request and the same seed gives the same sample.
The adaptive choice never changes what is emitted at T = 0 (verification does), only how many rows are verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tandem.config import SpecConfig
from tandem.errors import ConfigError, ModelLoadError
from tandem.spec.drafter import Draft


def read_recommended(path: str) -> dict:
    """The `recommended` object ({"n_max": int, "p_min": number}, both optional) of a drafter directory's
    config.json; {} when there is none (a GGUF file, no such field). ModelLoadError naming file and field."""
    from tandem.loading.hf import read_json

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return {}
    rec = read_json(cfg).get("recommended", {})
    if not isinstance(rec, dict) or set(rec) - {"n_max", "p_min"}:
        raise ModelLoadError(f"{cfg}: field 'recommended' must be an object with keys n_max and/or p_min, "
                             f"got {rec!r}")
    try:
        SpecConfig(**rec)
    except ConfigError as e:
        raise ModelLoadError(f"{cfg}: field 'recommended': {e}") from None
    return rec


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
        if draft.is_tree:  # the same rule per branch: a node below p_min goes with its subtree
            keep, ok = [], {-1}
            for i, (p, c) in enumerate(zip(draft.parents, draft.confidence)):
                if p in ok and c >= self.spec.p_min:
                    ok.add(i)
                    keep.append(i)
            draft = draft.select(keep) if len(keep) < draft.k else draft
            return draft if draft.depth >= self.spec.n_min else Draft.empty(draft.tokens.device)
        n = draft.k
        for i, c in enumerate(draft.confidence[:n]):
            if c < self.spec.p_min:
                n = i
                break
        return draft.head(n) if n >= self.spec.n_min else draft.head(0)


class _Line:
    """ms = a + b * k from exponentially decayed least-squares sums over rounds (with a `ratio`, a verify line: a is
    kept >= half the mean, so noisy timings cannot make a plain round look free). While the rounds seen lack spread
    in k (a policy that settles on one length), the slope comes from `ratio`: b = ratio * a (ratio None: a = 0,
    the cost proportional to k)."""

    def __init__(self, ratio: float | None, decay: float):
        self.ratio, self.decay = ratio, decay
        self.w = self.k = self.kk = self.y = self.ky = 0.0

    def observe(self, k: int, ms: float) -> None:
        d = self.decay
        self.w, self.k, self.kk = d * self.w + 1, d * self.k + k, d * self.kk + k * k
        self.y, self.ky = d * self.y + ms, d * self.ky + k * ms

    def fit(self) -> tuple[float, float] | None:
        if self.w == 0:
            return None
        mk, my = self.k / self.w, self.y / self.w
        var = self.kk / self.w - mk * mk
        if var > 0.1:  # spread enough to measure the slope itself
            b = max(0.0, (self.ky / self.w - mk * my) / var)
            a = my - b * mk
            if self.ratio is not None and a < 0.5 * my:  # a verify costs a forward: noise must not zero it
                a = 0.5 * my
                b = (my - a) / mk
            return max(0.0, a), b
        if self.ratio is None:
            return (0.0, my / mk) if mk > 0 else (my, 0.0)
        a = my / (1 + self.ratio * mk)
        return a, self.ratio * a


class RoundCost:
    """Wall time of one speculative round by draft length k: verify(k) + draft(k), each a line in k learned from
    the rounds' own timings (draft_ms of propose, verify ms of the k + 1 row forward), so every round refreshes
    the estimate for every k, not only for the k it used. Shared by the requests of one engine, method and chain:
    the cost belongs to the machine, model and drafter, not to the text. Before the rounds show a spread of k, the
    extra verify cost per draft row is `verify_ratio` x the 1-row cost (a k-row forward costs about one row here:
    `tandem bench` k-cost table), and a draft costs in proportion to its length. It also keeps the drafter's
    first-position acceptance over the engine's rounds (`prior()`): a new request starts from it, not from 0.5, so
    a chain member that drafts only where the others found nothing (the hard positions) is not over-trusted anew
    by every request."""

    def __init__(self, verify_ratio: float = 0.05, draft_ratio: float = 0.1, decay: float = 0.95,
                 fixed: bool = False):
        self.verify, self.draft = _Line(verify_ratio, decay), _Line(None, decay)
        self.draft_ratio = draft_ratio  # draft ms per token / 1-row verify ms, before any draft was timed
        self.fixed = fixed  # the priors only, no timing learnt (a seeded request's reproducible lengths)
        self.seen: set[int] = set()
        self.first = AcceptanceEstimate(prior=0.5, decay=0.99)  # position 0 across requests

    def prior(self) -> float:
        """P(first draft token accepted) over the engine's recent rounds (0.5 before any, and when fixed)."""
        return self.first.prior if self.fixed else self.first.alphas(1)[0]

    def observe_acceptance(self, k: int, a: int) -> None:
        if not self.fixed and k > 0:
            self.first.observe(1, min(a, 1))

    def observe(self, k: int, draft_ms: float, verify_ms: float) -> None:
        if self.fixed:
            return
        if k not in self.seen:  # the first round of a length pays one-off costs (new shapes, allocations)
            self.seen.add(k)
            return
        self.verify.observe(k, verify_ms)
        if k > 0 or self.draft.w > 0:
            self.draft.observe(k, draft_ms)

    def curve(self, k_max: int) -> list[float]:
        """Estimated round time for k = 0..k_max (ms; relative units before any round was measured)."""
        va, vb = self.verify.fit() or (1.0, self.verify.ratio)
        da, db = self.draft.fit() or (0.0, self.draft_ratio * va)
        return [va + da + k * (vb + db) for k in range(k_max + 1)]


class AcceptanceEstimate:
    """alpha[i] = P(draft position i accepted | positions < i accepted), from exponentially decayed counts; a
    position with little evidence leans on the one before it (on `prior` for position 0), so a run of full
    acceptances lets the next, never-drafted position look as good as the last one."""

    def __init__(self, prior: float = 0.5, weight: float = 1.0, decay: float = 0.9):
        self.prior, self.weight, self.decay = prior, weight, decay
        self.hits: list[float] = []
        self.seen: list[float] = []

    def observe(self, k: int, a: int) -> None:
        """A round drafted k tokens and a were accepted: positions 0..a-1 hit, position a (if < k) missed."""
        while len(self.seen) < k:
            self.hits.append(0.0)
            self.seen.append(0.0)
        for i in range(min(a + 1, k)):
            self.seen[i] = self.decay * self.seen[i] + 1
            self.hits[i] = self.decay * self.hits[i] + (i < a)

    def alphas(self, k: int) -> list[float]:
        out, prev = [], self.prior
        for i in range(k):
            h, s = (self.hits[i], self.seen[i]) if i < len(self.seen) else (0.0, 0.0)
            prev = (h + self.weight * prev) / (s + self.weight)
            out.append(prev)
        return out


def expected_tokens(alphas: list[float]) -> list[float]:
    """E[tokens emitted by a round drafting k] for k = 0..len(alphas): 1 + sum_j prod_{i<j} alpha_i."""
    out, p = [1.0], 1.0
    for a in alphas:
        p *= a
        out.append(out[-1] + p)
    return out


class AdaptiveLength:
    """Per-request (per member) draft length: each round the k in {0} u [n_min, cap] maximising expected tokens per
    round time. At k = 0 nothing is learned about the drafts, so after `probe_every` rounds chosen 0, one draft of
    n_min tokens is asked for anyway (at once again after a probe that was accepted, or one that never ran because
    an earlier member of the chain won the round): a request whose text turns predictable gets drafting back."""

    def __init__(self, cost: RoundCost, n_min: int = 1, probe_every: int = 8, prior: float | None = None):
        self.cost, self.n_min, self.probe_every = cost, n_min, probe_every
        self.acceptance = AcceptanceEstimate(cost.prior() if prior is None else prior)
        self.idle = 0  # rounds chosen 0 since the last draft
        self.probing = False  # this round's k is a probe

    def choose(self, cap: int) -> int:
        self.probing = False
        if cap < self.n_min:
            return 0
        gain = expected_tokens(self.acceptance.alphas(cap))
        time = self.cost.curve(cap)
        k = max([0] + list(range(self.n_min, cap + 1)), key=lambda j: gain[j] / time[j])
        if k > 0:
            return k
        if self.idle >= self.probe_every:
            self.idle, self.probing = 0, True  # one probe, even when the drafter then finds nothing to propose
            return self.n_min
        self.idle += 1
        return 0

    def observe(self, k: int, a: int, draft_ms: float, verify_ms: float) -> None:
        """The round verified k draft tokens (after the cut) and accepted a; its propose and verify times."""
        self.acceptance.observe(k, a)
        self.cost.observe(k, draft_ms, verify_ms)
        self.cost.observe_acceptance(k, a)
        if k > 0:  # a fully accepted draft earns another probe right away: recovery takes rounds, not probes
            self.idle = self.probe_every if a == k else 0

    def skipped(self) -> None:
        """An earlier member of the chain won the round: a probe chosen for it did not run, so it runs next round."""
        if self.probing:
            self.idle = self.probe_every


class ChainLengths:
    """The adaptive lengths of one request: an AdaptiveLength per member of its chain, in chain order (a single
    drafter: one). choose() gives each member its k before propose; observe() credits the round to its winner."""

    def __init__(self, by_member: dict[str, AdaptiveLength]):
        self.by_member = by_member
        self.order = list(by_member)

    def choose(self, caps: dict[str, int]) -> dict[str, int]:
        return {m: ad.choose(caps[m]) for m, ad in self.by_member.items()}

    def observe(self, source: str, k: int, a: int, draft_ms: float, verify_ms: float) -> None:
        """source: the member that drafted the round's k tokens (Draft.source; ignored for a single drafter)."""
        winner = self.order[0] if len(self.order) == 1 else source
        if k == 0 or winner not in self.by_member:  # nobody drafted: a plain round, its cost for every member
            for ad in self.by_member.values():
                ad.cost.observe(0, draft_ms, verify_ms)
            return
        self.by_member[winner].observe(k, a, draft_ms, verify_ms)
        for m in self.order[self.order.index(winner) + 1:]:
            self.by_member[m].skipped()


def speculates(spec: SpecConfig | None, drafter) -> bool:
    """Whether a request speculates at all: its settings ask for it and the engine has a drafter."""
    return spec is not None and spec.enabled and drafter is not None


def tree_budget(spec: SpecConfig, sample_drafts: bool, cache) -> int:
    """The most nodes a request's draft trees may have; 0: chains only. speculative.tree: False/None off, True the
    default budget, an int the budget. Trees are deterministic drafts (sampled drafts stay chains: their p/q
    rejection is per chain) and need a cache whose attention takes tree rows (fp32/bf16 K/V, the C++ kernel)."""
    if not spec.tree or sample_drafts or not getattr(cache, "supports_tree", False):
        return 0
    return TREE_NODES if spec.tree is True else int(spec.tree)


TREE_NODES = 12  # default node budget: a verify of <= 13 rows costs about one row here (`tandem bench` k-cost)


class TreeShape:
    """Per request: each round's node budget for a tree of depth k, one of k (the chain), 2k, 4k, `budget`
    (capped by it): the option with the most emitted tokens per millisecond of round, both measured on this
    request's own rounds (decayed means: the per-depth acceptance of its trees and the cost of their n-row
    verify forward + drafting). Every option is tried twice first, and a non-best one again every `probe_every`
    rounds. fixed (a seeded sampled request): always `budget`, so its drafts depend only on its text."""

    def __init__(self, budget: int, fixed: bool = False, decay: float = 0.9, probe_every: int = 16):
        self.budget, self.fixed, self.decay, self.probe_every = budget, fixed, decay, probe_every
        self.tok: dict[int, float] = {}  # option (multiplier; 0 = the budget) -> decayed sum of emitted tokens
        self.ms: dict[int, float] = {}
        self.w: dict[int, float] = {}
        self.rounds = 0
        self.last = 0

    def options(self, k: int) -> dict[int, int]:
        out = {m: min(self.budget, m * k) for m in (1, 2, 4)}
        out[0] = self.budget
        return {m: n for m, n in out.items() if n >= k}

    def choose(self, k: int) -> int:
        """The node budget for this round (k: the depth chosen; k itself = a chain)."""
        if k <= 0:
            return 0
        opts = self.options(k)
        if self.fixed:
            self.last = 0
            return opts[0]
        self.rounds += 1
        untried = [m for m in opts if self.w.get(m, 0) < 1.5]
        if untried:
            self.last = untried[0]
        else:
            score = {m: self.tok[m] / max(self.ms[m], 1e-6) for m in opts}
            best = max(score, key=score.get)
            others = [m for m in opts if m != best]
            probe = others and self.rounds % self.probe_every == 0
            self.last = others[(self.rounds // self.probe_every) % len(others)] if probe else best
        return opts[self.last]

    def observe(self, emitted: int, ms: float) -> None:
        if self.fixed:
            return
        d, m = self.decay, self.last
        self.tok[m] = d * self.tok.get(m, 0.0) + emitted
        self.ms[m] = d * self.ms.get(m, 0.0) + ms
        self.w[m] = d * self.w.get(m, 0.0) + 1
