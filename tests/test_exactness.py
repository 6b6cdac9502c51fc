"""Exact in every configuration that says so (issue #15 items 1, 5, 6): a target row is bitwise the same alone or
among other rows (the lossless-speculation guarantee) with fp32 weights, f16 caches, without the C++ extension,
for 17-row verifies (n_max 16) over quantized caches; Engine.exact reports it (False off CPU or unprepared);
token ids outside the vocabulary are refused before any kernel; the C++ kernels release the GIL."""

import threading
import time

import pytest
import torch

from tandem import kernels
from tandem.engine.core import Engine
from tandem.errors import RequestError
from tandem.kernels import _ext
from tandem.kernels.linear import PackedLinear
from tests.test_moe import needs_ext, randomize
from tests.test_row_invariance import assert_rows_invariant as rows_invariant, make

SLOTS = 8


@pytest.fixture
def no_ext(monkeypatch):
    """As TANDEM_NO_EXT=1 / a CPU without AVX-512: every kernel takes its torch path."""
    monkeypatch.setattr(_ext, "_state", {"tried": True, "mod": None, "why": "disabled by the test"})


def assert_rows_invariant(model, k_type: str, v_type: str | None = None, verify: int = 17) -> None:
    rows_invariant(model, k_type, v_type, verify=verify, n_slots=SLOTS, max_len=40)


def _model(name: str, fmt: str, unaligned: bool = False):
    return kernels.prepare(randomize(make(name, unaligned=unaligned).eval()), fmt)


@pytest.mark.parametrize("name", ["gemma3", "qwen3_moe", "gemma4_moe", "deepseek_v3"])
def test_fp32_weights_row_invariant(name):
    """--weight-format fp32: linears, routers, experts and MLA absorption in fixed-shape row blocks."""
    assert_rows_invariant(_model(name, "fp32", unaligned=True), "f32")


@needs_ext
@pytest.mark.parametrize("ctk,ctv", [("f16", "f16"), ("f16", "q8_0"), ("turbo3", "turbo3")])
def test_f16_and_quant_caches_row_invariant(ctk, ctv):
    """-ctk f16 goes through the fused kernel (it used to take the reference, whose key length is the batch's)."""
    assert_rows_invariant(_model("gemma3", "q8_0"), ctk, ctv)


@pytest.mark.parametrize("fmt,ctk,ctv", [("q8_0", "f32", None), ("bf16", "bf16", None), ("q8_0", "f16", None),
                                         ("fp32", "q8_0", "turbo4")])
def test_without_extension_row_invariant(no_ext, fmt, ctk, ctv):
    """TANDEM_NO_EXT=1 / no AVX-512: packed linears in fixed-shape blocks, attention through attend_chunked."""
    assert kernels._ext.ext() is None
    assert_rows_invariant(_model("gemma3", fmt), ctk, ctv)


@pytest.mark.parametrize("name", ["qwen3_moe", "deepseek_v3", "qwen3_5", "gemma4"])
def test_without_extension_families_row_invariant(no_ext, name):
    """MoE, MLA (latent cache through attend_chunked), Gated DeltaNet, Gemma 4 PLE / KV sharing."""
    assert_rows_invariant(_model(name, "bf16", unaligned=True), "f32", verify=4)


def test_chunked_attention_17_rows(no_ext):
    """n_max 16 verifies 17 rows: each of them == the same query alone (attend_chunked, quantized and f16 caches)."""
    g = torch.Generator().manual_seed(0)
    for fmt in ("q8_0", "turbo3", "f16"):
        cache = kernels_cache(fmt)
        q = torch.randn(1, 17, 4, 32, generator=g)
        pos = torch.arange(40, 57)[None]
        all_rows = cache.attend(0, q, torch.tensor([0]), pos, None, 0.2)
        for t in range(17):
            one = cache.attend(0, q[:, t:t + 1], torch.tensor([0]), pos[:, t:t + 1], None, 0.2)
            assert torch.equal(one[0, 0], all_rows[0, t]), (fmt, t)


def kernels_cache(fmt: str):
    from tandem.kvcache.cache import KVCache
    cache = KVCache({0: (2, 32, 32)}, 1, 70, k_type=fmt, v_type=fmt)
    g = torch.Generator().manual_seed(2)
    kv = torch.randn(1, 60, 2, 32, generator=g)
    cache.write(0, torch.tensor([0]), torch.arange(60)[None], kv, kv * 0.5)
    return cache


def _engine(model, **kw):
    return Engine(model, None, max_len=32, n_slots=1, **kw)


def test_engine_reports_exactness(no_ext):
    exact, why = _engine(_model("gemma3", "fp32")).exact
    assert exact and "fp32" in why and "unavailable" in why
    exact, why = _engine(randomize(make("gemma3", False).eval())).exact  # never prepared: plain torch linears
    assert not exact and "prepare" in why
    exact, why = kernels.exactness(_model("gemma3", "q8_0"), "cuda")
    assert not exact and "cuda" in why


def test_token_ids_out_of_range_are_refused():
    eng = _engine(_model("gemma3", "q8_0"))
    n = eng.vocab_size
    for bad in ([1, n], [-1], [2, 10 ** 12]):
        with pytest.raises(RequestError, match="outside the vocabulary"):
            eng.encode(bad)
        with pytest.raises(RequestError, match="outside the vocabulary"):
            eng.prefill(0, bad)
    with pytest.raises(RequestError, match="integers"):
        eng.encode([1, 2.5])
    assert eng.encode([0, n - 1]) == [0, n - 1]


@pytest.mark.parametrize("fmt", ["bf16", "q8_0", "fp32"])
def test_embedding_rows_out_of_range_raise(fmt):
    lin = PackedLinear.from_weight(torch.randn(100, 64), fmt)
    with pytest.raises(IndexError):
        lin.rows(torch.tensor([3, 100]))
    with pytest.raises(IndexError):
        lin.rows(torch.tensor([-1]))


@needs_ext
def test_cpp_rows_kernel_checks_bounds():
    """The C++ lookup itself refuses an id past the packed table (a TORCH_CHECK, not a wild read)."""
    lin = PackedLinear.from_weight(torch.randn(100, 64), "q8_0")
    with pytest.raises(RuntimeError, match="out of range"):
        _ext.ext().rows_q8_0(lin.q8, lin.d16, torch.tensor([10 ** 9]), 64)
    lin = PackedLinear.from_weight(torch.randn(100, 64), "bf16")
    with pytest.raises(RuntimeError, match="out of range"):
        _ext.ext().rows_bf16(lin.w_bf16, torch.tensor([-5]), 64)


@needs_ext
def test_cpp_kernels_release_the_gil():
    """While the main thread is inside one long C++ kernel call, a Python thread keeps running: its longest pause
    is a small part of the call (holding the GIL, the pause would be the whole call)."""
    lin = PackedLinear.from_weight(torch.randn(4096, 2048), "q8_0")
    x = torch.randn(512, 2048)
    state = {"measuring": False, "gap": 0.0, "stop": False}

    def watch():
        last = time.perf_counter()
        while not state["stop"]:
            now = time.perf_counter()
            if state["measuring"]:
                state["gap"] = max(state["gap"], now - last)
            last = now

    t = threading.Thread(target=watch)
    t.start()
    try:
        time.sleep(0.02)
        state["measuring"] = True
        t0 = time.perf_counter()
        _ext.ext().gemm_q8_0(x, lin.q8, lin.d16, 4096)
        elapsed = time.perf_counter() - t0
        state["measuring"] = False
    finally:
        state["stop"] = True
        t.join()
    assert elapsed > 0.05, f"the kernel call ({elapsed:.3f}s) was too short to show anything"
    assert state["gap"] < elapsed / 2, f"the other thread stalled {state['gap']:.3f}s of a {elapsed:.3f}s call"


def test_health_reports_exactness():
    """/health carries exact + exact_reason from the running engine (here the tiny fp32 target)."""
    from fastapi.testclient import TestClient

    from tandem.server.app import create_app
    with TestClient(create_app(_engine(_model("gemma3", "fp32")))) as client:
        h = client.get("/health").json()
    assert h["exact"] is True and "fp32" in h["exact_reason"]
