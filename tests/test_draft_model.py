"""Kind `draft-model`: built by load_drafter(path) from a directory holding a full model (kind from the model-type
table, not the method name), its cache sized by the engine, lossless against plain decoding; a vocabulary that
differs from the target's (size, token strings, special ids) is refused naming both and the first differing id."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel

from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine
from tandem.errors import ModelLoadError
from tandem.spec import KINDS, DraftModelDrafter, MTPAssistantDrafter, get_method, kind_of, load_drafter
from tandem.spec.draft_model import check_vocab
from tandem.spec.chain import member
from tandem.tokenizer import Tokenizer

V = 40


def save_tiny_gemma3(d, seed: int, vocab: int = V, layers: int = 2, words=None):
    """A tiny random Gemma 3 saved as an HF directory (transformers writes it), with a word-level tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           query_pre_attn_scalar=16, max_position_embeddings=128, bos_token_id=2, eos_token_id=1,
                           pad_token_id=0, layer_types=["sliding_attention", "full_attention"][:layers])
    torch.manual_seed(seed)
    m = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    m.save_pretrained(str(d))
    words = words or [f"w{i}" for i in range(vocab)]
    HFTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="w3")).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w2", "eos_token": "w1"}))
    return d


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    t = tmp_path_factory.mktemp("dm")
    return {name: save_tiny_gemma3(t / name, seed, **kw) for name, seed, kw in (
        ("target", 0, {}), ("other", 1, dict(layers=1)), ("vocab", 2, dict(vocab=V + 8)),
        ("words", 3, dict(words=[f"w{i}" for i in range(7)] + ["zz"] + [f"w{i}" for i in range(8, V)])))}


def _target(path):
    from tandem import loading
    return loading.load(str(path), dtype=torch.float32)


def test_load_drafter_builds_a_draft_model_from_a_full_model(dirs):
    tgt = _target(dirs["target"])
    d = load_drafter(str(dirs["other"]), target=tgt.model, target_loaded=tgt, weight_format="fp32")
    assert isinstance(d, DraftModelDrafter) and d.kind == "draft-model" and d.cache is None
    assert kind_of(d.model) is KINDS["draft-model"]
    assert get_method("auto").fits(d) and get_method("draft").fits(d) and not get_method("mtp").fits(d)
    eng = Engine(tgt.model, max_len=64, n_slots=2, drafter=d)  # the engine sizes the drafter's cache
    assert d.cache.n_slots == 2 and d.cache.max_len == 64
    plain = Engine(tgt.model, max_len=64)
    greedy = SamplingParams(max_tokens=20, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        p = torch.randint(4, V, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
        got, fin = eng.complete(p, greedy)
        assert got == plain.complete(p, greedy)[0]
    assert fin.stats.spec.drafts > 0
    # the same model as drafter is accepted in full
    same = load_drafter(str(dirs["target"]), target=tgt.model, target_loaded=tgt, weight_format="fp32")
    eng = Engine(tgt.model, max_len=64, drafter=same, spec=SpecConfig(method="draft", n_max=4))
    fin = eng.complete([5, 6, 7], greedy)[1]
    assert fin.stats.spec.drafted > 0 and fin.stats.spec.accepted == fin.stats.spec.drafted


def test_vocabulary_mismatch_is_refused_by_name(dirs):
    tgt = _target(dirs["target"])
    with pytest.raises(ModelLoadError, match=r"vocabulary size 48.*target .*target.* 40"):
        load_drafter(str(dirs["vocab"]), target=tgt.model, target_loaded=tgt, weight_format="fp32")
    with pytest.raises(ModelLoadError, match=r"first differing token id 7 \('zz' vs 'w7'\)"):
        load_drafter(str(dirs["words"]), target=tgt.model, target_loaded=tgt, weight_format="fp32")
    other = _target(dirs["other"])
    backend = HFTokenizer.from_file(str(dirs["target"] / "tokenizer.json"))
    with pytest.raises(ModelLoadError, match=r"special token eos_ids = \[2\].*\[1\]"):
        check_vocab(other.model, tgt.model, "d", "t", Tokenizer(backend, 2, [2]), tgt.tokenizer)


def test_an_assistant_is_not_a_draft_model():
    from test_spec_lossless import tiny_assistant, tiny_target
    target = tiny_target()
    d = KINDS[kind_of(tiny_assistant()).name].build(tiny_assistant(), target)
    assert isinstance(d, MTPAssistantDrafter) and d.kind == "assistant" and not get_method("draft").fits(d)


def test_recurrent_model_refused_as_draft_model():
    """Drafting k tokens is k forwards; a Gated DeltaNet cache rolls back only within one: refused at engine build."""
    from tandem.models import build
    from tests.test_qwen3_5 import BASE
    target = build({"model_type": "gemma3_text", "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
                    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                    "query_pre_attn_scalar": 16, "layer_types": ["full_attention"]}).eval()
    drafter = DraftModelDrafter(build({**BASE, "model_type": "qwen3_5_text"}).eval(), "target", "qwen3_5 tiny")
    with pytest.raises(ModelLoadError, match="qwen3_5 tiny.*rolls back only within one forward"):
        Engine(target, None, max_len=64, drafter=drafter)


def test_draft_weight_format_and_threads_are_the_draft_models_own(dirs):
    """--draft-weight-format bf16 under a q8_0 target, --draft-threads: spec == plain at T=0, the draft model runs
    on its threads and the engine's count is back after every draft call."""
    from tandem.engine.factory import load_engine
    prev = torch.get_num_threads()
    try:
        eng = load_engine(str(dirs["target"]), str(dirs["other"]), weight_format="q8_0", draft_weight_format="bf16",
                          threads=2, draft_threads=1, spec=SpecConfig(method="draft", n_max=4), max_len=64)
        d = member(eng.drafter, "draft-model")  # the default chain: ngram, then the draft model
        assert isinstance(d, DraftModelDrafter) and d.threads == 1
        assert d.model.kernel_format == "bf16" and eng.model.kernel_format == "q8_0"
        seen = []
        d.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        greedy = SamplingParams(max_tokens=16, ignore_eos=True)
        g = torch.Generator().manual_seed(1)
        for _ in range(4):
            p = torch.randint(4, V, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g).tolist()
            got, fin = eng.complete(p, greedy)
            assert torch.get_num_threads() == 2
            assert got == eng.complete(p, greedy, spec=SpecConfig(enabled=False))[0]
        assert fin.stats.spec.drafted > 0 and seen and set(seen) == {1}
    finally:
        torch.set_num_threads(prev)


def test_draft_flags_parse_and_are_checked(dirs):
    import argparse

    from tandem.engine.factory import load_engine
    from tandem.engine.options import EngineOptions, add_engine_args
    from tandem.errors import ConfigError
    p = argparse.ArgumentParser()
    add_engine_args(p)
    o = EngineOptions.from_args(p.parse_args(["--draft-model", "d", "--draft-weight-format", "q8_0",
                                              "--draft-threads", "3"]))
    assert (o.drafter, o.draft_weight_format, o.draft_threads) == ("d", "q8_0", 3)
    assert EngineOptions.from_args(p.parse_args([])).draft_weight_format is None
    with pytest.raises(ConfigError, match="--draft-weight-format 'q4' unknown"):
        EngineOptions(draft_weight_format="q4")
    with pytest.raises(ConfigError, match="--draft-threads must be >= 1"):
        EngineOptions(draft_threads=0)
    with pytest.raises(ConfigError, match="--draft-threads 1: sets a draft model's threads, but the drafter loaded"):
        load_engine(str(dirs["target"]), None, draft_threads=1, weight_format="fp32", max_len=64)


@pytest.mark.slow
def test_fidelity_pair_same_gguf_q8_0_drafts_a_bf16_target():
    """The README's example: a bf16 target drafted by its own GGUF in q8_0 loads (same vocabulary), equals plain
    decoding at T=0 and is accepted almost always (only the weight rounding differs)."""
    from test_smollm2 import smollm2_path

    from tandem.engine.factory import load_engine
    path = smollm2_path()
    eng = load_engine(path, path, weight_format="bf16", draft_weight_format="q8_0", max_len=256,
                      spec=SpecConfig(method="draft", n_max=4, adaptive=False))
    assert member(eng.drafter, "draft-model").model.kernel_format == "q8_0" and eng.model.kernel_format == "bf16"
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    drafted = accepted = 0
    for p in ("def fibonacci(n):", "The capital of France is", "Once upon a time"):
        got, fin = eng.complete(p, greedy)
        assert got == eng.complete(p, greedy, spec=SpecConfig(enabled=False))[0]
        drafted, accepted = drafted + fin.stats.spec.drafted, accepted + fin.stats.spec.accepted
    assert drafted > 20 and accepted >= 0.8 * drafted
