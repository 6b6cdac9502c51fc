"""Gemma 4 text parity against transformers (fp32, eager) on tiny random configs.

Each config is checked for: (a) one prefill, (b) token-by-token cached decoding, (c) a mixed chunked forward,
(d) two slots batched (with padding and per-row positions) -- logits and final hidden vs HF's full forward.
The sliding window (4) is smaller than the sequence (14), so windowing is exercised everywhere.
"""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Gemma4Config, Gemma4ForCausalLM, Gemma4ForConditionalGeneration, Gemma4TextConfig  # noqa

from tandem.kvcache import KVCache
from tandem.models import build
from tandem.models.gemma4 import Model, ModelArgs
from tests.parity import TOL, check, check_batched_slots, run_chunks

S, F = "sliding_attention", "full_attention"
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=4, layer_types=[S, S, F, S, S, F],
            hidden_size_per_layer_input=0, vocab_size_per_layer_input=128, max_position_embeddings=64)
MOE = dict(enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32)
PLE_SHARED = dict(hidden_size_per_layer_input=8, num_kv_shared_layers=3, use_double_wide_mlp=True)
K_EQ_V = dict(attention_k_eq_v=True, num_global_key_value_heads=1, global_head_dim=32,
              rope_parameters={S: {"rope_type": "default", "rope_theta": 10_000.0},
                               F: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1_000_000.0}})
CONFIGS = {
    "dense": dict(global_head_dim=16),
    "moe": MOE,
    "ple_kv_shared": PLE_SHARED,
    "k_eq_v": K_EQ_V,
    "softcap_everything": dict(final_logit_softcapping=2.0, **MOE, **PLE_SHARED, **K_EQ_V),
}
N = 14


def make_hf(**kw) -> Gemma4ForCausalLM:
    cfg = Gemma4TextConfig(**{**BASE, **kw}, attn_implementation="eager")
    torch.manual_seed(0)
    hf = Gemma4ForCausalLM(cfg).eval()
    with torch.no_grad():  # O(1) activations and non-trivial norm / router / layer scales
        for _, p in hf.named_parameters():
            p.uniform_(0.5, 1.5) if p.dim() == 1 else p.normal_(0.0, p.shape[-1] ** -0.5)
        for name, b in hf.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return hf


def make_ours(hf) -> Model:
    ours = Model(ModelArgs.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(ours.sanitize(hf.state_dict()), strict=True)
    return ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    torch.manual_seed(0)
    hf = make_hf(**CONFIGS[request.param])
    ours = make_ours(hf)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, BASE["vocab_size"], (2, N), generator=g)
    with torch.no_grad():
        out = hf(prompts, output_hidden_states=True, use_cache=False)
    return hf, ours, prompts, out.logits, out.hidden_states[-1]


@pytest.mark.parametrize("chunks", [[12], [1] * N, [7, 4, 1, 1, 1]], ids=["prefill12", "decode1", "mixed"])
def test_parity(pair, chunks):
    hf, ours, prompts, ref_logits, ref_hidden = pair
    n = sum(chunks)
    logits, hidden = run_chunks(ours, prompts[0], chunks, slot=1)
    check(logits, hidden, ref_logits[:1, :n], ref_hidden[:1, :n])


def test_batched_slots_with_padding(pair):
    """Two prompts in one batch (reversed slots, right padding, per-row positions) == each alone == HF."""
    hf, ours, prompts, ref_logits, ref_hidden = pair
    o = check_batched_slots(ours, prompts, ref_logits, ref_hidden, KVCache(ours.kv_specs(), n_slots=2, max_len=32))
    alone, _ = run_chunks(ours, prompts[1], [6, 1, 1, 1, 1, 1])
    assert (alone[:, -1:] - o.logits[1:2]).abs().max() < TOL


def test_embed_and_logit_rows(pair):
    hf, ours, prompts, ref_logits, _ = pair
    with torch.no_grad():
        assert torch.allclose(ours.embed(prompts), hf.get_input_embeddings()(prompts), atol=0, rtol=0)
        cache = KVCache(ours.kv_specs(), n_slots=2, max_len=32)
        o = ours(prompts, torch.arange(N).repeat(2, 1), cache, logit_rows=slice(-1, None))
    assert o.logits.shape == (2, 1, BASE["vocab_size"]) and o.hidden.shape == (2, N, BASE["hidden_size"])
    assert (o.logits - ref_logits[:, -1:]).abs().max() < TOL


def test_kv_shared_layers_own_no_cache_and_never_write():
    hf = make_hf(**PLE_SHARED)
    ours = make_ours(hf)
    assert hf.config.kv_sharing_modes == [None, "store", "store", "reuse", "reuse", "reuse"]
    assert set(ours.kv_specs()) == {0, 1, 2}
    assert [ours.kv_layer_for(i) for i in range(6)] == [0, 1, 2, 1, 1, 2]
    assert ours.last_layer_of_type(S) == 1 and ours.last_layer_of_type(F) == 2
    for i in (3, 4, 5):  # no K/V weights at all on shared layers
        assert not hasattr(ours.model.layers[i].self_attn, "k_proj")
    cache = KVCache(ours.kv_specs(), n_slots=1, max_len=16)
    writes, reads = [], []
    write, attend = cache.write, cache.attend
    cache.write = lambda layer, *a, **k: (writes.append(layer), write(layer, *a, **k))[1]
    cache.attend = lambda layer, *a, **k: (reads.append(layer), attend(layer, *a, **k))[1]
    with torch.no_grad():
        ours(torch.tensor([[5, 6, 7]]), torch.arange(3)[None], cache)
    assert writes == [0, 1, 2] and reads == [0, 1, 2, 1, 1, 2]


def test_config_forms_and_multimodal_sanitize():
    """Raw config.json fields (global_head_dim, ...) and the per_layer_config serialisation resolve alike;
    a Gemma4ForConditionalGeneration checkpoint (plus tower weights, shared-layer K/V) loads strictly."""
    kw = {**BASE, **CONFIGS["softcap_everything"]}
    hf_cfg = Gemma4TextConfig(**kw)
    a, b = ModelArgs.from_dict(kw), ModelArgs.from_dict(hf_cfg.to_dict())
    assert "per_layer_config" in hf_cfg.to_dict()
    for i in range(6):
        assert a.attn_dims(i) == b.attn_dims(i) == (hf_cfg.per_layer_config[i].num_key_value_heads,
                                                    hf_cfg.per_layer_config[i].head_dim)
    assert ModelArgs.from_dict({**BASE, "global_head_dim": 32, "num_global_key_value_heads": 1}).attn_dims(2) \
        == (2, 32)  # num_global_key_value_heads only applies with attention_k_eq_v, as in HF
    mm_cfg = Gemma4Config(text_config=hf_cfg.to_dict(), vision_config=None, audio_config=None)
    torch.manual_seed(0)
    mm = Gemma4ForConditionalGeneration(mm_cfg).eval()
    sd = dict(mm.state_dict())
    sd["model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"] = torch.zeros(2, 2)
    sd["model.embed_audio.embedding_projection.weight"] = torch.zeros(2, 2)
    sd["model.language_model.layers.4.self_attn.k_proj.weight"] = torch.zeros(2, 2)
    sd.pop("lm_head.weight", None)  # tied: real checkpoints omit it
    ours = build(mm_cfg.to_dict()).eval()
    ours.load_state_dict(ours.sanitize(sd), strict=True)
    ids = torch.randint(0, 128, (1, 10))
    with torch.no_grad():
        ref = mm(input_ids=ids, use_cache=False).logits
        got = ours(ids, torch.arange(10)[None], KVCache(ours.kv_specs(), 1, 16)).logits
    assert (got - ref).abs().max() < TOL
