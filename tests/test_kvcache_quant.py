"""Quantized KV cache (q8_0 and Hadamard-rotated turbo4/3/2): memory, accuracy, drafters that stay right, lossless.

- The field bug (a drafter reading a rotated-K cache with an unrotated q) is simulated and must break drafting;
  through KVCache.attend (the one reader path) drafts with every cache type match the bf16-cache drafts.
- Attention error vs fp32 is bounded and ordered int8 < turbo4 < turbo3 < turbo2; greedy int8 == bf16 mostly.
- Speculative decoding with a quantized cache == plain decoding with the same cache type, token for token.
- Per-row invariance of the quantized attention (decode row == same row inside a verify block / a batch).
"""

import pytest
import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine
from tandem.errors import ConfigError
from tandem.kernels import attend_reference
from tandem.kernels import quant_attention as qa
from tandem.kvcache import KVCache
from tandem.spec import MTPAssistantDrafter, SpecStats
from tests.test_spec_lossless import V, tiny_assistant, tiny_target

QTYPES = ["q8_0", "turbo4", "turbo3", "turbo2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny shapes: thread wake-ups cost more than the math on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _filled(specs, k_type, v_type, seed=0, n=200, slots=2, max_len=256):
    g = torch.Generator().manual_seed(seed)
    (h, dk, dv), = specs.values()
    k = torch.randn(slots, n, h, dk, generator=g)
    v = torch.randn(slots, n, h, dv, generator=g)
    c = KVCache(specs, slots, max_len, k_type=k_type, v_type=v_type)
    c.write(0, torch.arange(slots), torch.arange(n)[None].repeat(slots, 1), k, v)
    ref = KVCache(specs, slots, max_len, torch.float32)
    ref.write(0, torch.arange(slots), torch.arange(n)[None].repeat(slots, 1), k, v)
    return c, ref


def test_types_bytes_and_errors():
    specs = {0: (2, 256, 256), 3: (2, 256, 256)}
    want = {"f32": 1024, "bf16": 512, "f16": 512, "q8_0": 256 + 16, "turbo4": 128 + 16, "turbo3": 96 + 16,
            "turbo2": 64 + 16}
    for t, row in want.items():
        c = KVCache(specs, 1, 8, k_type=t, v_type=t)
        assert c.bytes_per_token == 2 * 2 * 2 * row, t
        assert c.total_bytes == c.bytes_per_token * (8 if t in ("f32", "bf16", "f16") else 32)
    mixed = KVCache(specs, 1, 8, k_type="q8_0", v_type="turbo3")
    assert mixed.bytes_per_token == 2 * 2 * (272 + 112)
    assert KVCache(specs, 1, 8, k_type="int8").k_type == "q8_0"
    with pytest.raises(ConfigError, match="turbo3"):
        KVCache(specs, 1, 8, k_type="q5_9")
    from tandem.engine.factory import check_cache_type
    with pytest.raises(ConfigError, match="q8_0"):
        check_cache_type("bogus")


def test_attention_error_ordered():
    specs = {0: (2, 64, 64)}
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 3, 4, 64, generator=g)
    qpos = torch.tensor([[150, 170, 199], [5, 99, 199]])
    errs = {}
    for t in QTYPES:
        c, ref = _filled(specs, t, t)
        for window in (None, 37):
            r = attend_reference(q, ref.k[0], ref.v[0], torch.arange(2), qpos, window, 0.3)
            o = c.attend(0, q, torch.arange(2), qpos, window, 0.3)
            errs[t, window] = float((o - r).norm() / r.norm())
    print({k: round(v, 4) for k, v in errs.items()})
    for w in (None, 37):
        e = [errs[t, w] for t in QTYPES]
        assert e == sorted(e) and e[0] < 0.02 and e[-1] < 0.6, e


def test_rotation_is_orthogonal_and_invisible_to_readers():
    for d in (16, 64, 96, 256):
        m = qa.rotation(d)
        torch.testing.assert_close(m @ m.T, torch.eye(d, dtype=torch.float64))
    # float math on a rotated cache: no quantization error left -> attention equals the unrotated one closely
    specs = {0: (1, 64, 64)}
    c, ref = _filled(specs, "turbo4", "turbo4", n=40)
    k, v = c.view(0, 0) if c.set_length(0, 40) is None else None
    rk, rv = ref.k[0][0, :, :40], ref.v[0][0, :, :40]
    assert float((k - rk).norm() / rk.norm()) < 0.15 and float((v - rv).norm() / rv.norm()) < 0.15


def test_field_bug_unrotated_q_breaks_attention():
    """The bug: the rotated keys read with an unrotated q. Massively wrong; through KVCache.attend it is right."""
    specs = {0: (2, 64, 64)}
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, 4, 64, generator=g) * 2
    qpos = torch.tensor([[199], [199]])
    slots = torch.arange(2)
    c, ref = _filled(specs, "turbo4", "turbo4")
    r = attend_reference(q, ref.k[0], ref.v[0], slots, qpos, None, 0.3)
    raw_k = c.k[0].chunk(torch.arange(2), 0, 256, torch.float32)  # stored (rotated) keys
    good_v = c.v[0].dequantized(torch.arange(2), 0, 256)
    bug = attend_reference(q, raw_k, good_v, slots, qpos, None, 0.3)
    ok = c.attend(0, q, slots, qpos, None, 0.3)
    e_bug, e_ok = float((bug - r).norm() / r.norm()), float((ok - r).norm() / r.norm())
    print(f"unrotated-q error {e_bug:.3f}, fixed {e_ok:.3f}")
    assert e_bug > 1.0 and e_ok < 0.35 and e_bug > 4 * e_ok


class _BuggyReader:
    """What the field drafter did: attend the target's rotated K with its own unrotated q (V read correctly)."""

    def __init__(self, cache):
        self.cache = cache

    def attend(self, layer, q, slots, q_pos, window, scale, softcap=None):
        kb, vb = self.cache.k[layer], self.cache.v[layer]
        n = self.cache.max_len
        k = kb.chunk(slots, 0, n, torch.float32) if isinstance(kb, qa.QuantBuffer) else kb.index_select(0, slots)
        v = vb.dequantized(slots, 0, n) if isinstance(vb, qa.QuantBuffer) else vb.index_select(0, slots)
        return attend_reference(q, k, v, torch.arange(len(slots)), q_pos, window, scale, softcap)


def _drafts(target, assistant, ids, k_type, v_type, buggy=False):
    """Fill the target cache over ids, then one assistant draft per position (teacher-forced): tokens [N-1]."""
    cache = KVCache(target.kv_specs(), 1, 64, k_type=k_type, v_type=v_type)
    n = len(ids)
    with torch.inference_mode():
        out = target(torch.tensor([ids]), torch.arange(n)[None], cache, torch.tensor([0]))
        x = torch.cat([target.embed(torch.tensor([ids[1:]])), out.hidden[:, :-1]], -1)
        reader = _BuggyReader(cache) if buggy else cache
        logits = assistant(x, torch.arange(1, n)[None], reader, torch.tensor([0])).logits
    return logits[0].argmax(-1)


@pytest.fixture(scope="module")
def pair():
    target = tiny_target()
    assistant = tiny_assistant().bind(target, "tiny", "tiny-assistant")
    g = torch.Generator().manual_seed(7)
    seqs = [torch.randint(0, V, (40,), generator=g).tolist() for _ in range(6)]
    base = [_drafts(target, assistant, s, "bf16", "bf16") for s in seqs]
    return target, assistant, seqs, base


@pytest.mark.parametrize("kv", [(t, t) for t in QTYPES] + [("turbo3", "q8_0"), ("q8_0", "turbo4")])
def test_drafts_match_bf16_cache(pair, kv):
    target, assistant, seqs, base = pair
    same = sum(int((_drafts(target, assistant, s, *kv) == b).sum()) for s, b in zip(seqs, base))
    total = sum(len(b) for b in base)
    print(f"{kv}: drafts equal to the bf16-cache drafts {same}/{total}")
    # tiny random models (head dim 16, V = 16, near-tied logits) amplify cache noise: floors well above the
    # unrotated-q field bug (~0.36 for turbo4) yet below what the 270m model shows
    floor = {"q8_0": 0.95, "turbo4": 0.6, "turbo3": 0.5, "turbo2": 0.33}
    assert same / total >= min(floor[kv[0]], floor[kv[1]])


def test_field_bug_drafts_differ_massively(pair):
    target, assistant, seqs, base = pair
    rates = {}
    for buggy in (False, True):
        same = sum(int((_drafts(target, assistant, s, "turbo4", "turbo4", buggy) == b).sum())
                   for s, b in zip(seqs, base))
        rates[buggy] = same / sum(len(b) for b in base)
    print(f"turbo4 drafts equal to bf16: fixed {rates[False]:.2f}, unrotated q {rates[True]:.2f}")
    assert rates[False] >= 0.6 and rates[True] < rates[False] - 0.2


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, V, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(20)]


def test_greedy_int8_vs_bf16_and_agreement(prompts):
    target = tiny_target()
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    ref = [Engine(target, max_len=64, cache_type_k="bf16", cache_type_v="bf16").complete(p, greedy)[0]
           for p in prompts]
    agree = {}
    for t in QTYPES:
        eng = Engine(target, max_len=64, cache_type_k=t, cache_type_v=t)
        outs = [eng.complete(p, greedy)[0] for p in prompts]
        agree[t] = (sum(o == r for o, r in zip(outs, ref)) / len(ref),
                    sum(a == b for o, r in zip(outs, ref) for a, b in zip(o, r)) / sum(map(len, ref)))
        if t == "q8_0":
            assert agree[t][0] >= 0.8
    # next-token agreement under teacher forcing: bf16 cache vs each type
    g = torch.Generator().manual_seed(5)
    seqs = torch.randint(0, V, (4, 48), generator=g)
    def argmaxes(t):
        c = KVCache(target.kv_specs(), 4, 64, k_type=t, v_type=t)
        with torch.inference_mode():
            return target(seqs, torch.arange(48)[None].repeat(4, 1), c, torch.arange(4)).logits.argmax(-1)
    base = argmaxes("bf16")
    nta = {t: float((argmaxes(t) == base).float().mean()) for t in QTYPES}
    print("greedy (whole-output, per-token) agreement with bf16:", agree, "next-token agreement:", nta)
    assert nta["q8_0"] >= 0.97 and nta["turbo4"] >= 0.75 and nta["turbo2"] >= 0.4


@pytest.mark.parametrize("t", ["q8_0", "turbo3"])
def test_spec_lossless_with_quantized_cache(prompts, t):
    target = tiny_target()
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    plain = Engine(target, max_len=64, cache_type_k=t, cache_type_v=t)
    eng = Engine(target, max_len=64, cache_type_k=t, cache_type_v=t,
                 drafter=MTPAssistantDrafter(tiny_assistant(), target), spec=SpecConfig(method="mtp", n_max=3))
    total = SpecStats()
    for p in prompts:
        got, fin = eng.complete(p, greedy)
        assert got == plain.complete(p, greedy)[0], p
        total.merge(fin.stats.spec)
    assert total.drafts > 0 and total.accepted > 0


def test_row_invariance_int8():
    """A query row's output is bitwise the same alone (decode), inside a verify block and in a batch."""
    specs = {0: (2, 64, 64)}
    c, _ = _filled(specs, "q8_0", "q8_0", n=300, max_len=320)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 5, 4, 64, generator=g)
    qpos = torch.tensor([[280, 281, 282, 283, 284], [10, 11, 12, 13, 14]])
    for window in (None, 17):
        block = c.attend(0, q, torch.arange(2), qpos, window, 0.2, 30.0)
        for b in range(2):
            for t in range(5):
                one = c.attend(0, q[b:b + 1, t:t + 1], torch.tensor([b]), qpos[b:b + 1, t:t + 1], window, 0.2, 30.0)
                assert torch.equal(one[0, 0], block[b, t]), (window, b, t)
