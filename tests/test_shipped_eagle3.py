"""The EAGLE-3 heads we ship for the default model (Qwen2.5-Coder-1.5B-Instruct Q4_K_M) and the 0.5B: found by their
target's sha256, in the public layout vLLM and SGLang load, small enough for the repository; the default's, on the
real model (when it is in the cache: CI does not download it), lossless and accepting far more than chance."""

import json
from pathlib import Path

import pytest

from tandem.drafters import KNOWN, SHIPPED_DIR
from tandem.loading.default import DEFAULT, EMBEDDED, cache_dir
from tandem.loading.eagle3 import load_eagle3

NAME = "qwen2.5-coder-1.5b-instruct"
HEAD = SHIPPED_DIR / NAME


@pytest.mark.parametrize("name,layers,hidden", [(NAME, 28, 1536), ("qwen2.5-coder-0.5b-instruct", 24, 896)])
def test_shipped_head_is_known_for_its_target_and_loads(name, layers, hidden):
    d = SHIPPED_DIR / name
    assert EMBEDDED[name].sha256 in KNOWN[name]
    assert (d / "model.safetensors").stat().st_size <= 64_000_000
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["tandem"]["target"]["hidden_size"] == hidden
    head = load_eagle3(d, layers, hidden, 151936)  # the target's layers, hidden size, vocabulary
    assert head.aux_layers == (2, layers // 2, layers - 3) and head.args.draft_vocab_size == len(head.d2t)
    assert (d / "TRAINING.md").is_file()


def _default_gguf() -> Path | None:
    p = cache_dir() / EMBEDDED[DEFAULT].file
    return p if p.is_file() else None


@pytest.mark.slow
@pytest.mark.skipif(_default_gguf() is None, reason="the default model is not in the cache (CI does not fetch it)")
def test_default_chain_on_the_real_model_is_lossless_and_accepts():
    import dataclasses

    from tandem.chat import ChatEncoder, template_for
    from tandem.config import SamplingParams, SpecConfig
    from tandem.engine.factory import load_engine
    from tandem.spec.chain import member

    eng = load_engine(str(_default_gguf()), max_len=512, spec=SpecConfig(n_max=3, chain=("eagle3",)))
    assert member(eng.drafter, "eagle3").name == str(HEAD)
    chat = ChatEncoder(template_for(eng.loaded, eng.tokenizer), eng.tokenizer)
    greedy = SamplingParams(max_tokens=48)
    off = dataclasses.replace(eng.spec, enabled=False)
    accepted = drafted = 0
    for q in ("Write a Python function that reverses a linked list.", "What is the difference between TCP and UDP?"):
        prompt = chat.encode([{"role": "user", "content": q}])
        spec, fin = eng.complete(prompt, greedy)
        assert spec == eng.complete(prompt, greedy, spec=off)[0], q
        accepted, drafted = accepted + fin.stats.spec.accepted, drafted + fin.stats.spec.drafted
    assert drafted > 0 and accepted / drafted > 0.2, (accepted, drafted)  # chance: ~0 of 7680-way guesses
