"""The embedded gemma-3-270m loaded by us matches transformers loading the same GGUF: weights and greedy tokens."""

import pytest
import torch

from tandem.kvcache import KVCache

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "<start_of_turn>user\nWhat is 17 * 23?<end_of_turn>\n<start_of_turn>model\n",
    "Die Hauptstadt von Deutschland ist",
]
N_NEW = 64


@pytest.fixture(scope="module")
def ours():
    from tandem.loading import load
    return load("gemma-3-270m")


@pytest.fixture(scope="module")
def theirs(ours):
    import os

    from transformers import AutoModelForCausalLM
    d, name = os.path.split(ours.path)
    m = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    return m.eval()


def test_config_and_tie(ours):
    cfg = ours.config
    assert cfg["model_type"] == "gemma3_text"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["vocab_size"]) == (640, 18, 4, 1, 256, 262144)
    assert cfg["tie_word_embeddings"] is True
    assert cfg["layer_types"].count("full_attention") == 3
    m = ours.model
    assert m.lm_head.weight is m.model.embed_tokens.weight
    from tandem.loading.gguf import GGUFFile
    info = GGUFFile(ours.path).tensor_info()
    assert "output.weight" not in info
    assert info["token_embd.weight"] == ("Q8_0", (262144, 640))


def test_config_matches_transformers(ours, theirs):
    ref = theirs.config
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "sliding_window", "query_pre_attn_scalar", "layer_types", "vocab_size",
              "max_position_embeddings", "final_logit_softcapping", "attn_logit_softcapping", "tie_word_embeddings"):
        assert ours.config[k] == getattr(ref, k), k
    assert abs(ours.config["rms_norm_eps"] - ref.rms_norm_eps) < 1e-12
    for lt in ("full_attention", "sliding_attention"):
        assert ours.model.args.rope(lt) == (ref.rope_parameters[lt]["rope_theta"], 1.0), lt


def test_weights_equal_transformers(ours, theirs):
    mine = ours.model.state_dict()
    ref = theirs.state_dict()
    assert set(mine) == set(ref)
    for k, v in ref.items():
        assert mine[k].dtype == torch.float32
        assert torch.equal(mine[k], v), k


def _greedy(model, prompt_ids, n):
    cache = KVCache(model.kv_specs(), n_slots=1, max_len=len(prompt_ids) + n + 1)
    toks = torch.tensor([prompt_ids])
    pos = torch.arange(len(prompt_ids))[None]
    out = []
    with torch.inference_mode():
        logits = model(toks, pos, cache, logit_rows=slice(-1, None)).logits
        for i in range(n):
            nxt = int(logits[0, -1].argmax())
            out.append(nxt)
            p = len(prompt_ids) + i
            logits = model(torch.tensor([[nxt]]), torch.tensor([[p]]), cache).logits
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_matches_transformers(ours, theirs, prompt):
    ids = ours.tokenizer.encode(prompt)
    with torch.inference_mode():
        ref = theirs.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=N_NEW)[0, len(ids):].tolist()
    mine = _greedy(ours.model, ids, N_NEW)
    # transformers stops at its eos (id 1) and pads; compare what it generated
    assert len(ref) == N_NEW or ref[-1] in ours.tokenizer.eos_ids
    assert mine[:len(ref)] == ref
