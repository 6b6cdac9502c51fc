"""The adaptive draft length (tandem.spec.policy.AdaptiveLength): k = 0 when drafts miss and verifying is costly,
longer drafts when they are accepted, probes back after plain rounds, n_min and a pinned length respected; the
policy only chooses k, so speculative == plain at T = 0 with it on (Engine.generate and the batch scheduler)."""

import pytest
import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine
from tandem.engine.batch import BatchScheduler
from tandem.engine.speculative import round_cost
from tandem.spec import DraftModelDrafter
from tandem.spec.policy import AcceptanceEstimate, AdaptiveLength, ChainLengths, RoundCost, expected_tokens
from tests.test_spec_lossless import V, noisy_copy, tiny_target


def cost_of(verify_ms: float, per_token_ms: float, ks=(0, 1, 2, 3)) -> RoundCost:
    """A round cost that has seen rounds of every k in ks: verify flat at verify_ms, drafting per_token_ms a token."""
    c = RoundCost()
    for _ in range(4):
        for k in ks:
            c.observe(k, per_token_ms * k, verify_ms)
    return c


def test_round_cost_curve():
    assert RoundCost().curve(2) == pytest.approx([1.0, 1.15, 1.3])  # priors before any round
    c = RoundCost()
    c.observe(2, 400.0, 1100.0)  # the first round of a length is not counted (one-off costs)
    c.observe(2, 4.0, 11.0)  # one k seen: verify's slope from the prior ratio, the draft proportional to k
    assert c.curve(2) == pytest.approx([10.0, 12.5, 15.0])
    c = cost_of(10.0, 3.0, ks=(0, 2, 4))  # k spread: both lines measured (flat verify, 3 ms a draft token)
    assert c.curve(6) == pytest.approx([10.0 + 3.0 * k for k in range(7)])
    for _ in range(60):  # every round refreshes every k: verify got slower, and k = 1 shows it for k = 4 too
        c.observe(1, 3.0, 20.0)
    assert c.curve(4)[4] == pytest.approx(20.0 + 12.0, rel=0.1)  # not the stale 10 + 12


def test_acceptance_estimate_and_expected_tokens():
    est = AcceptanceEstimate(prior=0.5)
    for _ in range(20):
        est.observe(2, 1)  # position 0 always accepted, position 1 always rejected
    a0, a1, a2 = est.alphas(3)
    assert a0 > 0.94 and a1 < 0.2 and a2 < 0.3  # position 2, never drafted, leans on position 1
    # the prior must not cap a drafter that is always right (a costly draft model needs ~0.95 to draft long)
    assert expected_tokens([1.0, 0.5]) == [1.0, 2.0, 2.5]


def test_picks_plain_when_drafts_miss_and_verify_is_costly():
    ad = AdaptiveLength(cost_of(10.0, 2.0), n_min=1)
    for _ in range(6):
        ad.observe(3, 0, 6.0, 10.0)
    assert ad.choose(3) == 0


def test_grows_when_drafts_are_accepted():
    ad = AdaptiveLength(cost_of(10.0, 0.3), n_min=1)
    assert ad.choose(8) < 8
    for _ in range(10):
        ad.observe(3, 3, 0.9, 10.0)
    assert ad.choose(8) == 8  # positions never drafted look as good as the last accepted one


def test_probes_after_plain_rounds_and_recovers():
    ad = AdaptiveLength(cost_of(10.0, 3.0), n_min=1, probe_every=4)
    for _ in range(8):
        ad.observe(1, 0, 3.0, 10.0)
    picks = []
    for _ in range(12):
        k = ad.choose(3)
        picks.append(k)
        ad.observe(k, 0, 3.0 * k, 10.0)
    assert picks == [0, 0, 0, 0, 1] * 2 + [0, 0]  # a 1-token probe after every 4 plain rounds
    for _ in range(10):  # the text turns predictable: the probes are accepted, drafting comes back
        k = ad.choose(3)
        ad.observe(k, k, 3.0 * k, 10.0)
    assert ad.choose(3) >= 2


def test_n_min_respected():
    ad = AdaptiveLength(cost_of(10.0, 0.3), n_min=2)
    for _ in range(10):
        ad.observe(3, 1, 0.9, 10.0)
    assert ad.choose(3) in (0, 2, 3)
    assert ad.choose(1) == 0  # the cap is below n_min: no draft


def test_chain_members_have_separate_estimates():
    """Member a's drafts are all accepted, member b's all rejected: a drafts long, b gets 0 and is skipped; b probes
    after probe_every rounds chosen 0, and a probe that never ran (a won the round) runs the next round."""
    lengths = ChainLengths({"a": AdaptiveLength(cost_of(10.0, 0.3), probe_every=4),
                            "b": AdaptiveLength(cost_of(10.0, 3.0), probe_every=4)})
    for _ in range(10):
        lengths.observe("a", 3, 3, 0.9, 10.0)
        lengths.observe("b", 3, 0, 9.0, 10.0)
    caps = {"a": 8, "b": 8}
    assert lengths.choose(caps) == {"a": 8, "b": 0}
    b_picks = []
    for _ in range(9):  # rounds nobody drafted (a found no match): b's idle rounds count, a is unaffected
        b_picks.append(lengths.choose(caps)["b"])
        lengths.observe("", 0, 0, 1.0, 10.0)
    assert b_picks == [0, 0, 0, 1, 0, 0, 0, 0, 1]  # 3 more idle rounds after the first choice, then a probe
    assert lengths.by_member["a"].choose(8) == 8
    for _ in range(4):
        lengths.choose(caps)
        lengths.observe("", 0, 0, 1.0, 10.0)
    assert lengths.choose(caps)["b"] == 1  # b's probe; a wins the round, so b's probe runs next round
    lengths.observe("a", 8, 8, 2.4, 10.0)
    assert lengths.choose(caps) == {"a": 8, "b": 1}
    lengths.observe("b", 1, 0, 3.0, 10.0)  # the probe missed: back to idle
    assert lengths.choose(caps)["b"] == 0


def test_seeded_sampled_request_is_reproducible(setup):
    """Seed + T > 0 + adaptive: the lengths come from the request's own counts and the fixed cost priors, so
    whatever the engine's shared round cost learnt meanwhile, the same seed gives the same rounds and tokens."""
    target, prompts, _, _ = setup
    d = Recording(noisy_copy(target))
    eng = Engine(target, max_len=64, drafter=d, spec=SpecConfig(method="draft_sample", n_max=4, adaptive=True))
    sp = SamplingParams(temperature=1.0, seed=11, max_tokens=30, ignore_eos=True)
    cost = round_cost(eng, "draft_sample")
    runs = []
    for per_token in (0.1, 50.0):  # the shared cost says drafting is cheap, then that it is ruinous
        for _ in range(3):
            for k in (0, 1, 2, 3):
                cost.observe(k, per_token * k, 10.0)
        d.k_max = []
        runs.append((eng.complete(prompts[1], sp)[0], d.k_max))
    assert runs[0] == runs[1] and max(runs[0][1]) > 0
    unseeded = SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True)
    d.k_max = []
    eng.complete(prompts[1], unseeded)
    assert d.k_max.count(0) > len(d.k_max) // 2  # unseeded, it reads the shared cost: ruinous, so mostly no draft


class Recording(DraftModelDrafter):
    """A draft model that records the k_max of every context it is asked for."""

    def __init__(self, model):
        super().__init__(model)
        self.k_max: list[int] = []

    def propose(self, batch):
        self.k_max += [c.k_max for c in batch]
        return super().propose(batch)


@pytest.fixture(scope="module")
def setup():
    target = tiny_target()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, V, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(6)]
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = Engine(target, max_len=64)
    return target, prompts, greedy, [plain.complete(p, greedy)[0] for p in prompts]


def test_pinned_length_respected(setup):
    target, prompts, greedy, _ = setup
    d = Recording(tiny_target(seed=9))  # a different model: its drafts mostly miss
    eng = Engine(target, max_len=64, drafter=d, spec=SpecConfig(method="draft", n_max=3, adaptive=False))
    eng.complete(prompts[0], greedy)
    assert set(d.k_max[:-2]) == {3}  # every round drafts n_max (the last ones: the budget is shorter)


def test_adaptive_stops_drafting_a_missing_costly_drafter(setup):
    target, prompts, greedy, _ = setup
    d = Recording(tiny_target(seed=9))
    eng = Engine(target, max_len=64, drafter=d, spec=SpecConfig(method="draft", n_max=3, adaptive=True))
    cost = round_cost(eng, "draft")
    for _ in range(3):
        for k in (0, 1, 2, 3):
            cost.observe(k, 10.0 * k, 10.0)  # a draft token costs a whole target step
    cost.verify.decay = cost.draft.decay = 1.0
    cost.observe = lambda *_: None  # keep the injected costs whatever this loaded machine measures
    eng.complete(prompts[0], SamplingParams(max_tokens=40, ignore_eos=True))
    assert d.k_max.count(0) > len(d.k_max) // 2 and max(d.k_max) >= 1  # mostly plain, with probes


@pytest.mark.parametrize("kind", ["noisy_copy", "other_model"])
def test_adaptive_greedy_equals_plain(setup, kind):
    target, prompts, greedy, ref = setup
    model = noisy_copy(target) if kind == "noisy_copy" else tiny_target(seed=9)
    d = Recording(model)
    eng = Engine(target, max_len=64, drafter=d, spec=SpecConfig(method="draft", n_max=5, adaptive=True))
    for p, want in zip(prompts, ref):
        assert eng.complete(p, greedy)[0] == want
    assert max(d.k_max) > 0


def test_adaptive_batched_equals_plain(setup):
    target, prompts, greedy, ref = setup
    eng = Engine(target, max_len=64, n_slots=3, drafter=DraftModelDrafter(noisy_copy(target)),
                 spec=SpecConfig(method="draft", n_max=4, adaptive=True))
    with BatchScheduler(eng) as sch:
        handles = [sch.submit(p, greedy) for p in prompts]
        got = [[e.id for e in h if getattr(e, "id", -1) >= 0] for h in handles]
    assert got == ref


def test_drafter_recommendation_fills_unset_n_max_and_p_min(tmp_path):
    """A drafter directory's config.json `recommended` n_max / p_min: used by the engine's default and by requests
    that leave them unset, overridden where set; a bad recommendation is refused naming the file and field."""
    import json

    from tandem import loading
    from tandem.errors import ModelLoadError
    from tandem.spec import load_drafter
    from tests.test_draft_model import save_tiny_gemma3

    d = save_tiny_gemma3(tmp_path / "m", 0)
    tgt = loading.load(str(d), dtype=torch.float32)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "recommended": {"n_max": 5, "p_min": 0.0}}))
    same = load_drafter(str(d), target=tgt.model, target_loaded=tgt, weight_format="fp32")  # all accepted
    assert same.recommended == {"n_max": 5, "p_min": 0.0}
    eng = Engine(tgt.model, max_len=64, drafter=same)
    assert (eng.spec.n_max, eng.spec.p_min) == (5, 0.0)
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    longest = {n: len(eng.complete([5, 6, 7], greedy, spec=SpecConfig(method="draft", n_max=n))[1].stats.spec
                      .drafted_at) for n in (None, 2)}
    assert longest == {None: 5, 2: 2}
    (d / "config.json").write_text(json.dumps({**cfg, "recommended": {"n_max": 4, "p_min": 1.0}}))
    picky = load_drafter(str(d), target=tgt.model, target_loaded=tgt, weight_format="fp32")
    eng = Engine(tgt.model, max_len=64, drafter=picky)
    assert eng.complete([5, 6, 7], greedy, spec=SpecConfig(method="draft"))[1].stats.spec.drafted == 0  # cut
    assert eng.complete([5, 6, 7], greedy, spec=SpecConfig(method="draft", p_min=0.0))[1].stats.spec.drafted > 0
    assert SpecConfig(n_min=6).resolved(picky.recommended).n_max == 6  # a set n_min wins over the recommendation
    for bad, what in (({"n_max": 40}, "n_max"), ({"n_min": 2}, "keys n_max and/or p_min"), ([3], "object")):
        (d / "config.json").write_text(json.dumps({**cfg, "recommended": bad}))
        with pytest.raises(ModelLoadError, match=rf"config.json: field 'recommended'.*{what}"):
            load_drafter(str(d), target=tgt.model, target_loaded=tgt, weight_format="fp32")


def test_new_request_starts_from_the_engines_first_position_acceptance():
    """A member whose first draft token is rarely accepted (a chain's fallback at the hard positions) is not trusted
    afresh at 0.5 by every request: the shared round cost carries its acceptance; a seeded request's fixed cost
    does not (its lengths depend only on itself)."""
    cost = cost_of(10.0, 3.0)
    first = AdaptiveLength(cost, n_min=1)
    assert first.acceptance.prior == 0.5 and first.choose(3) > 0
    for _ in range(60):
        first.observe(2, 0, 6.0, 10.0)
    later = AdaptiveLength(cost, n_min=1)
    assert later.acceptance.prior < 0.2 and later.choose(3) == 0
    assert AdaptiveLength(RoundCost(fixed=True)).acceptance.prior == 0.5
