"""--fit: the context and slots chosen from the free memory (tandem.engine.memory.fit), and the engine it builds."""

import logging

import pytest

from tandem.engine import memory
from tandem.errors import ConfigError

MB = 1 << 20


def kv(per_tok: int, per_slot: int = 0):
    return lambda slots, ctx: slots * (per_slot + per_tok * ctx)


def test_fit_keeps_the_caps_when_they_fit():
    f = memory.fit(kv(1000), max_len=4096, n_slots=4, free=1000 * MB)
    assert (f.max_len, f.n_slots) == (4096, 4) and f.cache_bytes == 4 * 4096 * 1000


def test_fit_lowers_slots_then_context():
    free = 100 * MB
    budget = int(free * (1 - memory.FIT_RESERVE))
    f = memory.fit(kv(10_000, per_slot=MB), max_len=4096, n_slots=8, free=free)
    assert f.max_len == 4096 and f.n_slots == budget // (MB + 10_000 * 4096) and f.cache_bytes <= budget
    g = memory.fit(kv(100_000, per_slot=MB), max_len=32768, n_slots=4, free=free)
    assert g.n_slots == 1 and g.max_len % memory.MIN_FIT_CTX == 0 and g.cache_bytes <= budget
    assert g.max_len == (budget - MB) // 100_000 // 256 * 256
    assert "context" in g.describe() and "1 slot " in g.describe()


def test_fit_refuses_a_machine_too_small():
    with pytest.raises(ConfigError, match="--fit: .* MiB free .* 256-token context needs"):
        memory.fit(kv(1 << 20), max_len=4096, n_slots=1, free=64 * MB)


def test_engine_fit_says_what_it_chose(tmp_path, caplog):
    from tandem.config import SpecConfig
    from tandem.engine.factory import load_engine
    from tests.test_loading import write_tiny_gguf
    p = tmp_path / "tiny.gguf"
    write_tiny_gguf(p)
    with caplog.at_level(logging.WARNING, logger="tandem.engine"):
        eng = load_engine(str(p), weight_format="q8_0", fit=True, max_len=1 << 20, n_slots=3,
                          spec=SpecConfig(enabled=False))
    assert eng.max_len == 256 and eng.cache.n_slots == 3  # the model's trained context caps it; memory is ample
    assert eng.fit.max_len == 256 and "--fit:" in caplog.text and "256 tokens x 3 slots" in caplog.text
    assert memory.report(eng)["kv_cache_bytes"] == eng.cache.total_bytes > 0
    assert memory.report(eng)["rss_after_load_bytes"] > 0
