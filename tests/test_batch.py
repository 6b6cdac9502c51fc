"""Continuous batching (tandem.engine.batch): a request's events do not depend on what else is in the batch.

Tiny random Gemma 3 targets (token ids, no tokenizer: the real-tokenizer path is covered by test_server.py).
Speculative slots use `SelfDrafter`: a draft model (kind `draft-model`) that is the target itself, greedy, on its
own cache, so rounds accept several tokens (and every third round's last draft token is spoiled, so rejections
happen too); and a different tiny model as a draft model. One propose() call per step drafts for all slots.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import defaultdict

import pytest
import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine, Finished, Token
from tandem.engine.batch import BatchScheduler
from tandem.errors import RequestError
from tandem.models.gemma3 import Model, ModelArgs
from tandem.spec import DraftModelDrafter, register_method


register_method("test-self", "draft-model", help="tests only: the target drafts for itself, every third round spoiled")


class SelfDrafter(DraftModelDrafter):
    """A draft model (the real kind) that is the target itself, on its own cache sized here (test_server attaches
    it to a built engine). `corrupt_every`: spoil the last draft token of every n-th round, so verification also
    rejects; records the batch size of every propose() call."""

    def __init__(self, model, n_slots: int, max_len: int, dtype=torch.float32, corrupt_every: int = 3):
        super().__init__(model, name="self")
        self.make_cache(n_slots, max_len, k_type=dtype, v_type=dtype, device="cpu")
        self.corrupt_every = corrupt_every
        self.vocab = model.args.vocab_size
        self.rounds: dict[int, int] = defaultdict(int)
        self.batch_sizes: list[int] = []

    def begin(self, slot, prompt_state):
        super().begin(slot, prompt_state)
        self.rounds[slot] = 0

    def propose(self, batch):
        self.batch_sizes.append(len(batch))
        drafts = super().propose(batch)
        for c, d in zip(batch, drafts):
            if c.k_max <= 0:
                continue
            r = self.rounds[c.slot]
            self.rounds[c.slot] += 1
            if self.corrupt_every and r % self.corrupt_every == self.corrupt_every - 1 and d.k:
                d.tokens = torch.cat([d.tokens[:-1], (d.tokens[-1:] + 1) % self.vocab])
        return drafts


def tiny_model(seed: int = 0, vocab: int = 512) -> Model:
    torch.manual_seed(seed)
    args = ModelArgs(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                     sliding_window=16, sliding_window_pattern=2)
    m = Model(args).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def events_of(stream) -> list:
    out = []
    for ev in stream:
        if isinstance(ev, Token):
            out.append(("tok", ev.id, ev.text, ev.from_draft))
        elif isinstance(ev, Finished):
            out.append(("fin", ev.reason, ev.stats.prompt_n, ev.stats.predicted_n))
        else:
            out.append(("failed", ev.message))
    return out


def random_requests(n: int, vocab: int, seed: int = 0, spec: bool = False):
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(2, 40))]
        sp = SamplingParams(max_tokens=rng.randint(1, 30), temperature=rng.choice([0.0, 0.0, 0.7, 1.2]), seed=i,
                            top_k=rng.choice([0, 0, 20]), top_p=rng.choice([1.0, 0.9]))
        sc = SpecConfig(enabled=spec and i % 2 == 0, method="test-self", n_max=rng.choice([1, 2, 4]))
        reqs.append((prompt, sp, sc))
    return reqs


@pytest.fixture(scope="module")
def engine():
    m = tiny_model()
    eng = Engine(m, None, max_len=96, n_slots=4, drafter=SelfDrafter(m, 4, 96),
                 spec=SpecConfig(method="test-self"))
    return eng


def test_plain_requests_batched_equal_alone(engine):
    reqs = random_requests(14, engine.model.args.vocab_size, seed=1)
    plain = SpecConfig(enabled=False, method="test-self")
    alone = [events_of(engine.generate(p, sp, plain)) for p, sp, _ in reqs]
    with BatchScheduler(engine) as sch:
        handles = [sch.submit(p, sp, plain) for p, sp, _ in reqs]
        together = [events_of(h) for h in handles]
    assert together == alone
    assert sch.step_rows > sch.steps  # batches really held several rows


def test_speculative_and_plain_mixed_equal_alone(engine):
    reqs = random_requests(12, engine.model.args.vocab_size, seed=2, spec=True)
    alone = [events_of(engine.generate(p, sp, sc)) for p, sp, sc in reqs]
    with BatchScheduler(engine) as sch:
        handles = [sch.submit(p, sp, sc) for p, sp, sc in reqs]
        together = [events_of(h) for h in handles]
    assert together == alone
    # speculation really ran, accepting several tokens in some rounds
    drafted = [ev for evs, (_, _, sc) in zip(together, reqs) if sc.enabled for ev in evs if ev[0] == "tok" and ev[3]]
    assert len(drafted) > 10
    # lossless at T=0: speculating gives the plain tokens
    for (p, sp, sc), evs in zip(reqs, together):
        if sc.enabled and sp.greedy:
            plain = events_of(engine.generate(p, sp, SpecConfig(enabled=False, method="test-self")))
            assert [e[:3] for e in evs] == [e[:3] for e in plain]


def test_one_propose_per_step_for_all_slots(engine):
    engine.drafter.batch_sizes.clear()
    reqs = [([i + 1, i + 2, i + 3], SamplingParams(max_tokens=12, ignore_eos=True), SpecConfig(method="test-self"))
            for i in range(4)]
    with BatchScheduler(engine) as sch:
        for h in [sch.submit(*r) for r in reqs]:
            list(h)
    assert max(engine.drafter.batch_sizes) > 1


def test_draft_model_batched_equals_alone_and_plain():
    """A different model (the target with noise on its weights) as the draft model (kind draft-model, methods
    "draft" / "draft_sample"): several slots batched give each request's events alone, and greedy requests give
    the plain tokens."""
    m, other = tiny_model(), tiny_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    eng = Engine(m, None, max_len=96, n_slots=4, drafter=DraftModelDrafter(other),
                 spec=SpecConfig(method="draft"))
    reqs = random_requests(10, m.args.vocab_size, seed=4, spec=True)
    reqs = [(p, sp, SpecConfig(enabled=sc.enabled, method="draft_sample" if i % 4 == 2 else "draft", n_max=sc.n_max))
            for i, (p, sp, sc) in enumerate(reqs)]
    alone = [events_of(eng.generate(p, sp, sc)) for p, sp, sc in reqs]
    with BatchScheduler(eng) as sch:
        together = [events_of(h) for h in [sch.submit(p, sp, sc) for p, sp, sc in reqs]]
    assert together == alone
    for (p, sp, sc), evs in zip(reqs, together):
        if sc.enabled and sp.greedy:
            plain = events_of(eng.generate(p, sp, SpecConfig(enabled=False)))
            assert [e[:3] for e in evs] == [e[:3] for e in plain]
    assert any(e[3] for evs in together for e in evs if e[0] == "tok")  # some drafts were accepted


def test_spec_stats_per_request(engine):
    with BatchScheduler(engine) as sch:
        h = sch.submit([5, 6, 7, 8], SamplingParams(max_tokens=20, ignore_eos=True),
                       SpecConfig(method="test-self", n_max=3))
        fin = [e for e in h if isinstance(e, Finished)][0]
    sp = fin.stats.spec
    assert fin.stats.predicted_n == 20 and sp is not None and sp.drafted > 0 and sp.accepted > 0
    assert len(sp.acceptance_by_position) <= 3


def test_more_requests_than_slots_and_cancel(engine):
    with BatchScheduler(engine) as sch:
        long = sch.submit([1, 2, 3], SamplingParams(max_tokens=80, ignore_eos=True))
        first = next(iter(long.sync_batches()))
        assert isinstance(first[0], Token)
        long.cancel()
        deadline = time.time() + 5
        while sch.n_active and time.time() < deadline:
            time.sleep(0.01)
        assert sch.n_active == 0
        hs = [sch.submit([i + 1, i + 2], SamplingParams(max_tokens=5)) for i in range(10)]
        waiting = [sch.submit([9, 9, 9], SamplingParams(max_tokens=60)) for _ in range(3)]
        for w in waiting:
            w.cancel()
        results = [events_of(h) for h in hs]
        assert all(r[-1][0] == "fin" for r in results)
        deadline = time.time() + 5
        while (sch.n_active or sch.n_waiting) and time.time() < deadline:
            time.sleep(0.01)
        assert sch.n_active == 0 and sch.n_waiting == 0


def test_context_full_finishes_with_length(engine):
    with BatchScheduler(engine) as sch:
        h = sch.submit(list(range(1, 90)), SamplingParams(max_tokens=50, ignore_eos=True))
        evs = events_of(h)
    assert evs[-1][0] == "fin" and evs[-1][1] == "length" and evs[-1][3] == 96 - 89


def test_async_iteration(engine):
    async def main():
        with BatchScheduler(engine) as sch:
            hs = [sch.submit([3, 1, 4, 1, 5], SamplingParams(max_tokens=6, seed=s, temperature=1.0))
                  for s in range(3)]

            async def drain(h):
                return [ev async for ev in h]
            return await asyncio.gather(*(drain(h) for h in hs))
    res = asyncio.run(main())
    for evs in res:
        assert isinstance(evs[-1], Finished) and evs[-1].stats.predicted_n == 6


def test_bad_ids_refused_at_submit_and_scheduler_survives(engine):
    """(Failures inside the loop, one slot at a time: tests/test_reliability_server.py.)"""
    with BatchScheduler(engine) as sch:
        with pytest.raises(RequestError, match="outside the vocabulary"):  # refused before it reaches a slot
            sch.submit([1, 2, 10 ** 6], SamplingParams(max_tokens=3))
        ok = events_of(sch.submit([1, 2, 3], SamplingParams(max_tokens=3)))
        assert ok[-1][0] == "fin"


def test_chunked_prefill_interleaves_and_matches_alone(engine, monkeypatch):
    import tandem.engine.batch as batch
    import tandem.engine.core as core
    monkeypatch.setattr(core, "PREFILL_CHUNK", 8)
    monkeypatch.setattr(batch, "PREFILL_CHUNK", 8)
    reqs = random_requests(8, engine.model.args.vocab_size, seed=3, spec=True)
    alone = [events_of(engine.generate(p, sp, sc)) for p, sp, sc in reqs]
    with BatchScheduler(engine) as sch:
        together = [events_of(h) for h in [sch.submit(p, sp, sc) for p, sp, sc in reqs]]
    assert together == alone
