"""Prefix cache (issue 24): a conversation replayed through an engine with the prefix cache gives, turn by turn, the
tokens AND the cache contents (K/V, quantized codes, MLA latents, recurrent states) bitwise equal to an engine that
prefills everything from scratch, for every cache kind and drafter kind (drafts equal too: no stale drafter state);
eviction under a tiny budget recomputes; two slots sharing a prefix never see each other's later tokens; opt-out."""

import sys

import pytest
import torch

import tandem.engine.core as core_mod
import tandem.kvcache.prefix as prefix_mod
from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine, Token
from tandem.engine.batch import BatchScheduler
from tandem.kernels import prepare
from tandem.kvcache.prefix import PrefixCache
from tandem.spec import set_tracer
from tests.test_moe import needs_ext, randomize
from tests.test_row_invariance import make

pytest.importorskip("transformers")

BLOCK, GRID = 8, 16  # tiny blocks and prefill grid, so short prompts cross several of each
SP = SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True)
PLAIN = SpecConfig(enabled=False)


def tokens(n: int, seed: int, vocab: int = 64) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def pair(model, monkeypatch, drafters=(None, None), n_slots=2, mb=64, **kw):
    """(engine with the prefix cache, engine without); PREFILL_CHUNK = GRID for both."""
    monkeypatch.setattr(core_mod, "PREFILL_CHUNK", GRID)
    monkeypatch.setattr(prefix_mod, "BLOCK", BLOCK)
    cached = Engine(model, None, max_len=128, n_slots=n_slots, drafter=drafters[0], prefix_cache_mb=mb, **kw)
    fresh = Engine(model, None, max_len=128, n_slots=n_slots, drafter=drafters[1], **kw)
    assert fresh.prefix is None
    return cached, fresh


def converse(eng, turns, spec=PLAIN, **kw):
    """Each turn: the conversation so far + the turn's tokens; the answer is appended. -> (answers, cached_n,
    the draft rounds (pos, tokens))."""
    ctx, answers, cached, drafts = [], [], [], []
    set_tracer(lambda e: drafts.append((e["pos"], e["tokens"])) if e["event"] == "draft" else None)
    try:
        for t in turns:
            ctx = ctx + t
            toks, fin = eng.complete(ctx, SP, spec=spec, **kw)
            answers.append(toks)
            cached.append(fin.stats.cached_n)
            ctx = ctx + toks
    finally:
        set_tracer(None)
    return answers, cached, drafts


def assert_same_cache(a: Engine, b: Engine, slot: int = 0) -> None:
    n = a.cache.lengths[slot]
    assert n == b.cache.lengths[slot] and n > 0
    for x, y in zip(a.cache.export_rows(slot, 0, n), b.cache.export_rows(slot, 0, n), strict=True):
        assert torch.equal(x, y)
    if hasattr(a.cache, "recurrent"):
        for x, y in zip(a.cache.recurrent.snapshot(slot), b.cache.recurrent.snapshot(slot), strict=True):
            assert torch.equal(x, y)


TURNS = [tokens(21, 1), tokens(5, 2), tokens(12, 3), tokens(3, 4)]


def check_kind(model, monkeypatch, anywhere: bool, vocab: int = 64, **kw):
    cached, fresh = pair(model, monkeypatch, **kw)
    assert cached.prefix.anywhere == anywhere
    turns = [[t % vocab for t in turn] for turn in TURNS]
    got, hits, _ = converse(cached, turns)
    want, none, _ = converse(fresh, turns)
    assert got == want and not any(none)
    assert all(hits[1:]) and hits[0] == 0
    assert all(h % (BLOCK if anywhere else GRID) == 0 for h in hits)
    if anywhere:  # the previous turn's answer is reused too (decode rows == prefill rows)
        assert hits[1] > len(TURNS[0])
    assert_same_cache(cached, fresh)


def tiny(name: str, fmt: str = "q8_0"):
    return prepare(randomize(make(name, unaligned=False).eval()), fmt)


@needs_ext
@pytest.mark.parametrize("name,ctk,ctv", [("gemma3", "bf16", None), ("llama", "f32", None),
                                          ("gemma3", "q8_0", None), ("gemma3", "turbo3", "turbo4"),
                                          ("deepseek_v3", "bf16", None)])
def test_cached_equals_fresh(monkeypatch, name, ctk, ctv):
    """Full and sliding attention (gemma3: window 4, every position kept), quantized and rotated K/V, MLA latents."""
    check_kind(tiny(name), monkeypatch, anywhere=True, cache_type_k=ctk, cache_type_v=ctv)


@needs_ext
def test_gated_deltanet_restores_grid_snapshots(monkeypatch):
    """Qwen3.5: recurrent state snapshots at prefill-grid points, restored exactly (conv windows, delta states)."""
    check_kind(tiny("qwen3_5"), monkeypatch, anywhere=False, cache_type_k="bf16")


def test_row_variant_engine_uses_the_grid_only(monkeypatch):
    """Unprepared weights (rows vary with the forward's shape): prefixes end only on prefill-grid points."""
    check_kind(randomize(make("llama", unaligned=False).eval()), monkeypatch, anywhere=False, cache_type_k="f32")


def check_drafter(target, monkeypatch, make_drafter, spec, **kw):
    """Fixed draft lengths (adaptive ones follow measured timings: verify shapes would differ between runs)."""
    spec = SpecConfig(**{**spec.__dict__, "adaptive": False})
    cached, fresh = pair(target, monkeypatch, drafters=(make_drafter(), make_drafter()), **kw)
    plain, _, _ = converse(fresh, TURNS, PLAIN)
    got, hits, d_got = converse(cached, TURNS, spec)
    want, _, d_want = converse(fresh, TURNS, spec)  # last: fresh's cache then holds the same run as cached's
    assert got == want == plain and any(hits)
    assert d_got == d_want and any(t for _, t in d_got)  # every round drafted the same tokens
    assert_same_cache(cached, fresh)
    return cached


@needs_ext
def test_assistant_drafter(monkeypatch):
    """Gemma 4 assistant: reads the restored target K/V and the last prompt row's hidden state."""
    from transformers import Gemma4TextConfig

    from tandem.spec import MTPAssistantDrafter
    orig = Gemma4TextConfig.kv_sharing_modes  # as test_gemma4_assistant's patch: HF refuses an all-shared config
    monkeypatch.setattr(Gemma4TextConfig, "kv_sharing_modes", property(
        lambda c: ["reuse"] * c.num_hidden_layers if c.num_kv_shared_layers == c.num_hidden_layers else orig.fget(c)))
    from tests.test_gemma4_assistant import make_assistant, make_target
    target = prepare(make_target()[1], "fp32")
    assistant = make_assistant(False)[1]
    check_drafter(target, monkeypatch, lambda: MTPAssistantDrafter(assistant, target, "t", "a"),
                  SpecConfig(n_max=3))


@needs_ext
def test_draft_model_drafter(monkeypatch):
    """A draft model owns a cache: its begin() prefills the whole prompt into it (rebuilt, never stale)."""
    from tandem.spec import DraftModelDrafter
    target, draft = tiny("llama"), prepare(randomize(make("llama", unaligned=False).eval(), 1), "q8_0")
    check_drafter(target, monkeypatch, lambda: DraftModelDrafter(draft), SpecConfig(method="draft", n_max=3))


@pytest.mark.parametrize("fmt", ["fp32", None])
def test_nextn_drafter_gets_every_prompt_row(tmp_path, monkeypatch, fmt):
    """nextn heads read every prompt row's hidden state: the blocks carry the target's hidden rows and begin()
    rebuilds the heads' cache from them; prepared (anywhere) and unprepared (grid) targets."""
    from tandem.loading import load
    from tandem.spec import load_drafter
    from tests.test_nextn import write_checkpoint
    write_checkpoint(tmp_path, "glm4_moe", 1)
    target = load(str(tmp_path), tokenizer=False).model.eval()
    if fmt:
        prepare(target, fmt)
    eng = check_drafter(target, monkeypatch, lambda: load_drafter(None, target=target, weight_format="fp32"),
                        SpecConfig(n_max=3), cache_type_k="f32")
    assert eng.prefix.needs_hidden and eng.prefix.anywhere == bool(fmt)


@needs_ext
def test_eagle3_drafter(tmp_path, monkeypatch):
    """EAGLE-3 reads the target's aux rows (three layers' residual streams) of every prompt row: the blocks carry
    them and begin() rebuilds the head's own cache from them; drafts equal a fresh prefill's."""
    from tandem.models import llama
    from tandem.spec import load_drafter
    from tests.test_eagle3 import HF_CFG, V, _randomize, write_head
    target = prepare(_randomize(llama.Model(llama.ModelArgs.from_dict({**HF_CFG, "model_type": "llama"})), 0).eval(),
                     "q8_0")
    write_head(tmp_path / "head")
    make = lambda: load_drafter(str(tmp_path / "head"), target=target, mtp_weight_format="fp32")  # noqa: E731
    monkeypatch.setattr(sys.modules[__name__], "TURNS", [[t % V for t in turn] for turn in TURNS])
    eng = check_drafter(target, monkeypatch, make, SpecConfig(n_max=3))
    assert eng.prefix.needs_hidden and eng.prefix.anywhere


@needs_ext
def test_eviction_recomputes(monkeypatch):
    """A budget of a few blocks: LRU evicts (parents outlive children), bytes stay within it, and a prompt whose
    blocks were evicted is prefilled again with the same result."""
    model = tiny("gemma3")
    cached, fresh = pair(model, monkeypatch, mb=1)
    cached.prefix.budget = 5 * cached.cache.bytes_per_token * BLOCK
    prompts = [tokens(30, s) for s in range(4)] + [tokens(30, 0)]
    for p in prompts:
        a, fa = cached.complete(p, SP, spec=PLAIN)
        b, _ = fresh.complete(p, SP, spec=PLAIN)
        assert a == b
        assert cached.prefix.bytes <= cached.prefix.budget
        assert_same_cache(cached, fresh)
    st = cached.prefix.stats
    assert st.evictions > 0 and fa.stats.cached_n < 24  # prompt 0's blocks were evicted, then recomputed
    # every held block's parent is held too (a chain is evicted from its end)
    parents = {b.parent for b in cached.prefix.blocks.values()} - {b""}
    assert parents <= set(cached.prefix.blocks)


@needs_ext
def test_two_slots_sharing_a_prefix(monkeypatch):
    """Batch scheduler, 2 slots: requests sharing a 24-token prefix run together (one restored from the other's
    blocks); each equals its solo run from scratch and the slots' caches differ after the prefix."""
    model = tiny("gemma3")
    cached, fresh = pair(model, monkeypatch)
    base = tokens(24, 9)
    prompts = [base + tokens(5, 10), base + tokens(6, 11), base + tokens(5, 10)[:3]]
    solo = [fresh.complete(p, SP, spec=PLAIN)[0] for p in prompts]
    cached.complete(base + [1], SP, spec=PLAIN)  # leaves the shared prefix's blocks
    with BatchScheduler(cached) as sch:
        handles = [sch.submit(p, SP, PLAIN) for p in prompts]
        outs = [[e.id for e in h if isinstance(e, Token) and e.id >= 0] for h in handles]
    assert outs == solo
    assert cached.prefix.stats.hits >= 3


def test_opt_out_and_off(monkeypatch):
    """cache_prompt=False neither reuses nor stores; prefix_cache_mb=0 builds no cache."""
    model = randomize(make("llama", unaligned=False).eval())
    cached, _ = pair(model, monkeypatch)
    p = tokens(40, 5)
    _, fin = cached.complete(p, SP, spec=PLAIN, cache_prompt=False)
    assert fin.stats.cached_n == 0 and not cached.prefix.blocks and cached.prefix.stats.lookups == 0
    cached.complete(p, SP, spec=PLAIN)
    _, fin = cached.complete(p, SP, spec=PLAIN, cache_prompt=False)
    assert fin.stats.cached_n == 0
    _, fin = cached.complete(p, SP, spec=PLAIN)
    assert fin.stats.cached_n == 32
    with BatchScheduler(cached) as sch:
        fins = [e for e in sch.submit(p, SP, PLAIN, cache_prompt=False) if not isinstance(e, Token)]
    assert fins[-1].stats.cached_n == 0


def test_budget_and_grid_checks():
    cache = Engine(randomize(make("llama", unaligned=False).eval()), None, max_len=32).cache
    with pytest.raises(ValueError, match="multiple"):
        PrefixCache(cache, 1 << 20, exact=True, grid=20, block=8)
