"""Speculative decoding is lossless.

- T = 0: over 60 random prompts and n_max in {1, 3, 5}, speculative output == plain output token for token, with
  the Gemma 4 assistant drafter and with draft models (kind `draft-model`): a noisy copy of the target (partial
  acceptances at every position) and a different tiny model.
- T > 0: verify()'s next-token distribution == the target's processed distribution (chi-square at alpha = 1e-3,
  20k samples, fixed seed), for deterministic drafts (sample-and-compare) and sampled drafts (p/q rejection),
  under temperature / top-k / top-p / min-p; an end-to-end sampled run matches plain sampling's distribution.
- A draft model equal to the target is accepted 100 %.
- Rollback: after every round the target cache length is the accepted prefix and its entries equal plain
  decoding's; the draft model's own cache holds only accepted tokens, and its next proposal equals a fresh draft
  model's fed the same prefix.
- The policy (n_max / n_min / p_min, tandem.spec.policy) cuts every drafter's drafts alike.
"""

import pytest
import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine
from tandem.models import gemma3
from tandem.models import gemma4_assistant as ga
from tandem.sampling import process_logits
from tandem.spec import (Draft, DraftContext, DraftModelDrafter, DraftPolicy, MTPAssistantDrafter, PromptState,
                         SpecStats, verify)

V = 16
S, F = "sliding_attention", "full_attention"


def _randomize(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) * 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return m


def tiny_target(seed=0):
    args = gemma3.ModelArgs(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                            sliding_window_pattern=2, query_pre_attn_scalar=16)
    return _randomize(gemma3.Model(args), seed).eval()


def tiny_assistant(seed=1, centroids=False):
    extra = dict(use_ordered_embeddings=True, num_centroids=4, centroid_intermediate_top_k=2) if centroids else {}
    args = ga.ModelArgs.from_dict(dict(backbone_hidden_size=32, **extra, text_config=dict(
        vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, global_head_dim=16, sliding_window=4, layer_types=[S, F])))
    m = _randomize(ga.Model(args), seed).eval()
    if centroids:
        m.masked_embedding.token_ordering.copy_(torch.randperm(V, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(0.5)  # plain-weight norms (no 1 + w)
    return m


def noisy_copy(target, scale=0.3, seed=5):
    """The target with noise on every weight: a draft model that agrees often, not always."""
    m = tiny_target()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return m


def draft_engine(target, model, method="draft", max_len=64, n_max=3, **spec):
    return Engine(target, max_len=max_len, drafter=DraftModelDrafter(model),
                  spec=SpecConfig(method=method, n_max=n_max, **spec))


N_PROMPTS = 60
MAX_TOKENS = 14


@pytest.fixture(scope="module")
def setup():
    target = tiny_target()
    g = torch.Generator().manual_seed(123)
    prompts = [torch.randint(0, V, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
               for _ in range(N_PROMPTS)]
    plain = Engine(target, max_len=64)
    greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    ref = [plain.complete(p, greedy)[0] for p in prompts]
    return target, prompts, ref


@pytest.mark.parametrize("n_max", [1, 3, 5])
@pytest.mark.parametrize("kind", ["mtp", "noisy_copy", "other_model"])
def test_greedy_equals_plain(setup, n_max, kind):
    target, prompts, ref = setup
    if kind == "mtp":
        eng = Engine(target, max_len=64, drafter=MTPAssistantDrafter(tiny_assistant(), target),
                     spec=SpecConfig(method="mtp", n_max=n_max))
    else:
        eng = draft_engine(target, noisy_copy(target) if kind == "noisy_copy" else tiny_target(seed=9), n_max=n_max)
    total = SpecStats()
    for p, want in zip(prompts, ref):
        got, fin = eng.complete(p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        assert got == want, p
        total.merge(fin.stats.spec)
    assert total.drafts > 0
    if kind == "noisy_copy":  # partial acceptances at every draft position
        assert 0 < total.acceptance_rate < 1
        assert all(0 < a < d for a, d in zip(total.accepted_at, total.drafted_at))
    elif kind == "mtp":
        assert total.accepted > 0, total.line()


def test_drafter_equal_to_target_is_fully_accepted(setup):
    target, prompts, ref = setup
    for method, sampling in (("draft", SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)),
                             ("draft_sample", SamplingParams(temperature=0.9, top_k=8, seed=3,
                                                             max_tokens=MAX_TOKENS, ignore_eos=True))):
        eng = draft_engine(target, target, method, n_max=4)
        total = SpecStats()
        for p in prompts[:10]:
            total.merge(eng.complete(p, sampling)[1].stats.spec)
        assert total.drafted > 0 and total.accepted == total.drafted, (method, total.line())
        assert total.acceptance_rate == 1.0


def fresh_proposal(model, prefix, ctx):
    """What a new draft model, prefilled with `prefix` alone, proposes for the same context."""
    d = DraftModelDrafter(model)
    d.make_cache(1, 64, k_type="f32", v_type="f32", device="cpu")
    d.begin(0, PromptState(ids=prefix, hidden=None, cache=None))
    c = DraftContext(slot=0, last_token=ctx.last_token, position=ctx.position, cache=None, sampling=ctx.sampling,
                     k_max=ctx.k_max, p_floor=ctx.p_floor)
    return d.propose([c])[0].tokens.tolist()


def test_rollback_keeps_exactly_the_accepted_prefix(setup):
    target, prompts, ref = setup
    plain = Engine(target, max_len=64)

    class Checked(DraftModelDrafter):
        """Checks the caches after every round and the next proposal against a fresh draft model's."""

        def begin(self, slot, prompt_state):
            super().begin(slot, prompt_state)
            self.hist = list(prompt_state.ids)  # the tokens whose K/V the target holds

        def propose(self, batch):
            drafts = super().propose(batch)
            for c, d in zip(batch, drafts):
                assert d.tokens.tolist() == fresh_proposal(self.model, self.hist, c)
                self.x = c.last_token
            return drafts

        def accept(self, slot, tokens, hidden):
            super().accept(slot, tokens, hidden)
            self.hist += [self.x] + tokens[:-1]
            L = len(self.hist)
            assert eng.cache.lengths[slot] == L and hidden.shape[0] == len(tokens)
            # the draft model's cache: accepted tokens only; still to run at most the last accepted draft (and x
            # after a round that could not draft)
            assert self.cache.lengths[slot] + len(self._todo[slot]) == L and len(self._todo[slot]) <= 2
            m = min(L, plain.cache.lengths[0])
            own = [(self.cache, min(m, self.cache.lengths[slot]))] if self.same_weights else []
            for cache, n in [(eng.cache, m)] + own:
                for layer in cache.k:
                    torch.testing.assert_close(cache.k[layer][slot, :, :n], plain.cache.k[layer][0, :, :n],
                                               rtol=0, atol=1e-5)
                    torch.testing.assert_close(cache.v[layer][slot, :, :n], plain.cache.v[layer][0, :, :n],
                                               rtol=0, atol=1e-5)
            self.rounds += 1

    same = Checked(noisy_copy(target, scale=0.0))  # the target's weights: plain's K/V are its K/V too
    noisy = Checked(noisy_copy(target))  # rejections at every position
    same.same_weights, noisy.same_weights = True, False
    for d in (same, noisy):
        d.rounds = 0
        eng = Engine(target, max_len=64, drafter=d, spec=SpecConfig(method="draft", n_max=3))
        for p, want in zip(prompts[:15], ref):
            plain.complete(p, SamplingParams(max_tokens=MAX_TOKENS + 4, ignore_eos=True))
            got, _ = eng.complete(p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
            assert got == want
        assert d.rounds > 30


@pytest.mark.parametrize("kind", ["mtp", "draft"])
def test_p_min_and_n_min(setup, kind):
    """The policy cuts every drafter's drafts alike: p_min = 1 never drafts; n_min = n_max keeps all-or-none."""
    target, prompts, ref = setup
    greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)

    def engine(**spec):
        if kind == "mtp":
            return Engine(target, max_len=64, drafter=MTPAssistantDrafter(tiny_assistant(), target),
                          spec=SpecConfig(n_max=3, **spec))
        return draft_engine(target, noisy_copy(target, scale=1.0), n_max=3, **spec)
    got, fin = engine(p_min=1.0).complete(prompts[0], greedy)
    assert got == ref[0] and fin.stats.spec.drafts == 0 and fin.stats.spec.rounds == MAX_TOKENS - 1
    all_or_none = engine(n_min=3, p_min=0.15 if kind == "mtp" else 0.6)
    st = SpecStats()
    for p, want in zip(prompts[:10], ref):
        got, fin = all_or_none.complete(p, greedy)
        assert got == want
        st.merge(fin.stats.spec)
    assert st.drafts > 0 and st.drafts < st.rounds  # some drafts cut by p_min, then dropped by n_min
    assert st.drafted == 3 * st.drafts  # every verified draft has exactly n_min = 3 tokens


def test_policy_k_max_and_cut():
    pol = DraftPolicy(SpecConfig(n_max=4, n_min=2, p_min=0.5), max_draft=16)
    assert pol.k_max(position=10, max_len=64, tokens_left=100) == 4
    assert pol.k_max(position=60, max_len=64, tokens_left=100) == 3  # room for the round's own token
    assert pol.k_max(position=10, max_len=64, tokens_left=2) == 1 and pol.k_max(10, 64, 1) == 0
    assert DraftPolicy(SpecConfig(n_max=8), max_draft=5).k_max(0, 64, 100) == 5
    d = Draft(torch.tensor([5, 6, 7, 8]), None, [0.9, 0.7, 0.4, 0.99])
    assert pol.cut(d).tokens.tolist() == [5, 6]  # stops at the first token below p_min
    assert pol.cut(Draft(torch.tensor([5, 6]), None, [0.9, 0.3])).k == 0  # shorter than n_min: dropped
    q = torch.rand(4, V)
    cut = pol.cut(Draft(torch.tensor([5, 6, 7, 8]), q, [0.9, 0.8, 0.7, 0.1]))
    assert cut.tokens.tolist() == [5, 6, 7] and torch.equal(cut.probs, q[:3]) and cut.confidence == [0.9, 0.8, 0.7]


# -- verify() distribution at T > 0 --------------------------------------------------------------------------------

CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59,
            11: 31.26}
SAMPLINGS = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.3, top_k=4),
             SamplingParams(temperature=1.0, top_p=0.8), SamplingParams(temperature=0.9, min_p=0.1)]
NS = 20_000
VV = 8


def _chi2_same(samples: torch.Tensor, probs: torch.Tensor):
    counts = torch.bincount(samples, minlength=VV).double()
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "a token the target's processed distribution excludes was emitted"
    exp = probs[support].double() * n
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    df = int(support.sum()) - 1
    if df > 0:
        assert chi2 < CHI2_999[df], (chi2, df, counts.tolist(), (probs * n).tolist())
    tv = 0.5 * float((counts / n - probs.double()).abs().sum())
    assert tv < 0.02, tv


@pytest.mark.parametrize("sampled_drafts", [False, True], ids=["sample_and_compare", "p_over_q"])
@pytest.mark.parametrize("si", range(len(SAMPLINGS)))
def test_verify_distribution_equals_target(sampled_drafts, si):
    sampling = SAMPLINGS[si]
    g = torch.Generator().manual_seed(1000 + si)
    k = 2
    t_logits = torch.randn(1, k + 1, VV, generator=g) * 1.5
    p = process_logits(t_logits[0], sampling)  # [k+1, V]
    gen = torch.Generator().manual_seed(7)
    if sampled_drafts:  # drafts drawn from q (a different model's processed distribution), as a drafter would
        q1 = process_logits(torch.randn(1, VV, generator=g) * 1.5, sampling)[0]
        q2 = process_logits(torch.randn(1, VV, generator=g) * 1.5, sampling)[0]
        d1 = torch.multinomial(q1, NS, replacement=True, generator=gen)
        d2 = torch.multinomial(q2, NS, replacement=True, generator=gen)
        draft = torch.stack([d1, d2], 1)
        probs = torch.stack([q1, q2])[None].expand(NS, k, VV)
    else:  # a fixed deterministic draft: the target's 2nd most likely token, then its most likely one
        d = torch.tensor([int(p[0].argsort(descending=True)[1]), int(p[1].argmax())])
        draft, probs = d[None].expand(NS, k), None
    verdict = verify(draft, probs, t_logits.expand(NS, k + 1, VV), sampling, gen)
    first = verdict.tokens[:, 0]
    _chi2_same(first, p[0])
    # given the first token was accepted (== d1), the second one is distributed as p_1
    acc = verdict.n_accepted >= 1
    assert torch.equal(acc, first == draft[:, 0])
    if sampled_drafts:  # condition on one draft value so p_1 is the right reference
        d1v = int(torch.mode(draft[acc, 0]).values)
        acc = acc & (draft[:, 0] == d1v)
    assert int(acc.sum()) > 2000
    _chi2_same(verdict.tokens[acc, 1], p[1])
    assert (verdict.tokens[torch.arange(NS), verdict.n_accepted] >= 0).all()
    assert (verdict.n_accepted < k).logical_or(verdict.tokens[:, k] >= 0).all()


def test_verify_greedy_terms():
    logits = torch.full((1, 4, 5), -1.0)
    logits[0, 0, 2] = logits[0, 1, 3] = logits[0, 2, 1] = logits[0, 3, 4] = 1.0  # argmax rows: 2, 3, 1, 4
    g = SamplingParams()
    v = verify(torch.tensor([[2, 3, 0]]), None, logits, g)  # 2 accepted, 0 rejected -> recovered 1
    assert v.n_accepted.tolist() == [2] and v.tokens.tolist() == [[2, 3, 1, -1]]
    v = verify(torch.tensor([[2, 3, 1]]), None, logits, g)  # all accepted -> bonus 4
    assert v.n_accepted.tolist() == [3] and v.tokens.tolist() == [[2, 3, 1, 4]]
    v = verify(torch.zeros(1, 0, dtype=torch.long), None, logits[:, :1], g)  # no draft: the plain step
    assert v.tokens.tolist() == [[2]]


def second_token_marginal(target, prompt: list[int], sampling: SamplingParams) -> torch.Tensor:
    """The target's exact distribution of the 2nd generated token, sum_t1 p(t1) p(. | t1) [V]."""
    plain = Engine(target, max_len=64)
    p1 = process_logits(plain.prefill(0, prompt).logits[:, -1], sampling)[0]
    marg = torch.zeros(V)
    for t1 in range(V):
        if p1[t1] > 0:
            marg += p1[t1] * process_logits(plain.prefill(0, prompt + [t1]).logits[:, -1], sampling)[0]
    return marg


def assert_matches_marginal(samples: torch.Tensor, marg: torch.Tensor) -> None:
    """Chi-square of sampled token ids against `marg` at alpha = 1e-3; nothing outside its support."""
    counts = torch.bincount(samples, minlength=V).double()
    support = marg > 1e-12
    assert counts[~support].sum() == 0
    exp = marg[support].double() * len(samples)
    chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
    assert chi2 < {4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59, 11: 31.26, 12: 32.91,
                   13: 34.53, 14: 36.12, 15: 37.70}[int(support.sum()) - 1], chi2


@pytest.mark.parametrize("method", ["mtp", "mtp_sample", "draft", "draft_sample"])
def test_end_to_end_sampling_matches_target_distribution(setup, method):
    """The 2nd generated token (the first one a verify round emits) of sampled speculative runs is distributed as
    the target's exact 2nd-token marginal sum_t1 p(t1) p(. | t1); chi-square at alpha = 1e-3."""
    target, prompts, _ = setup
    sp = dict(temperature=1.0, top_k=5, max_tokens=4, ignore_eos=True)
    prompt = prompts[1]
    marg = second_token_marginal(target, prompt, SamplingParams(**sp))
    if method.startswith("mtp"):
        eng = Engine(target, max_len=64, drafter=MTPAssistantDrafter(tiny_assistant(), target),
                     spec=SpecConfig(method=method, n_max=2))
    else:  # a draft model that is not the target: p != q, so p/q rejection really rejects
        eng = draft_engine(target, noisy_copy(target, scale=1.0), method, n_max=2)
    n = 400
    seconds = torch.tensor([eng.complete(prompt, SamplingParams(**sp, seed=s))[0][1] for s in range(n)])
    assert_matches_marginal(seconds, marg)


def test_stats_line_and_merge():
    a, b = SpecStats(), SpecStats()
    a.record(3, 2)
    a.record(3, 0)
    b.record(2, 2)
    b.record(0, 0)
    m = a + b
    assert (m.drafts, m.drafted, m.accepted, m.rounds, m.emitted) == (3, 8, 4, 4, 8)
    assert m.acceptance_by_position == [2 / 3, 2 / 3, 0.0]
    assert m.line() == "draft acceptance = 0.50 (4 accepted / 8 generated), mean len = 2.3"


@pytest.mark.parametrize("centroids", [False, True], ids=["tied_head", "centroid_head"])
def test_greedy_equals_plain_with_packed_weights(setup, centroids):
    """Target and drafter packed by tandem.kernels.prepare (batch-invariant kernels): the k+1-row verify forward
    gives the plain 1-row results, so greedy speculation still equals plain decoding exactly."""
    from tandem import kernels
    _, prompts, _ = setup
    target = kernels.prepare(tiny_target(), "bf16")
    drafter = MTPAssistantDrafter(kernels.prepare(tiny_assistant(centroids=centroids), "bf16"), target)
    plain = Engine(target, max_len=64)
    eng = Engine(target, max_len=64, drafter=drafter, spec=SpecConfig(n_max=3))
    greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True)
    total = SpecStats()
    for p in prompts[:15]:
        got, fin = eng.complete(p, greedy)
        assert got == plain.complete(p, greedy)[0], p
        total.merge(fin.stats.spec)
    assert total.drafts > 0


def test_context_full_and_budget_edges(setup):
    """Drafts are capped by the context (k <= max_len - n - 1) and the token budget; output still equals plain."""
    target, prompts, _ = setup
    for max_len, max_tokens in ((16, 100), (40, 3), (40, 1)):
        plain = Engine(target, max_len=max_len)
        eng = draft_engine(target, noisy_copy(target), max_len=max_len, n_max=5)
        for p in prompts[:8]:
            if len(p) >= max_len:
                continue
            sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
            want, fin_p = plain.complete(p, sp)
            got, fin = eng.complete(p, sp)
            assert got == want and fin.reason == fin_p.reason
            assert eng.cache.lengths[0] <= max_len


def test_trace_ndjson(setup, tmp_path, monkeypatch):
    """TANDEM_TRACE=FILE: one JSON line per draft and per verification, consistent with the stats."""
    import json

    from tandem.spec import set_tracer
    target, prompts, ref = setup
    path = tmp_path / "trace.ndjson"
    set_tracer(None)
    monkeypatch.setenv("TANDEM_TRACE", str(path))
    try:
        eng = draft_engine(target, noisy_copy(target))
        toks, fin = eng.complete(prompts[0], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
                                 request_id="req-7")
    finally:
        monkeypatch.delenv("TANDEM_TRACE")
        set_tracer(None)
    ev = [json.loads(line) for line in path.read_text().splitlines()]
    drafts = [e for e in ev if e["event"] == "draft"]
    verifs = [e for e in ev if e["event"] == "verify"]
    assert len(drafts) == len(verifs) == fin.stats.spec.rounds
    assert all(e["req"] == "req-7" for e in ev)
    assert [e["round"] for e in verifs] == list(range(len(verifs)))
    assert sum(e["accepted"] for e in verifs) == fin.stats.spec.accepted
    for d, v in zip(drafts, verifs):
        assert d["pos"] == v["pos"] and len(d["tokens"]) == v["n_draft"] and v["tokens"][:v["accepted"]] == \
            d["tokens"][:v["accepted"]] and "ms" in d and "ms" in v
    emitted = [t for v in verifs for t in v["tokens"]]
    assert toks[1:] == emitted[:len(toks) - 1]
