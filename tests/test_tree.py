"""Draft trees: several candidate continuations verified in one target forward (tandem.engine.speculative).

- Row invariance with tree masks, bitwise: every node's logits in a tree forward == the logits of its path
  verified as a chain.
- T = 0: speculative output with trees == plain output, for every drafter kind, through Engine.generate and the
  batch scheduler (tree and chain requests in the same steps); the cache holds the accepted prefix after each round.
- T > 0: the joint distribution of the first two tokens a tree verification emits == the target's (chi-square).
"""

import pytest
import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine
from tandem.engine.batch import BatchScheduler
from tandem.kernels import prepare
from tandem.sampling import process_logits
from tandem.spec import DraftModelDrafter, MTPAssistantDrafter
from tandem.spec.chain import ChainDrafter
from tandem.spec.ngram import NgramDrafter
from tandem.spec.verify import verify_tree
from test_spec_lossless import V, noisy_copy, tiny_assistant, tiny_target

PROMPTS = [[(i * 7 + j * 3) % V for j in range(5 + i % 4)] for i in range(6)] + [[1, 2, 3, 1, 2, 3, 1, 2]]


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_tree_rows_bitwise_equal_their_chains(fmt):
    target = prepare(tiny_target(), fmt)  # row-invariant linears: a row's arithmetic does not depend on T
    eng = Engine(target, max_len=64, n_slots=2)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    for s in (0, 1):
        eng.prefill(s, prompt)
    n = len(prompt)
    #        x -> 5 -> 3 -> 5
    #          -> 7 -> 2
    #               -> 8 -> 1
    toks, parents = [5, 7, 3, 2, 8, 5, 1], [-1, -1, 0, 1, 1, 2, 4]
    (logits, hidden), = eng.forward_batch([0], [[9] + toks], [parents])
    for i in range(len(toks)):
        path = [i]
        while parents[path[-1]] >= 0:
            path.append(parents[path[-1]])
        chain = [9] + [toks[j] for j in reversed(path)]
        (cl, ch), = eng.forward_batch([1], [chain], [None])
        eng.cache.rollback(1, n)
        assert torch.equal(cl[-1], logits[i + 1]), f"node {i}"
        assert torch.equal(ch[-1], hidden[i + 1])
    assert torch.equal(cl[0], logits[0])


def _plain(target, prompts, max_tokens=12):
    eng = Engine(target, max_len=64)
    return [eng.complete(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))[0] for p in prompts]


def _drafters(target):
    return {"ngram": lambda: NgramDrafter(n_min=1, n_max=3),
            "assistant": lambda: MTPAssistantDrafter(tiny_assistant(), target),
            "draft-model": lambda: DraftModelDrafter(noisy_copy(target)),
            "chain": lambda: ChainDrafter({"ngram": NgramDrafter(n_min=1, n_max=3),
                                           "assistant": MTPAssistantDrafter(tiny_assistant(), target)})}


@pytest.mark.parametrize("kind", ["ngram", "assistant", "draft-model", "chain"])
def test_tree_greedy_equals_plain(kind):
    target = tiny_target()
    want = _plain(target, PROMPTS)
    eng = Engine(target, max_len=64, n_slots=3, drafter=_drafters(target)[kind](),
                 spec=SpecConfig(n_max=3, tree=8))
    trees = 0
    for p, w in zip(PROMPTS, want):
        toks, fin = eng.complete(p, SamplingParams(max_tokens=12, ignore_eos=True))
        assert toks == w
        trees += fin.stats.spec.trees
    assert trees > 0, "no round verified a tree"
    # the scheduler: tree and chain requests (and a plain one) in the same steps
    specs = [SpecConfig(n_max=3, tree=8), SpecConfig(n_max=2), SpecConfig(enabled=False)]
    with BatchScheduler(eng) as sch:
        hs = [sch.submit(p, SamplingParams(max_tokens=12, ignore_eos=True), specs[i % 3], loop=False)
              for i, p in enumerate(PROMPTS)]
        got = [[e.id for e in h if hasattr(e, "id") and e.id >= 0] for h in hs]
    assert got == want


def test_tree_sampling_joint_distribution():
    """Two tokens from one tree round: y1 ~ p0, and y2 ~ p_child(y1) when y1 is a drafted child (else the round
    ends at y1). Chi-square over the (y1, y2 | end) cells against the target's own joint distribution."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, V, generator=g) * 1.5
    toks, parents = [2, 5, 7], [-1, -1, 0]  # x -> 2 -> 7, x -> 5
    sampling = SamplingParams(temperature=0.8, top_k=10)
    p = process_logits(logits, sampling)
    n = 20000
    counts: dict[tuple[int, int], int] = {}
    for _ in range(n):
        path, out = verify_tree(toks, parents, logits, sampling, g)
        key = (out[0], out[1] if len(out) > 1 else -1)
        counts[key] = counts.get(key, 0) + 1
    expect = {}
    for y1 in range(V):
        child = {2: 0, 5: 1}.get(y1)
        if child is None:
            expect[(y1, -1)] = float(p[0, y1])
        else:
            for y2 in range(V):
                expect[(y1, y2)] = float(p[0, y1] * p[child + 1, y2])
    assert set(counts) <= {k for k, v in expect.items() if v > 0}
    cells = [k for k, v in expect.items() if v * n >= 5]
    chi2 = sum((counts.get(k, 0) - expect[k] * n) ** 2 / (expect[k] * n) for k in cells)
    df = len(cells) - 1  # alpha = 1e-3 critical value (Wilson-Hilferty; z_0.999 = 3.090)
    assert chi2 < df * (1 - 2 / (9 * df) + 3.090 * (2 / (9 * df)) ** 0.5) ** 3, (chi2, df)


def test_draft_model_tree_cache_follows_the_accepted_path():
    """A draft model drafting trees on its own cache: after every request its cache holds exactly the accepted
    tokens, bitwise the entries a fresh prefill of them writes (the accepted path compacted in place)."""
    from tandem.spec.drafter import PromptState

    target = prepare(tiny_target(), "fp32")
    draft = DraftModelDrafter(prepare(noisy_copy(target), "fp32"))
    eng = Engine(target, max_len=64, drafter=draft, spec=SpecConfig(n_max=3, tree=8))
    fresh = DraftModelDrafter(draft.model)
    fresh.make_cache(1, 64, k_type="f32", v_type="f32", device="cpu")
    trees = 0
    for p in PROMPTS:
        toks, fin = eng.complete(p, SamplingParams(max_tokens=13, ignore_eos=True))
        trees += fin.stats.spec.trees
        n = draft.cache.lengths[0]
        assert n <= len(p) + len(toks)
        fresh.begin(0, PromptState((p + toks)[:n], torch.zeros(1, 32), None))
        for i in draft.cache.k:
            for a, b in ((draft.cache.k[i], fresh.cache.k[i]), (draft.cache.v[i], fresh.cache.v[i])):
                assert torch.equal(a[0, :, :n], b[0, :, :n]), (p, i)
    assert trees > 0


@pytest.mark.slow
def test_nextn_tree_greedy_equals_plain(tmp_path):
    """The target's own MTP heads (kind nextn): their chain plus runner-up leaves, verified as a tree, through
    generate and the scheduler (tree and chain requests together) == plain decoding."""
    from tandem.loading import load
    from tandem.spec import load_drafter
    from tests.test_nextn import write_checkpoint

    write_checkpoint(tmp_path, "glm4_moe", 1)
    target = load(str(tmp_path), tokenizer=False).model.eval()
    eng = Engine(target, None, max_len=64, n_slots=3, drafter=load_drafter(None, target=target, weight_format="fp32"),
                 spec=SpecConfig(n_max=3, tree=8))
    g = torch.Generator().manual_seed(3)
    ps = [torch.randint(0, 128, (4 + i,), generator=g).tolist() for i in range(4)]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = [eng.complete(p, sp, spec=SpecConfig(enabled=False))[0] for p in ps]
    trees = 0
    for p, want in zip(ps, plain):
        toks, fin = eng.complete(p, sp)
        assert toks == want
        trees += fin.stats.spec.trees
    assert trees > 0
    with BatchScheduler(eng) as sch:
        hs = [sch.submit(p, sp, SpecConfig(n_max=3, tree=8) if i % 2 else SpecConfig(n_max=2), loop=False)
              for i, p in enumerate(ps)]
        assert [[e.id for e in h if hasattr(e, "id") and e.id >= 0] for h in hs] == plain
