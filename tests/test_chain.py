"""Chains of drafters (tandem.spec.chain): ngram -> assistant / draft-model / nextn is lossless at T = 0 through
Engine.generate and the batch scheduler (requests with different chains in one step), both members win rounds,
and members that did not draft a round still follow it (a draft model's cache or the nextn heads would assert
otherwise); per-drafter stats; unknown chain names are refused naming the allowed ones (engine and server);
--spec-chain builds the drafter set."""

import argparse
import random

import pytest

from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine, Token
from tandem.engine.batch import BatchScheduler
from tandem.engine.options import EngineOptions, add_engine_args
from tandem.errors import ConfigError
from tandem.spec import (ChainDrafter, DraftModelDrafter, MTPAssistantDrafter, NgramDrafter, SpecStats,
                         build_drafters, check_spec)
from tests.test_spec_lossless import V, noisy_copy, tiny_assistant, tiny_target

SP = SamplingParams(max_tokens=16, ignore_eos=True)


def prompts(n, vocab, seed):
    g = random.Random(seed)
    out = []
    for i in range(n):
        phrase = [g.randrange(vocab) for _ in range(g.randint(2, 4))]
        out.append((phrase * 3)[: g.randint(len(phrase) + 1, 3 * len(phrase))] if i % 2 else phrase)
    return out


def check_chain(target, member, kind, ps, slots=3, adaptive=False):
    eng = Engine(target, max_len=64, n_slots=slots, drafter=ChainDrafter(
        {"ngram": NgramDrafter(n_min=1, n_max=3), kind: member}), spec=SpecConfig(n_max=3, adaptive=adaptive))
    plain = [eng.complete(p, SP, spec=SpecConfig(enabled=False))[0] for p in ps]
    total = SpecStats()
    for p, want in zip(ps, plain):
        got, fin = eng.complete(p, SP)
        assert got == want, p
        total.merge(fin.stats.spec)
    per = total.by_drafter
    assert per["ngram"]["won"] > 0 and per[kind]["won"] > 0, total.line()
    assert sum(v["accepted"] for v in per.values()) == total.accepted
    chains = [SpecConfig(n_max=3, adaptive=adaptive), SpecConfig(n_max=2, chain=[kind, "ngram"], adaptive=adaptive),
              SpecConfig(chain=["ngram"], adaptive=adaptive)]
    with BatchScheduler(eng) as sch:
        hs = [sch.submit(p, SP, chains[i % 3]) for i, p in enumerate(ps)]
        got = [[e.id for e in h if isinstance(e, Token) and e.id >= 0] for h in hs]
    assert got == plain


@pytest.mark.parametrize("adaptive", [False, True])
def test_chain_ngram_then_assistant(adaptive):
    target = tiny_target()
    check_chain(target, MTPAssistantDrafter(tiny_assistant(), target), "assistant", prompts(16, V, 1),
                adaptive=adaptive)


@pytest.mark.parametrize("adaptive", [False, True])
def test_chain_ngram_then_draft_model(adaptive):
    target = tiny_target()
    check_chain(target, DraftModelDrafter(noisy_copy(target)), "draft-model", prompts(16, V, 2), adaptive=adaptive)


def recording(cls):
    """A drafter class that records the k_max of every context it is asked for."""
    class Recorder(cls):
        def propose(self, batch):
            self.k_max = getattr(self, "k_max", []) + [c.k_max for c in batch]
            return super().propose(batch)
    return Recorder


def test_chain_members_get_their_own_length():
    """Per-member adaptive length (tandem.spec.policy.ChainLengths): the member whose drafting is costly (injected
    round cost) is held at k = 0 and skipped, with probes, while the draft model (the target: every draft
    accepted) drafts long; the output is still plain decoding's."""
    from tandem.engine.speculative import round_cost
    target = tiny_target()
    ngram, model = recording(NgramDrafter)(n_min=1, n_max=3), recording(DraftModelDrafter)(target)
    eng = Engine(target, max_len=96, drafter=ChainDrafter({"ngram": ngram, "draft-model": model}),
                 spec=SpecConfig(n_max=6, adaptive=True))
    for member, per_token in (("ngram", 50.0), ("draft-model", 0.1)):
        cost = round_cost(eng, "auto", member=member)
        for _ in range(3):
            for k in (0, 1, 2, 3):
                cost.observe(k, per_token * k, 10.0)
        cost.observe = lambda *_: None  # keep the injected costs whatever this loaded machine measures
    p = prompts(2, V, 4)[1]
    sp = SamplingParams(max_tokens=60, ignore_eos=True)
    got, fin = eng.complete(p, sp)
    assert got == eng.complete(p, sp, spec=SpecConfig(enabled=False))[0]
    per = fin.stats.spec.by_drafter
    assert per["draft-model"]["accepted"] == per["draft-model"]["proposed"] and per["draft-model"]["won"] > 3
    assert max(model.k_max) == 6 and per.get("ngram", {"won": 0})["won"] <= 3  # ngram: only its probes
    assert ngram.k_max.count(0) > len(ngram.k_max) * 3 // 4


def test_chain_ngram_then_nextn(tmp_path):
    pytest.importorskip("transformers")
    from tandem.loading import load
    from tandem.spec import load_drafter
    from tests.test_nextn import write_checkpoint
    write_checkpoint(tmp_path, "glm4_moe", 1)
    target = load(str(tmp_path), tokenizer=False).model.eval()
    check_chain(target, load_drafter(None, target=target, weight_format="fp32"), "nextn", prompts(8, 128, 3))


def test_chain_names_are_checked():
    target = tiny_target()
    chain = ChainDrafter({"ngram": NgramDrafter(), "assistant": MTPAssistantDrafter(tiny_assistant(), target)})
    check_spec(chain, SpecConfig(chain=["mtp", "ngram"]))
    check_spec(chain, SpecConfig(method="mtp"))
    with pytest.raises(ConfigError, match=r"'draft'.*allowed: \['assistant', 'mtp', 'ngram'\]"):
        check_spec(chain, SpecConfig(chain=["ngram", "draft"]))
    with pytest.raises(ConfigError, match=r"'bogus'.*allowed: \['ngram'\]"):
        check_spec(NgramDrafter(), SpecConfig(chain=["bogus"]))
    with pytest.raises(ConfigError, match="distinct"):
        SpecConfig(chain=["ngram", "ngram"])
    eng = Engine(target, max_len=32, drafter=chain)
    with pytest.raises(ConfigError, match="allowed"):
        eng.complete([1, 2, 3], SP, spec=SpecConfig(chain=["nextn"]))


def test_server_refuses_unknown_chain_names():
    from tandem.server.protocol import APIError, ChatCompletionRequest, spec_of
    chain = ChainDrafter({"ngram": NgramDrafter(), "draft-model": DraftModelDrafter(tiny_target())})
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], speculative={"chain": ["ngram", "mtp"]})
    with pytest.raises(APIError) as e:
        spec_of(req, SpecConfig(), chain)
    assert e.value.status == 400 and e.value.param == "speculative.chain" and "'draft'" in e.value.message
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], speculative={"chain": ["draft", "ngram"]})
    assert spec_of(req, SpecConfig(), chain).chain == ("draft", "ngram")


def test_spec_chain_flag_builds_the_drafter_set():
    p = argparse.ArgumentParser()
    add_engine_args(p)
    opts = EngineOptions.from_args(p.parse_args(["--spec-chain", "ngram, mtp", "--ngram-n-max", "5"]))
    assert opts.spec.chain == ("ngram", "mtp") and opts.ngram_n_max == 5
    target = tiny_target()
    assistant = MTPAssistantDrafter(tiny_assistant(), target)
    d = build_drafters(opts.spec.chain, lambda: assistant, dict(n_max=opts.ngram_n_max))
    assert isinstance(d, ChainDrafter) and d.order == ("ngram", "assistant") and d.members["ngram"].n_max == 5
    assert isinstance(build_drafters(("ngram",), lambda: None), NgramDrafter)
    default = build_drafters((), lambda: assistant, dict(n_max=opts.ngram_n_max))  # no flag: ngram, then the model
    assert isinstance(default, ChainDrafter) and default.order == ("ngram", "assistant")
    assert default.members["assistant"] is assistant and default.members["ngram"].n_max == 5
    assert build_drafters(("mtp",), lambda: assistant) is assistant
    alone = build_drafters((), lambda: None, dict(n_max=5))  # no model drafter: n-gram drafts alone
    assert isinstance(alone, NgramDrafter) and alone.n_max == 5
    with pytest.raises(ConfigError, match="'draft'.*a draft-model drafter.*assistant"):
        build_drafters(("ngram", "draft"), lambda: assistant)
    with pytest.raises(ConfigError, match="at most one model drafter"):
        build_drafters(("mtp", "draft"), lambda: assistant)


def test_chain_stats_line_names_each_drafter():
    s = SpecStats()
    s.record(3, 2, drafter="ngram")
    s.record(2, 0, drafter="assistant")
    t = SpecStats().merge(s).merge(s)
    assert t.by_drafter == {"ngram": {"won": 2, "proposed": 6, "accepted": 4},
                            "assistant": {"won": 2, "proposed": 4, "accepted": 0}}
    assert "ngram: won 2, 4/6 accepted" in t.line() and t.to_dict()["by_drafter"] == t.by_drafter


def test_trace_names_each_rounds_winner():
    from tandem.spec import set_tracer
    target = tiny_target()
    eng = Engine(target, max_len=64, drafter=ChainDrafter(
        {"ngram": NgramDrafter(n_min=1), "assistant": MTPAssistantDrafter(tiny_assistant(), target)}))
    events = []
    set_tracer(events.append)
    try:
        fin = eng.complete([1, 2, 3, 1, 2, 3, 1], SP)[1]
    finally:
        set_tracer(None)
    won = [e["drafter"] for e in events if e["event"] == "draft" and e["tokens"]]
    assert set(won) <= {"ngram", "assistant"} and won
    assert {k: won.count(k) for k in set(won)} == {k: v["won"] for k, v in fin.stats.spec.by_drafter.items()}
