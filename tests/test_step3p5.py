"""Step 3.5 (step3p5) against transformers 5.23's Step3p7 text model (fp32, eager) on a tiny random config with
sliding + full layers (their own head counts and RoPE), dense + MoE layers, SwiGLU clamps: the house parity tests
(prefill, cached decode, chunked verify, two batched slots with padding); the hub layout (`model.*`, legacy config
fields, `moe.*` / `share_expert.*` names) and the VL layout (`model.language_model.*`, vision tower dropped) load
the same model with the MTP layers set aside; the nextn drafter's chained heads draft what transformers'
generate(use_mtp=True) drafts, round by round; speculative == plain at T=0 through the engine."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402

from tandem.errors import ConfigError  # noqa: E402
from tandem.loading import load  # noqa: E402
from tandem.models import build  # noqa: E402
from tandem.models.step3p5 import MtpHeads  # noqa: E402
from tandem.spec.nextn import nextn_drafter  # noqa: E402
# the house parity tests, collected here and run on this module's `pair` fixture
from tests.test_families_parity import (N, TOL, test_batched_slots_with_padding,  # noqa: E402,F401
                                        test_embed_and_logit_rows, test_parity)
from tests.test_nextn import (cache_tracks_rounds, mtp_rounds, spec_equals_plain_60,  # noqa: E402
                              tandem_rounds)

L, NMTP, D = 4, 2, 64
# hub form: per-layer lists padded with the MTP layers' entries (chosen so that transformers' reading of the heads'
# SwiGLU limits, the trunk's first NMTP entries, equals the padded tail the heads use here)
HUB = dict(vocab_size=128, hidden_size=D, intermediate_size=96, num_hidden_layers=L, num_attention_heads=4,
           num_attention_groups=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-6, pad_token_id=0,
           layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention",
                        "full_attention", "sliding_attention"],
           moe_layers_enum="1,2,3,4,5", sliding_window=4, attention_other_setting={"num_attention_heads": 8},
           moe_intermediate_size=32, moe_num_experts=8, moe_top_k=2, share_expert_dim=64,
           moe_router_scaling_factor=2.0, swiglu_limits=[None, 0.7, 0.5, 0.9, None, 0.7],
           swiglu_limits_shared=[0.6, None, 0.8, 0.5, 0.6, None],
           rope_theta=[10_000.0, 5_000.0, 5_000.0, 10_000.0, 10_000.0, 5_000.0],
           partial_rotary_factors=[0.5, 1.0, 1.0, 0.5, 0.5, 1.0], num_nextn_predict_layers=NMTP)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)


# the text config as transformers names its fields (tests/test_row_invariance.py builds it from here too)
BASE = {k: v for k, v in HUB.items() if k not in ("num_attention_groups", "moe_num_experts", "moe_top_k")}
CONFIGS = {"step3p5": ("Step3p7TextConfig", None, dict(num_key_value_heads=2, n_routed_experts=8,
                                                      num_experts_per_tok=2))}


def hf_config():
    text = {**BASE, **CONFIGS["step3p5"][2]}
    return transformers.Step3p7Config(text_config=text, vision_config=VISION, attn_implementation="eager")


def make_hf():
    torch.manual_seed(0)
    hf = transformers.Step3p7ForConditionalGeneration(hf_config()).eval()
    with torch.no_grad():  # O(1) activations, non-trivial norms and router correction
        for pname, p in hf.named_parameters():
            if p.dim() == 1:
                p.uniform_(-0.5, 0.5) if "norm" in pname else p.normal_(0.0, 0.5)
            elif "vision" not in pname:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        for bname, b in hf.named_buffers():
            if "e_score_correction_bias" in bname:
                b.normal_(0.0, 0.3)
    return hf


def make_pair():
    hf = make_hf()
    ours = build(hf.config.to_dict()).eval()
    ours.load_state_dict(ours.sanitize(hf.state_dict()), strict=True)
    return hf, ours


@pytest.fixture(scope="module")
def pair():
    hf, ours = make_pair()
    prompts = torch.randint(0, HUB["vocab_size"], (2, N), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = hf(prompts, output_hidden_states=True, use_cache=False)
    return ours, prompts, out.logits, out.hidden_states[-1]


def test_config_resolution():
    _, ours = make_pair()
    a = ours.args
    assert a.layer_types == HUB["layer_types"][:L] and a.mtp_layer_types == HUB["layer_types"][L:]
    assert a.mlp_layer_types == ["dense", "sparse", "sparse", "sparse"] and a.mtp_mlp_layer_types == ["sparse"] * 2
    layers = ours.model.layers
    assert [m.self_attn.n_heads for m in layers] == [4, 8, 8, 4]
    assert [m.self_attn.window for m in layers] == [None, 4, 4, None]
    assert ours.rope_of("full_attention")[0].numel() == 4 and ours.rope_of("sliding_attention")[0].numel() == 8
    assert type(layers[0].mlp).__name__ == "ClampedMLP" and layers[0].mlp.limit == 0.6
    assert layers[2].mlp.experts.limit == 0.5 and layers[2].mlp.shared_experts.limit == 0.8
    assert layers[1].mlp.shared_experts.limit is None
    m = a.mtp_config()
    assert m.layer_types == HUB["layer_types"][L:] and m.num_sliding_attention_heads == 4
    assert [m.limit("swiglu_limits", j) for j in range(NMTP)] == [None, 0.7]  # transformers' form: trunk's first n


def test_config_errors():
    """A per-layer list of the wrong length, a layer kind this family does not run: ConfigErrors naming them."""
    with pytest.raises(ConfigError, match="layer_types has 3 entries, expected 4"):
        build({**HUB, "model_type": "step3p5", "layer_types": ["full_attention"] * 3})
    with pytest.raises(ConfigError, match=r"layer_types \['minimax_m3_sparse'\].* unsupported"):
        build({**HUB, "model_type": "step3p5", "layer_types": ["minimax_m3_sparse"] * (L + NMTP)})
    with pytest.raises(ConfigError, match="2 MTP layers but no mtp_layer_types"):
        build({**hf_config().text_config.to_dict(), "mtp_layer_types": None})


def hub_names(sd: dict) -> dict:
    """transformers' names -> the hub checkpoint's (`model.*`, stacked `moe.*` experts, `share_expert.*`)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("model.language_model.", "model.")
        if k.endswith("mlp.experts.gate_up_proj"):
            gate, up = v.chunk(2, dim=1)
            out[k.replace("mlp.experts.gate_up_proj", "moe.gate_proj.weight")] = gate.contiguous()
            out[k.replace("mlp.experts.gate_up_proj", "moe.up_proj.weight")] = up.contiguous()
            continue
        for a, b in ((".mlp.experts.down_proj", ".moe.down_proj.weight"), (".mlp.gate.weight", ".moe.gate.weight"),
                     (".mlp.gate.e_score_correction_bias", ".moe.router_bias"),
                     (".mlp.shared_experts.", ".share_expert.")):
            k = k.replace(a, b)
        out[k] = v
    return out


def mtp_layers(trunk: dict, seed: int = 7) -> dict:
    """NMTP hub-layout MTP layers at model.layers.{L..}: the last trunk block (full attention, MoE) perturbed, random
    (1 + w) norms and eh_proj, a shared_head.head copy (unused: the target's LM head is the head)."""
    g, out = torch.Generator().manual_seed(seed), {}
    for j in range(NMTP):
        for k, v in trunk.items():
            if k.startswith(f"model.layers.{L - 1}."):
                noise = torch.randn(v.shape, generator=g) * (0.3 * float(v.std()) if v.numel() > 1 else 0.1)
                out[k.replace(f"model.layers.{L - 1}.", f"model.layers.{L + j}.")] = (v + noise).contiguous()
        for name in ("enorm", "hnorm", "shared_head.norm"):
            out[f"model.layers.{L + j}.{name}.weight"] = torch.rand(D, generator=g) - 0.5
        out[f"model.layers.{L + j}.eh_proj.weight"] = torch.randn(D, 2 * D, generator=g) * (2 * D) ** -0.5
        out[f"model.layers.{L + j}.shared_head.head.weight"] = trunk["lm_head.weight"].clone()
    return out


def write_checkpoint(path, hf, hub_config: bool) -> dict:
    """The release's layout: hub weight names at model.* plus the MTP layers; config.json the hub's flat
    `step3p5` form (padded lists, legacy names) or transformers' `step3p7` one (text_config; vision weights kept)."""
    sd = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    trunk = hub_names(sd if not hub_config else {k: v for k, v in sd.items() if "vision" not in k
                                                 and "projector" not in k})
    mtp = mtp_layers(trunk)
    config = {**HUB, "model_type": "step3p5"} if hub_config else hf.config.to_dict()
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file({**trunk, **mtp}, str(path / "model.safetensors"))
    return mtp


def test_hub_and_vl_layouts_load(tmp_path):
    """The hub release (flat step3p5 config, model.* + moe.* names) and the VL form (step3p7 config, the text model
    under model.language_model.*, vision tower) load the model transformers runs; MTP layers set aside untouched."""
    hf = make_hf()
    tokens = torch.randint(0, 128, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens).logits
    vl = tmp_path / "vl"
    vl.mkdir()
    (vl / "config.json").write_text(json.dumps(hf.config.to_dict()))
    save_file({k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}, str(vl / "model.safetensors"))
    for path, mtp in ((tmp_path / "hub", write_checkpoint(tmp_path / "hub", hf, True)),
                      (tmp_path / "step3p7", write_checkpoint(tmp_path / "step3p7", hf, False)), (vl, {})):
        m = load(str(path), tokenizer=False).model
        assert m.nextn_weights.keys() == mtp.keys() and all(torch.equal(m.nextn_weights[k], v) for k, v in mtp.items())
        with torch.no_grad():
            got = m(tokens, torch.arange(11)[None], m.make_cache(1, 16, k_type="f32")).logits
        assert (got - ref).abs().max() < TOL, path
    hub = load(str(tmp_path / "hub"), tokenizer=False).model
    assert hub.args.mtp_swiglu_limits == [None, 0.7] and hub.args.mtp_swiglu_limits_shared == [0.6, None]


def test_drafts_equal_transformers_mtp(tmp_path, monkeypatch):
    """Two chained heads (a full- and a sliding-attention one, each with its RoPE), greedy: every round's drafts
    (one per head) equal transformers' MTPCandidateGenerator's, and the tokens its generate's."""
    hf = make_hf()
    write_checkpoint(tmp_path, hf, hub_config=False)
    cls = transformers.Step3p7ForConditionalGeneration
    # its MTP-key pattern sits on the text model; generate reads the top model's
    monkeypatch.setattr(cls, "_keys_to_ignore_on_load_unexpected", [rf"layers\.{L + j}\." for j in range(NMTP)])
    ref_model = cls.from_pretrained(str(tmp_path), attn_implementation="eager", dtype=torch.float32).eval()
    target = load(str(tmp_path), tokenizer=False).model.eval()
    drafter = nextn_drafter(target)
    assert isinstance(drafter.heads, MtpHeads) and drafter.heads.n_heads == NMTP
    for seed in (0, 1):
        prompt = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
        ref_tokens, ref_rounds = mtp_rounds(ref_model, prompt, 20, monkeypatch)
        tokens, rounds = tandem_rounds(target, drafter, prompt, 20, NMTP)
        assert tokens == ref_tokens
        m = len(ref_rounds) - 1  # transformers' last round may be cut by max_new_tokens
        assert rounds[:m] == ref_rounds[:m] and len(rounds) >= m
        assert m > 3 and all(len(r) == NMTP for r in ref_rounds)  # both heads draft in every round
        drafter.end(0)


def test_cache_holds_the_accepted_prefix(tmp_path):
    """k = 3 drafts (head 1 recurs on its own output past the 2 heads): after every round the heads' own cache
    (a full- and a sliding-attention head) holds exactly the accepted prefix, as a from-scratch run over it."""
    write_checkpoint(tmp_path, make_hf(), hub_config=True)
    target = load(str(tmp_path), tokenizer=False).model.eval()
    assert target.args.num_nextn_predict_layers == NMTP
    cache_tracks_rounds(target)


@pytest.mark.slow
def test_spec_equals_plain_engine_and_batch(tmp_path):
    """q8_0 target, its two chained heads (q8_0 by default): speculative T=0 (k up to 4: the last head recurs past
    2, rejections) == plain decoding on 60 prompts, through Engine.generate and the batch scheduler (4 slots)."""
    write_checkpoint(tmp_path, make_hf(), hub_config=True)
    spec_equals_plain_60(tmp_path, NMTP)
