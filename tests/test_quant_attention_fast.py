"""Fused quantized-KV attention (csrc/quant_attention.cpp) and write-side quantizer (csrc/kv_quantize.cpp).

- The quantizer (and KVCache.write through it) gives the torch path's codes and scales.
- Attention equals attend_chunked and dequantize-then-reference attention within fp32 rounding, for every format,
  mixed K/V types, sliding windows, softcap, GQA, slots, padding rows, and head dims on both dequant paths.
- Row invariance: a query row is bitwise the same alone (decode), in a verify block, in a prefill block (the other
  work split) and in a batch, for 1 and 2 threads.
- Without the extension, attend_quant / quantize are the torch paths exactly.
"""

import pytest
import torch

from tandem.kernels import attend_reference
from tandem.kernels import quant_attention as qa
from tandem.kernels._ext import ext
from tandem.kvcache import KVCache

QTYPES = ["q8_0", "turbo4", "turbo3", "turbo2"]
needs_ext = pytest.mark.skipif(ext() is None, reason="fast CPU kernels unavailable on this machine")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cache(k_type, v_type, h=2, d=64, dv=None, n=300, slots=3, max_len=320, seed=0):
    """KVCache with entries 0..n-1 of every slot filled with random K/V (one layer)."""
    dv = dv or d
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(slots, n, h, d, generator=g)
    v = torch.randn(slots, n, h, dv, generator=g)
    c = KVCache({0: (h, d, dv)}, slots, max_len, k_type=k_type, v_type=v_type)
    c.write(0, torch.arange(slots), torch.arange(n)[None].repeat(slots, 1), k, v)
    return c


def _dequantized(buf, slots):
    if isinstance(buf, qa.QuantBuffer):
        return buf.dequantized(torch.arange(slots), 0, buf.max_len)
    return buf.float()


@needs_ext
@pytest.mark.parametrize("t", QTYPES)
@pytest.mark.parametrize("d", [16, 24, 64, 96, 256])
def test_quantize_matches_torch(t, d):
    x = torch.randn(400, d, generator=torch.Generator().manual_seed(d)) * 3
    c, s = qa.quantize(x, qa.FORMATS[t])
    rc, rs = qa.quantize_torch(x, qa.FORMATS[t])
    assert c.dtype == rc.dtype and s.dtype == rs.dtype and c.shape == rc.shape and s.shape == rs.shape
    assert torch.equal(c, rc) and torch.equal(s, rs)


@needs_ext
def test_store_matches_torch_write(monkeypatch):
    """KVCache.write through kv_store (one C++ call) == the torch quantize + index_put path, padding included."""
    g = torch.Generator().manual_seed(4)
    k, v = torch.randn(2, 6, 2, 64, generator=g), torch.randn(2, 6, 2, 32, generator=g)
    pos = torch.tensor([[3, 4, 5, 6, 7, -1], [10, 11, 12, 13, 14, 15]])
    caches = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(qa, "ext", lambda: None)
        c = KVCache({0: (2, 64, 32)}, 3, 32, k_type="turbo3", v_type="q8_0")
        c.write(0, torch.tensor([2, 0]), pos, k, v)
        caches.append(c)
    for side in ("k", "v"):
        a, b = getattr(caches[0], side)[0], getattr(caches[1], side)[0]
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales)


@needs_ext
@pytest.mark.parametrize("kv", [(t, t) for t in QTYPES] + [("bf16", "turbo3"), ("q8_0", "f16"), ("turbo4", "f32")])
@pytest.mark.parametrize("T", [1, 5, 40])
def test_matches_chunked_and_dequantized_reference(kv, T):
    c = _cache(*kv)
    g = torch.Generator().manual_seed(T)
    q = torch.randn(2, T, 4, 64, generator=g)
    qpos = torch.stack([torch.arange(299 - T, 299), torch.arange(3, 3 + T)])
    qpos[0, -1] = -1  # padding row: sees entry 0 only
    slots = torch.tensor([2, 0])
    kd, vd = _dequantized(c.k[0], 3), _dequantized(c.v[0], 3)
    for window in (None, 17):
        for cap in (None, 5.0):
            out = c.attend(0, q, slots, qpos, window, 0.2, cap)
            chunked = qa.attend_chunked(q, c.k[0], c.v[0], slots, qpos, window, 0.2, cap)
            ref = attend_reference(q, kd, vd, slots, qpos, window, 0.2, cap)
            assert out.shape == ref.shape and out.dtype == q.dtype
            assert (out - chunked).abs().max() < 5e-6, (window, cap)
            assert (out - ref).abs().max() < 5e-6, (window, cap)


@needs_ext
@pytest.mark.parametrize("d", [16, 96, 128, 512])
@pytest.mark.parametrize("t", QTYPES)
def test_head_dims_both_dequant_paths(t, d):
    """d % 128 == 0 reads codes straight from the packed bytes; other head dims unpack to bytes first."""
    c = _cache(t, t, h=1, d=d, n=100, slots=1, max_len=128)
    q = torch.randn(1, 3, 2, d, generator=torch.Generator().manual_seed(1))
    qpos = torch.tensor([[40, 70, 99]])
    slots = torch.tensor([0])
    out = c.attend(0, q, slots, qpos, None, d ** -0.5)
    ref = attend_reference(q, _dequantized(c.k[0], 1), _dequantized(c.v[0], 1), slots, qpos, None, d ** -0.5)
    assert (out - ref).abs().max() < 5e-6


@needs_ext
@pytest.mark.parametrize("t", QTYPES + ["bf16:q8_0"])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_invariance(t, threads):
    """Each row alone == the row inside a verify block (T <= 16), a prefill block (T = 40) and a batch."""
    kt, _, vt = t.partition(":")
    c = _cache(kt, vt or kt, n=700, max_len=704)
    torch.set_num_threads(threads)
    try:
        for T in (4, 40):
            q = torch.randn(2, T, 4, 64, generator=torch.Generator().manual_seed(T))
            qpos = torch.stack([torch.arange(650 - T, 650), torch.arange(20, 20 + T)])
            slots = torch.tensor([1, 2])
            for window in (None, 100):
                block = c.attend(0, q, slots, qpos, window, 0.2, 30.0)
                for b in range(2):
                    for i in range(T):
                        one = c.attend(0, q[b:b + 1, i:i + 1], slots[b:b + 1], qpos[b:b + 1, i:i + 1], window, 0.2,
                                       30.0)
                        assert torch.equal(one[0, 0], block[b, i]), (T, window, b, i)
    finally:
        torch.set_num_threads(1)


def test_fallback_without_extension(monkeypatch):
    c = _cache("turbo3", "q8_0", n=100, max_len=128)
    q = torch.randn(2, 3, 4, 64)
    qpos = torch.tensor([[50, 51, 52], [97, 98, 99]])
    want = qa.attend_chunked(q, c.k[0], c.v[0], torch.tensor([0, 1]), qpos, 9, 0.2)
    x = torch.randn(5, 64)
    monkeypatch.setattr(qa, "ext", lambda: None)
    assert torch.equal(c.attend(0, q, torch.tensor([0, 1]), qpos, 9, 0.2), want)
    for t in QTYPES:
        got, ref = qa.quantize(x, qa.FORMATS[t]), qa.quantize_torch(x, qa.FORMATS[t])
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
