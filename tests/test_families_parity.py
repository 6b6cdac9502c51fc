"""Llama (llama3 RoPE), Mistral, Qwen2, Qwen3 and Qwen3-MoE parity against transformers (fp32, eager), tiny random
configs: (a) prefill, (b) token-by-token cached decode, (c) mixed chunks, (d) two batched slots with padding --
logits and final hidden vs HF's full forward. Windows (4) are smaller than the sequence (14) where a family has one.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tandem.models import build  # noqa: E402
from tests.parity import TOL, check, check_batched_slots, run_chunks  # noqa: E402,F401

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
CONFIGS = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_parameters=LLAMA3_ROPE, head_dim=32)),
    "llama_tied_bias": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True,
                                                                mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=4)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=4,
                                                      max_window_layers=1)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(head_dim=24, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                       norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe_sparse_step": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                              dict(num_experts=4, num_experts_per_tok=3, moe_intermediate_size=32,
                                   decoder_sparse_step=2, norm_topk_prob=False)),
}
N = 14


def make_pair(name):
    cfg_cls, model_cls, kw = CONFIGS[name]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **kw}, attn_implementation="eager")
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # O(1) activations, non-trivial norms and biases
        for pname, p in hf.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in pname else p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    ours = build(cfg.to_dict()).eval()
    ours.load_state_dict(ours.sanitize(hf.state_dict()), strict=True)
    return hf, ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf, ours = make_pair(request.param)
    prompts = torch.randint(0, BASE["vocab_size"], (2, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(prompts, output_hidden_states=True, use_cache=False)
    return ours, prompts, out.logits, out.hidden_states[-1]


@pytest.mark.parametrize("chunks", [[12], [1] * N, [7, 4, 1, 1, 1]], ids=["prefill12", "decode1", "mixed"])
def test_parity(pair, chunks):
    ours, prompts, ref_logits, ref_hidden = pair
    n = sum(chunks)
    logits, hidden = run_chunks(ours, prompts[0], chunks, slot=1)
    check(logits, hidden, ref_logits[:1, :n], ref_hidden[:1, :n])


def test_batched_slots_with_padding(pair):
    ours, prompts, ref_logits, ref_hidden = pair
    check_batched_slots(ours, prompts, ref_logits, ref_hidden, ours.make_cache(2, 32, k_type="f32"))


def test_embed_and_logit_rows(pair):
    ours, prompts, ref_logits, _ = pair
    with torch.no_grad():
        o = ours(prompts, torch.arange(N).repeat(2, 1), ours.make_cache(2, 32, k_type="f32"),
                 logit_rows=slice(-1, None))
    assert o.logits.shape == (2, 1, BASE["vocab_size"]) and o.hidden.shape == (2, N, BASE["hidden_size"])
    assert (o.logits - ref_logits[:, -1:]).abs().max() < TOL


def test_config_resolution():
    _, ours = make_pair("qwen2")
    assert ours.args.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert [layer.self_attn.window for layer in ours.model.layers] == [None, 4, 4]
    assert ours.model.layers[0].self_attn.q_proj.bias is not None and ours.model.layers[0].self_attn.o_proj.bias is None
    _, moe = make_pair("qwen3_moe_sparse_step")
    assert [type(layer.mlp).__name__ for layer in moe.model.layers] == ["GLUMLP", "SparseMoeBlock", "GLUMLP"]
    _, tied = make_pair("llama_tied_bias")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


def test_legacy_config_json_forms():
    """config.json as hub checkpoints write it (rope_scaling + top-level rope_theta, Qwen3-MoE's num_experts) builds
    the same model as the transformers 5 serialisation."""
    legacy = {**BASE, "model_type": "llama", "head_dim": 32, "rope_theta": 500_000.0,
              "rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}}
    new = transformers.LlamaConfig(**{**BASE, **CONFIGS["llama3"][2]}).to_dict()
    assert torch.equal(build(legacy)._inv_freq, build(new)._inv_freq)
    moe = build({**BASE, "model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
                 "moe_intermediate_size": 32})
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (4, 64, 64)
