"""`tandem bench --kv-quality` pieces on a tiny random target: the chunked scorer equals one full forward, and the
greedy-output comparison counts what it says."""

import math

import torch

from tandem.bench.kv_quality import PIECE, _compare, score
from tandem.engine import Engine
from tandem.kvcache import KVCache
from tests.test_spec_lossless import V, tiny_target


def test_score_matches_one_forward_and_q8_agrees():
    target = tiny_target()
    g = torch.Generator().manual_seed(0)
    chunk = torch.randint(0, V, (PIECE + 40,), generator=g).tolist()  # spans two pieces
    eng = Engine(target, max_len=256)
    nll, top = score(eng, chunk)
    with torch.inference_mode():
        c = KVCache(target.kv_specs(), 1, 256, torch.float32)
        logits = target(torch.tensor([chunk]), torch.arange(len(chunk))[None], c, torch.tensor([0])).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(chunk[1:]), reduction="none")
    assert nll.shape == (len(chunk) - 1,) and top.shape == (len(chunk) - 1,)
    assert math.isclose(float(nll.mean()), float(ref.mean()), rel_tol=2e-2)
    eng.cache = KVCache(target.kv_specs(), 1, 256, k_type="q8_0", v_type="q8_0")
    nll8, top8 = score(eng, chunk)
    assert float((top8 == top).float().mean()) >= 0.9
    assert abs(float(nll8.mean()) - float(nll.mean())) < 0.05


def test_compare_counts_identical_outputs_and_prefixes():
    base = [[1, 2, 3, 4], [5, 6, 7, 8]]
    r = _compare([[1, 2, 3, 4], [5, 6, 0, 8]], base)
    assert r["greedy_identical"] == "1/2"
    assert r["greedy_prefix_share"] == round((1.0 + 0.5) / 2, 4)
