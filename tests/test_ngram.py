"""Kind `ngram` (tandem.spec.ngram): prompt lookup (longest n-gram first, most recent occurrence, periodic copy past
the end), a history of accepted tokens only, the suffix cache shared across requests (learns, stays bounded);
lossless at T = 0 through Engine.generate and the batch scheduler on many prompts (repetitive ones included, so it
really drafts); at T > 0 the output has the target's distribution (one-hot drafts, chi-square at alpha = 1e-3)."""

import random

import pytest
import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine, Finished, Token
from tandem.engine.batch import BatchScheduler
from tandem.errors import ConfigError
from tandem.spec import DraftContext, NgramDrafter, PromptState, SpecStats, get_method
from tandem.spec.ngram import SuffixCache
from tests.test_spec_lossless import V, assert_matches_marginal, second_token_marginal, tiny_target

GREEDY = SamplingParams()


def ctx(slot, last, position, k=4, p_floor=0.0):
    return DraftContext(slot=slot, last_token=last, position=position, cache=None, sampling=GREEDY, k_max=k,
                        p_floor=p_floor)


def started(ids, slot=0, **kw):
    d = NgramDrafter(**kw)
    d.begin(slot, PromptState(ids=list(ids), hidden=torch.zeros(1, 4), cache=None))
    return d


def test_prompt_lookup_longest_then_most_recent_then_periodic():
    # history 1 2 3 9 | 7 2 3 5 | 2 3 + x=... : the suffix "2 3" occurs twice; the latest (followed by 5) wins
    d = started([1, 2, 3, 9, 7, 2, 3, 5, 8, 2], n_min=1, n_max=3, cache_size=0)
    assert d.propose([ctx(0, 3, 10, k=3)])[0].tokens.tolist() == [5, 8, 2]
    # a longer match beats a more recent shorter one: "7 2 3" was followed by 5, the latest "3" by 6
    d = started([7, 2, 3, 5, 3, 6, 7, 2], n_min=1, n_max=3, cache_size=0)
    draft = d.propose([ctx(0, 3, 8, k=2)])[0]
    assert draft.tokens.tolist() == [5, 3] and draft.confidence == [1.0, 1.0] and draft.probs is None
    # periodic text: the copy runs on past the end of the history
    d = started([4, 5, 6, 4, 5], n_min=2, n_max=2, cache_size=0)
    assert d.propose([ctx(0, 6, 5, k=7)])[0].tokens.tolist() == [4, 5, 6, 4, 5, 6, 4]
    # no n-gram of n_min tokens seen before: no draft; k_max 0: no draft
    d = started([1, 2, 3], n_min=2, n_max=3, cache_size=0)
    assert d.propose([ctx(0, 4, 3)])[0].k == 0
    d = started([1, 2, 1], n_min=1, n_max=3, cache_size=0)
    assert d.propose([ctx(0, 1, 3, k=0)])[0].k == 0


def test_history_holds_accepted_tokens_only():
    d = started([1, 2, 3, 4, 1, 2], n_min=2, n_max=2, cache_size=0)
    assert d.propose([ctx(0, 3, 6, k=3)])[0].tokens.tolist() == [4, 1, 2]
    d.accept(0, [4, 9], torch.zeros(2, 4))  # d_1 = 4 accepted, 1 rejected, the target emitted 9
    assert d._hist[0] == [1, 2, 3, 4, 1, 2, 3, 4, 9]
    with pytest.raises(RuntimeError, match="history"):  # a position that disagrees with the accepted history
        d.propose([ctx(0, 9, 5)])
    assert d.propose([ctx(0, 9, 8)])[0].k == 0  # "4 9" was never followed by anything


def test_bad_settings_are_config_errors():
    for kw in (dict(n_min=0), dict(n_min=3, n_max=2), dict(n_max=17), dict(cache_size=-1)):
        with pytest.raises(ConfigError, match="ngram"):
            NgramDrafter(**kw)
    assert get_method("ngram").fits(NgramDrafter()) and not get_method("mtp").fits(NgramDrafter())


def test_suffix_cache_stays_bounded():
    cache = SuffixCache(1, 3, size=50, width=3)
    rng = random.Random(0)
    for _ in range(300):
        cache.learn([rng.randrange(20) for _ in range(rng.randint(1, 40))], start=rng.randint(0, 5))
        assert len(cache) <= 50
        assert all(len(c) <= 3 for c in cache.table.values())
    # the most frequent follower wins; confidence = its share; recently used n-grams survive eviction
    cache = SuffixCache(1, 2, size=4)
    cache.learn([1, 2, 1, 2, 1, 3], 0)
    assert cache.next([5, 1]) == (2, 2 / 3)
    assert cache.draft([7, 1], 3, p_floor=0.0)[0] == [2, 1, 2]
    assert cache.draft([7, 1], 3, p_floor=0.9)[0] == []


def test_suffix_cache_learns_mid_request_and_stays_bounded():
    """What slot 0 has accepted so far drafts for slot 1 (a concurrent request) before slot 0 ends; a seeded sampled
    request does not read the shared cache (reproducible); the cache stays within its size as tokens stream in."""
    d = started([50, 51], slot=0, n_min=1, n_max=2, cache_size=64)
    d.propose([ctx(0, 7, 2)])  # x of the first round enters slot 0's history
    d.accept(0, [8, 9, 10], torch.zeros(3, 4))
    d.begin(1, PromptState(ids=[60, 61, 7], hidden=torch.zeros(1, 4), cache=None))
    assert d.propose([ctx(1, 8, 3)])[0].tokens.tolist() == [9, 10]  # 7 8 -> 9 10, learnt from slot 0's output
    seeded = SamplingParams(temperature=1.0, seed=3)
    private = DraftContext(slot=1, last_token=8, position=3, cache=None, sampling=seeded, k_max=4)
    assert d.propose([private])[0].k == 0
    rng = random.Random(1)
    for _ in range(200):
        d.accept(0, [rng.randrange(V) for _ in range(rng.randint(1, 5))], torch.zeros(5, 4))
        assert len(d.suffix) <= 64
    d.end(0)
    assert len(d.suffix) <= 64


@pytest.fixture(scope="module")
def target():
    return tiny_target()


def prompts(n=40, seed=7):
    """Random prompts, half of them repetitive (a random phrase repeated) so that lookups find matches."""
    g = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            phrase = [g.randrange(V) for _ in range(g.randint(2, 5))]
            out.append((phrase * 4)[: g.randint(len(phrase) + 2, 4 * len(phrase))])
        else:
            out.append([g.randrange(V) for _ in range(g.randint(1, 12))])
    return out


GREEDY_RUN = SamplingParams(max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def plain_runs(target):
    plain = Engine(target, max_len=64)
    return [(p, plain.complete(p, GREEDY_RUN)[0]) for p in prompts(32)]


@pytest.mark.parametrize("n_max", [1, 4])
def test_greedy_equals_plain(target, plain_runs, n_max):
    eng = Engine(target, max_len=64, drafter=NgramDrafter(n_min=1, n_max=3),
                 spec=SpecConfig(method="ngram", n_max=n_max))
    total = SpecStats()
    for p, want in plain_runs:
        got, fin = eng.complete(p, GREEDY_RUN)
        assert got == want, p
        total.merge(fin.stats.spec)
    assert total.drafts > 0 and 0 < total.accepted < total.drafted, total.line()
    assert set(total.by_drafter) == {"ngram"} and total.by_drafter["ngram"]["accepted"] == total.accepted


def events(stream):
    return [(e.id, e.from_draft) if isinstance(e, Token) else (e.reason, e.stats.predicted_n)
            for e in stream if isinstance(e, (Token, Finished))]


def test_batch_scheduler_equals_alone_and_plain(target):
    """Many slots drafting ragged n-gram drafts in one step give each request's events alone; greedy = plain.
    The suffix cache is off: with it, what a request drafts depends on which requests finished before."""
    eng = Engine(target, max_len=64, n_slots=4, drafter=NgramDrafter(n_min=1, n_max=3, cache_size=0),
                 spec=SpecConfig(method="ngram", n_max=4))
    rng = random.Random(3)
    reqs = [(p, SamplingParams(max_tokens=rng.randint(5, 25), ignore_eos=True, seed=i,
                               temperature=rng.choice([0.0, 0.0, 0.8])), SpecConfig(method="ngram", n_max=4))
            for i, p in enumerate(prompts(16, seed=11))]
    alone = [events(eng.generate(*r)) for r in reqs]
    with BatchScheduler(eng) as sch:
        together = [events(h) for h in [sch.submit(*r) for r in reqs]]
    assert together == alone
    for (p, sp, _), evs in zip(reqs, together):
        if sp.greedy:
            assert [e[0] for e in evs] == [e[0] for e in events(eng.generate(p, sp, SpecConfig(enabled=False)))]
    assert any(e[1] is True for evs in together for e in evs)  # drafts were accepted


def test_suffix_cache_learns_across_requests(target):
    """The second identical request drafts from what the first one generated; without the cache it does not."""
    sp = SamplingParams(max_tokens=30, ignore_eos=True)
    p = [3, 1, 4, 1, 5, 9, 2, 6]
    runs = {}
    for size in (0, 1 << 12):
        eng = Engine(target, max_len=64, drafter=NgramDrafter(n_min=1, n_max=3, cache_size=size),
                     spec=SpecConfig(method="ngram", n_max=4))
        runs[size] = [eng.complete(p, sp) for _ in range(2)]
        assert runs[size][0][0] == runs[size][1][0]
    (_, cold), (_, cold2) = runs[0]
    (_, first), (_, second) = runs[1 << 12]
    assert cold2.stats.spec.accepted == cold.stats.spec.accepted == first.stats.spec.accepted
    assert second.stats.spec.accepted > first.stats.spec.accepted
    assert second.stats.spec.rounds < first.stats.spec.rounds


@pytest.mark.slow
def test_sampling_matches_target_distribution(target):
    """T > 0: the 2nd generated token (the first a verify round emits; the prompt holds every token, so n-gram
    lookup drafts for any first token) is distributed as the target's exact marginal; chi-square, alpha 1e-3."""
    sp = dict(temperature=1.0, top_k=5, max_tokens=3, ignore_eos=True)
    prompt = list(range(V))
    marg = second_token_marginal(target, prompt, SamplingParams(**sp))
    eng = Engine(target, max_len=64, drafter=NgramDrafter(n_min=1, n_max=2, cache_size=0),
                 spec=SpecConfig(method="ngram", n_max=2))
    n, drafted = 400, 0
    seconds = []
    for s in range(n):
        toks, fin = eng.complete(prompt, SamplingParams(**sp, seed=s))
        seconds.append(toks[1])
        drafted += fin.stats.spec.drafted
    assert drafted >= n  # one-hot drafts were verified (sample-and-compare) in every run
    assert_matches_marginal(torch.tensor(seconds), marg)
