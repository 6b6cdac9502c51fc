"""The drafter we ship for the embedded gemma-3-270m: found by the target's sha256 and on by default, lossless on the real
model, and accepting far more than chance (an untrained drafter accepts ~0 of 262k-way guesses)."""

import pytest

from tandem.bench.prompts import PROMPTS
from tandem.config import SamplingParams, SpecConfig
from tandem.spec.chain import member

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def eng():
    from tandem.engine.factory import load_engine
    return load_engine("gemma-3-270m", max_len=512, spec=SpecConfig(n_max=3))


def test_default_model_speculates_by_default(eng):
    from tandem.drafters import SHIPPED_DIR
    assert eng.drafter is not None and eng.spec.enabled
    assert member(eng.drafter, "assistant").names[1] == str(SHIPPED_DIR / "gemma-3-270m")


def test_shipped_drafter_is_lossless_and_accepts(eng):
    import dataclasses
    greedy = SamplingParams(max_tokens=40, ignore_eos=True)
    off = dataclasses.replace(eng.spec, enabled=False)
    accepted = drafted = 0
    for cat in ("code_python", "explain_concept", "stepwise_math"):
        prompt = PROMPTS[cat][0]
        spec, fin = eng.complete(prompt, greedy)
        plain, _ = eng.complete(prompt, greedy, spec=off)
        assert spec == plain, cat
        accepted, drafted = accepted + fin.stats.spec.accepted, drafted + fin.stats.spec.drafted
    assert drafted > 0 and accepted / drafted > 0.25, (accepted, drafted)
