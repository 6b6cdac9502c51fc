"""GLM-4.5 (glm4_moe), DeepSeek-V3 (deepseek_v3, MLA over the latent cache) and MiMo (mimo) against transformers 5.23
(fp32, eager) on tiny random configs: the house parity tests of test_families_parity (prefill, token-by-token
cached decode, mixed chunks = chunked verify, two batched slots with padding) run here on this module's `pair`;
the MLA cache (size, contents, rollback); bitwise row invariance after prepare(q8_0); MTP weights set aside when
loading a hub-layout checkpoint; speculative == plain at T=0 through the engine."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from tandem.config import SamplingParams, SpecConfig  # noqa: E402
from tandem.engine import Engine  # noqa: E402
from tandem.errors import ConfigError, ModelLoadError  # noqa: E402
from tandem.kernels import prepare  # noqa: E402
from tandem.loading import load, load_state_into  # noqa: E402
from tandem.models import build  # noqa: E402
from tandem.spec import DraftModelDrafter  # noqa: E402
# the house parity tests, collected here and run on this module's `pair` fixture
from tests.test_families_parity import (N, TOL, test_batched_slots_with_padding,  # noqa: E402,F401
                                        test_embed_and_logit_rows, test_parity)
from tests.test_moe import needs_ext, randomize  # noqa: E402

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=64, rms_norm_eps=1e-6)
MOE = dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
           norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1)
MLA = dict(num_key_value_heads=4, kv_lora_rank=64, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32,
           v_head_dim=32)
YARN = dict(rope_type="yarn", rope_theta=10_000.0, factor=4.0, original_max_position_embeddings=16, mscale=1.0,
            mscale_all_dim=0.7, beta_fast=32, beta_slow=1)
CONFIGS = {
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                 dict(MOE, num_key_value_heads=2, head_dim=32, use_qk_norm=True, attention_bias=True)),
    "glm4_moe_plain": ("Glm4MoeConfig", "Glm4MoeForCausalLM",
                       dict(MOE, num_key_value_heads=2, n_group=1, topk_group=1, first_k_dense_replace=2,
                            norm_topk_prob=False, partial_rotary_factor=0.75)),
    "deepseek_v3_yarn": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(MOE, **MLA, rope_parameters=YARN)),
    "deepseek_v3_no_q_lora": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                              dict(MOE, **MLA | dict(q_lora_rank=None), rope_interleave=False,
                                   attention_bias=True)),
    "mimo": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),  # MiMo's trunk is Qwen2
}
OURS_TYPE = {"mimo": "mimo"}  # transformers 5.23 has no MiMo: ours is built as `mimo` from the Qwen2 config


def make_pair(name):
    cfg_cls, model_cls, kw = CONFIGS[name]
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **kw}, attn_implementation="eager")
    torch.manual_seed(0)
    hf = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # O(1) activations, non-trivial norms, biases and router correction
        for pname, p in hf.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5) if "norm" in pname else p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for bname, b in hf.named_buffers():
            if "e_score_correction_bias" in bname:
                b.normal_(0.0, 0.3)
    ours = build({**cfg.to_dict(), "model_type": OURS_TYPE.get(name, cfg.model_type)}).eval()
    ours.load_state_dict(ours.sanitize(hf.state_dict()), strict=True)
    return hf, ours


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    hf, ours = make_pair(request.param)
    prompts = torch.randint(0, BASE["vocab_size"], (2, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(prompts, output_hidden_states=True, use_cache=False)
    return ours, prompts, out.logits, out.hidden_states[-1]


def test_config_resolution():
    _, glm = make_pair("glm4_moe_plain")
    assert [type(layer.mlp).__name__ for layer in glm.model.layers] == ["GLUMLP", "GLUMLP", "SparseMoeBlock"]
    attn = glm.model.layers[0].self_attn
    assert attn.q_norm is None and attn.q_proj.bias is None and glm._inv_freq.numel() == 6  # 16 * 0.75 / 2
    _, glm = make_pair("glm4_moe")
    attn = glm.model.layers[0].self_attn
    assert attn.q_norm is not None and attn.q_proj.bias is not None and attn.o_proj.bias is None
    assert glm._inv_freq.numel() == 32 // 2 // 2  # partial_rotary_factor 0.5 (the GLM default)
    _, ds = make_pair("deepseek_v3_yarn")
    assert ds._rope_scale != 1.0 and ds.model.layers[0].self_attn.scale != 48 ** -0.5


def test_hub_config_forms():
    """config.json as the hubs ship it (legacy rope_scaling with `type`, top-level rope_theta and
    partial_rotary_factor, no rope_interleave) resolves as transformers' own dict does."""
    _, ds = make_pair("deepseek_v3_yarn")
    hub = {**BASE, **MOE, **MLA, "model_type": "deepseek_v3", "rope_theta": 10_000.0,
           "rope_scaling": {k if k != "rope_type" else "type": v for k, v in YARN.items() if k != "rope_theta"}}
    ds_hub = build(hub)
    assert torch.equal(ds_hub._inv_freq, ds._inv_freq) and ds_hub._rope_scale == ds._rope_scale
    assert ds_hub.model.layers[0].self_attn.scale == ds.model.layers[0].self_attn.scale and ds_hub.args.rope_interleave
    _, glm = make_pair("glm4_moe")
    glm_hub = build({**BASE, **MOE, "model_type": "glm4_moe", "num_key_value_heads": 2, "head_dim": 32,
                     "rope_theta": 10_000.0, "partial_rotary_factor": 0.5, "rope_scaling": None})
    assert torch.equal(glm_hub._inv_freq, glm._inv_freq)


def test_mla_cache_holds_the_latent_once():
    _, ours = make_pair("deepseek_v3_yarn")
    L, R, Dr = BASE["num_hidden_layers"], MLA["kv_lora_rank"], MLA["qk_rope_head_dim"]
    for kind, size in (("bf16", 2), ("f32", 4), ("f16", 2)):
        cache = ours.make_cache(3, 40, k_type=kind, v_type=kind)
        assert cache.bytes_per_token == L * (R + Dr) * size
        assert cache.total_bytes == 3 * 40 * cache.bytes_per_token
    with pytest.raises(ConfigError, match="must be the same"):
        ours.make_cache(1, 8, k_type="bf16", v_type="f32")
    with pytest.raises(ConfigError, match="'q8_0' unsupported"):
        ours.make_cache(1, 8, k_type="q8_0")


def test_mla_cache_latent_and_rollback():
    """The cache holds kv_a_layernorm(c_kv) and the rotated k_pe as transformers caches them; after a rejected
    3-token draft and a rollback, the accepted tokens give the logits of a fresh run."""
    hf, ours = make_pair("deepseek_v3_yarn")
    g = torch.Generator().manual_seed(3)
    tokens, wrong = torch.randint(0, 128, (1, 8), generator=g), torch.randint(0, 128, (1, 3), generator=g)
    slot = torch.tensor([0])
    with torch.no_grad():
        past = hf(tokens, use_cache=True).past_key_values
        cache = ours.make_cache(1, 16, k_type="f32")
        ours(tokens, torch.arange(8)[None], cache, slot)
        cache.set_length(0, 8)
        c_kv, k_pe = cache.view(1, 0)
        assert (c_kv - past.layers[1].keys[0, 0]).abs().max() < 1e-5
        assert (k_pe - past.layers[1].values[0, 0]).abs().max() < 1e-5
        cache.rollback(0, 5)
        ours(wrong, torch.arange(5, 8)[None], cache, slot)  # a draft that is then rejected
        o = ours(tokens[:, 5:], torch.arange(5, 8)[None], cache, slot)
        fresh = ours(tokens, torch.arange(8)[None], ours.make_cache(1, 16, k_type="f32"), slot)
    assert (o.logits - fresh.logits[:, 5:]).abs().max() < 1e-5


def hub_layout(weights: dict) -> dict:
    """transformers 5's fused experts -> the per-expert names the hub checkpoints use."""
    out = {}
    for k, v in weights.items():
        if k.endswith("experts.gate_up_proj"):
            gate, up = v.chunk(2, dim=1)
            for e in range(v.shape[0]):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate[e].clone()
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = up[e].clone()
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = v[e].clone()
        else:
            out[k] = v
    return out


def mtp_weights(name: str, trunk: dict) -> dict:
    """Hub-layout MTP layer 0: DeepSeek/GLM at model.layers.{L} (a decoder layer + enorm, hnorm, eh_proj,
    shared_head), MiMo at model.mtp_layers.0 (a Qwen2 block + token/hidden norms, input_proj, final norm)."""
    L, D = BASE["num_hidden_layers"], BASE["hidden_size"]
    if name == "mimo":
        block = {k.replace(f"model.layers.{L - 1}.", "model.mtp_layers.0."): v.clone() for k, v in trunk.items()
                 if k.startswith(f"model.layers.{L - 1}.")}
        extra = {f"model.mtp_layers.0.{n}.weight": torch.ones(D) for n in
                 ("token_layernorm", "hidden_layernorm", "final_layernorm")}
        return {**block, **extra, "model.mtp_layers.0.input_proj.weight": torch.randn(D, 2 * D)}
    block = {k.replace(f"model.layers.{L - 1}.", f"model.layers.{L}."): v.clone() for k, v in trunk.items()
             if k.startswith(f"model.layers.{L - 1}.")}
    extra = {f"model.layers.{L}.{n}": torch.ones(D) for n in ("enorm.weight", "hnorm.weight",
                                                             "shared_head.norm.weight")}
    return {**block, **extra, f"model.layers.{L}.eh_proj.weight": torch.randn(D, 2 * D),
            f"model.layers.{L}.shared_head.head.weight": torch.randn(BASE["vocab_size"], D)}


@pytest.mark.parametrize("name", ["glm4_moe", "deepseek_v3_yarn", "mimo"])
def test_load_checkpoint_with_mtp_layers(tmp_path, name):
    """An HF directory in the hub layout with its MTP layer loads: the target == transformers, the MTP weights
    are set aside untouched in nextn_weights; an MTP index the config does not declare is a clear error."""
    hf, _ = make_pair(name)
    trunk = hub_layout({k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()})
    mtp = mtp_weights(name, trunk)
    config = {**hf.config.to_dict(), "model_type": OURS_TYPE.get(name, hf.config.model_type),
              "num_nextn_predict_layers": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file({**trunk, **mtp}, str(tmp_path / "model.safetensors"))
    loaded = load(str(tmp_path), tokenizer=False).model
    assert loaded.nextn_weights.keys() == mtp.keys()
    assert all(torch.equal(loaded.nextn_weights[k], v) for k, v in mtp.items())
    tokens = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits
        got = loaded(tokens, torch.arange(9)[None], loaded.make_cache(1, 16, k_type="f32")).logits
    assert (got - ref).abs().max() < TOL
    L = BASE["num_hidden_layers"]
    stray = "model.mtp_layers.1.final_layernorm.weight" if name == "mimo" else f"model.layers.{L + 1}.enorm.weight"
    with pytest.raises(ModelLoadError, match=rf"unexpected \['{stray}'\]"):
        load_state_into(loaded, loaded.sanitize({**trunk, **mtp, stray: torch.ones(1)}), "ckpt")


@needs_ext
@pytest.mark.parametrize("target_name,draft_name", [("deepseek_v3_yarn", "deepseek_v3_yarn"),
                                                    ("deepseek_v3_yarn", "glm4_moe")])
def test_spec_equals_plain(target_name, draft_name):
    """Engine over the MLA cache / GLM: speculative T=0 (a draft model: the target's twin accepts, the other
    family mostly rejects, so rollbacks happen) == plain decoding token for token, q8_0 weights."""
    def tiny(name, seed):
        cfg_cls, _, kw = CONFIGS[name]
        return prepare(randomize(build(getattr(transformers, cfg_cls)(**BASE, **kw).to_dict()).eval(), seed), "q8_0")

    target, draft = tiny(target_name, 0), tiny(draft_name, 0 if draft_name == target_name else 1)
    eng = Engine(target, None, max_len=64, drafter=DraftModelDrafter(draft), spec=SpecConfig(method="draft"),
                 cache_type_k="bf16")
    g = torch.Generator().manual_seed(5)
    for n in (3, 17):
        prompt = torch.randint(0, 128, (n,), generator=g).tolist()
        sp = SamplingParams(max_tokens=16, temperature=0.0)
        plain, _ = eng.complete(prompt, sp, spec=SpecConfig(enabled=False))
        spec, _ = eng.complete(prompt, sp, spec=SpecConfig(enabled=True, method="draft", n_max=4))
        assert spec == plain and len(plain) == 16
