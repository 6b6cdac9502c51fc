"""GGUF archs deepseek2 / glm4moe / qwen35 / qwen35moe from files written the way llama.cpp's converter writes them.

`convert()` follows ggml-org/llama.cpp conversion/base.py (TextModel.set_gguf_parameters, e_score_correction_bias
-> exp_probs_b.bias), conversion/deepseek.py (DeepseekV2Model: head_count_kv 1, kv_b_proj split into attn_k_b
[H, R, Dn] / attn_v_b [H, Dv, R], MLA lengths, yarn_log_multiplier; MTP layers dropped, or kept at blk.{L} as
Glm4MoeLiteModel does), conversion/glm.py (Glm4MoeModel: block_count L + nextn, nextn tensors) and conversion/qwen.py
(Qwen3_5(Moe)TextModel: mtp.* -> blk.{L}, 1 + w norms, -exp(A_log), squeezed conv1d, V heads tiled, experts
stacked), with gguf-py's tensor-name map (the installed gguf-py has no nextn names for deepseek2 / qwen35: they are
gguf.TENSOR_NAMES' NEXTN_* here). The oracle is transformers 5.23 on the same random weights, and tandem loading
the hub-layout checkpoint the GGUF was converted from.
"""

import json
import logging
import re

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tandem.errors import ModelLoadError
from tandem.loading import load
from tandem.models.nextn import NextN
from tandem.spec.nextn import nextn_drafter
from tests.test_gguf_families import _MERGES, TOKENS, V, _our_logits

transformers = pytest.importorskip("transformers")
T = gguf.MODEL_TENSOR

BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_attention_heads=4, max_position_embeddings=64,
            rms_norm_eps=1e-6)
MOE = dict(moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
           norm_topk_prob=True, routed_scaling_factor=2.5, first_k_dense_replace=1, n_shared_experts=1)
YARN = dict(rope_type="yarn", rope_theta=10_000.0, factor=4.0, original_max_position_embeddings=16, mscale=0.7,
            mscale_all_dim=0.7, beta_fast=32, beta_slow=1)  # llama.cpp takes mscale == mscale_all_dim
QWEN = dict(num_hidden_layers=4, num_key_value_heads=2, head_dim=16, linear_num_key_heads=2,
            linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8, linear_conv_kernel_dim=4,
            full_attention_interval=2)
CASES = {  # name -> (GGUF arch, transformers config class, config)
    "glm4moe": ("glm4moe", "Glm4MoeConfig", dict(MOE, num_hidden_layers=3, num_key_value_heads=2, head_dim=32,
                                                 use_qk_norm=True, attention_bias=True)),
    "deepseek2": ("deepseek2", "DeepseekV3Config", dict(MOE, num_hidden_layers=3, num_key_value_heads=4,
                                                        kv_lora_rank=64, q_lora_rank=32, qk_rope_head_dim=16,
                                                        qk_nope_head_dim=32, v_head_dim=32, rope_parameters=YARN)),
    "qwen35": ("qwen35", "Qwen3_5TextConfig", QWEN),
    "qwen35moe": ("qwen35moe", "Qwen3_5MoeTextConfig", dict(QWEN, num_experts=4, num_experts_per_tok=2,
                                                            moe_intermediate_size=32,
                                                            shared_expert_intermediate_size=64)),
}
NEXTN_LEAVES = {"eh_proj": T.NEXTN_EH_PROJ, "enorm": T.NEXTN_ENORM, "hnorm": T.NEXTN_HNORM,
                "shared_head.norm": T.NEXTN_SHARED_HEAD_NORM, "embed_tokens": T.NEXTN_EMBED_TOKENS,
                "shared_head.head": T.NEXTN_SHARED_HEAD_HEAD}
QWEN_MTP = {"fc": "eh_proj", "pre_fc_norm_embedding": "enorm", "pre_fc_norm_hidden": "hnorm",
            "norm": "shared_head.norm"}
IDS = [5, 17, 99, 3, 250, 7, 7, 31, 120, 64, 200, 260, 11]


def make_hf(case: str):
    arch, cls, kw = CASES[case]
    cfg = getattr(transformers, cls)(**BASE, **kw, attn_implementation="eager")
    model = getattr(transformers, cls.replace("TextConfig", "ForCausalLM").replace("Config", "ForCausalLM"))(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # O(1) activations; zero-centred (1 + w) norms (qwen) small, plain ones near 1
        for n, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            elif arch.startswith("qwen") and not n.endswith("linear_attn.norm.weight"):
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
        for n, b in model.named_buffers():
            if "e_score_correction_bias" in n:
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return model.eval()


def hub_layout(sd: dict) -> dict:
    """transformers 5's fused experts -> the per-expert names the hub checkpoints use."""
    out = {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj"):
            for e, (gate, up) in enumerate(zip(*v.chunk(2, dim=1))):
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate.clone()
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = up.clone()
        elif k.endswith("experts.down_proj"):
            out.update({k.replace("down_proj", f"{e}.down_proj.weight"): v[e].clone() for e in range(v.shape[0])})
        else:
            out[k] = v.clone()
    return out


def mtp_layer(trunk: dict, src: int, dst: str, extras: dict, seed: int = 7) -> dict:
    """An MTP layer: trunk block `src` perturbed (renamed to the prefix `dst`) plus eh_proj / norms (`extras`)."""
    g, D = torch.Generator().manual_seed(seed), BASE["hidden_size"]
    out = {}
    for k, v in trunk.items():
        if k.startswith(f"model.layers.{src}."):
            out[k.replace(f"model.layers.{src}.", dst)] = v + torch.randn(v.shape, generator=g) * 0.3 * float(v.std())
    for name, hub in extras.items():
        shape = (D, 2 * D) if name == "eh_proj" else (D,)
        out[f"{hub}.weight"] = (torch.randn(shape, generator=g) * (2 * D) ** -0.5 if name == "eh_proj"
                                else torch.rand(shape, generator=g) + (0.5 if "layers" in hub else -0.5))
    return out


def write_hub(case: str, path, mtp: bool = True):
    """The hub checkpoint (config.json + model.safetensors) with one MTP layer in the family's hub layout."""
    hf = make_hf(case)
    sd = hub_layout({k: v.detach() for k, v in hf.state_dict().items()})
    cfg = hf.config.to_dict()
    L = cfg["num_hidden_layers"]
    if case.startswith("qwen"):
        cfg["mtp_num_hidden_layers"] = 1
        cfg["full_attention_interval"] = QWEN["full_attention_interval"]  # as Qwen3.5's config.json has it
        extra = mtp_layer(sd, L - 1, "mtp.layers.0.", {leaf: f"mtp.{hub}" for hub, leaf in QWEN_MTP.items()})
    else:
        cfg["num_nextn_predict_layers"] = 1
        extra = mtp_layer(sd, L - 1, f"model.layers.{L}.", {n: f"model.layers.{L}.{n}" for n in
                                                              ("eh_proj", "enorm", "hnorm", "shared_head.norm")})
        extra[f"model.layers.{L}.shared_head.head.weight"] = sd["lm_head.weight"].clone()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({**sd, **(extra if mtp else {})}, str(path / "model.safetensors"))
    return hf


# -- the converter ---------------------------------------------------------------------------------------------------

def _metadata(w: gguf.GGUFWriter, arch: str, c: dict, n_blocks: int, n_mtp: int) -> None:
    """TextModel.set_gguf_parameters and the arch classes' additions (final values of keys written twice)."""
    rp = c["rope_parameters"]
    w.add_block_count(n_blocks)
    w.add_context_length(c["max_position_embeddings"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(1 if arch == "deepseek2" else c["num_key_value_heads"])
    if rp["rope_type"] == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rp["factor"])
        w.add_rope_scaling_orig_ctx_len(rp["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rp["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rp["beta_slow"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rp["mscale_all_dim"])
    w.add_rope_freq_base(rp["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    moe = "num_experts" in c or "n_routed_experts" in c
    if moe:
        w.add_expert_count(c.get("num_experts") or c["n_routed_experts"])
        w.add_expert_used_count(c["num_experts_per_tok"])
        w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    if arch in ("glm4moe", "deepseek2"):
        w.add_expert_group_count(c["n_group"])
        w.add_expert_group_used_count(c["topk_group"])
        w.add_expert_shared_count(c["n_shared_experts"])
        w.add_leading_dense_block_count(c["first_k_dense_replace"])
        w.add_expert_weights_scale(c["routed_scaling_factor"])
        w.add_expert_weights_norm(c["norm_topk_prob"])
    if arch == "glm4moe":
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
        w.add_rope_dimension_count(int(c["head_dim"] * rp["partial_rotary_factor"]))
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    if arch == "deepseek2":
        w.add_vocab_size(c["vocab_size"])
        w.add_q_lora_rank(c["q_lora_rank"])
        w.add_kv_lora_rank(c["kv_lora_rank"])
        w.add_key_length(c["kv_lora_rank"] + c["qk_rope_head_dim"])
        w.add_value_length(c["kv_lora_rank"])
        w.add_key_length_mla(c["qk_nope_head_dim"] + c["qk_rope_head_dim"])
        w.add_value_length_mla(c["v_head_dim"])
        w.add_rope_dimension_count(c["qk_rope_head_dim"])
    if arch.startswith("qwen35"):
        w.add_key_length(c["head_dim"])
        w.add_value_length(c["head_dim"])
        if moe:
            w.add_expert_shared_feed_forward_length(c["shared_expert_intermediate_size"])
        w.add_ssm_conv_kernel(c["linear_conv_kernel_dim"])
        w.add_ssm_state_size(c["linear_key_head_dim"])
        w.add_ssm_group_count(c["linear_num_key_heads"])
        w.add_ssm_time_step_rank(c["linear_num_value_heads"])
        w.add_ssm_inner_size(c["linear_value_head_dim"] * c["linear_num_value_heads"])
        w.add_full_attention_interval(c["full_attention_interval"])
        w.add_rope_dimension_count(int(c["head_dim"] * 0.25))
        w.add_rope_dimension_sections([11, 11, 10, 0])
    if n_mtp:
        w.add_nextn_predict_layers(n_mtp)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(_MERGES)
    w.add_eos_token_id(2)


def _tile(t: torch.Tensor, dim: int, c: dict, hd: int) -> torch.Tensor:
    """conversion/qwen.py _reorder_v_heads: V heads grouped by K head -> tiled."""
    n_k, r = c["linear_num_key_heads"], c["linear_num_value_heads"] // c["linear_num_key_heads"]
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], n_k, r, hd, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


def _qwen_tensor(name: str, t: torch.Tensor, c: dict, L: int):
    """Qwen3_5TextModel.modify_tensors up to the name map: mtp renames, V-head tiling, the Qwen3Next transforms."""
    if name.startswith("mtp."):
        m = re.match(r"mtp\.layers\.(\d+)\.(.+)", name)
        leaf = name.removeprefix("mtp.").removesuffix(".weight")
        name = f"model.layers.{L + int(m[1])}.{m[2]}" if m else f"model.layers.{L}.{QWEN_MTP[leaf]}.weight"
    qk, vd = 2 * c["linear_num_key_heads"] * c["linear_key_head_dim"], c["linear_value_head_dim"]
    if ".in_proj_qkv." in name:
        t = torch.cat([t[:qk], _tile(t[qk:], 0, c, vd)])
    elif ".in_proj_z." in name:
        t = _tile(t, 0, c, vd)
    elif ".in_proj_a." in name or ".in_proj_b." in name or name.endswith((".A_log", ".dt_bias")):
        t = _tile(t, 0, c, 1)
    elif ".conv1d" in name:
        t = t.squeeze()
        t = torch.cat([t[:qk], _tile(t[qk:], 0, c, vd)])
    elif ".out_proj." in name:
        t = _tile(t, 1, c, vd)
    if name.endswith(".A_log"):
        t = -torch.exp(t)
    elif name.endswith(".dt_bias"):
        name = name.removesuffix(".dt_bias") + ".dt_proj.bias"
    elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
        t = t + 1
    return name, t


def convert(hub, arch: str, path, keep_mtp: bool = True, drop=(), drop_meta=()):
    """The GGUF convert_hf_to_gguf.py writes for the hub checkpoint in `hub`; returns the GGUF tensors."""
    c = json.loads((hub / "config.json").read_text())
    sd = load_file(str(hub / "model.safetensors"))
    L = c["num_hidden_layers"]
    n = c.get("mtp_num_hidden_layers", c.get("num_nextn_predict_layers", 0)) if keep_mtp else 0
    tmap = gguf.get_tensor_name_map(next(a for a, nm in gguf.MODEL_ARCH_NAMES.items() if nm == arch), L + n)

    def gname(hf_name):
        return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    stacked, out = {}, {}
    for name, t in sd.items():
        if arch.startswith("qwen35"):
            name, t = _qwen_tensor(name, t, c, L)
        name = name.replace("e_score_correction_bias", "e_score_correction.bias")
        bid = next((int(p) for p in name.split(".") if p.isdecimal()), None)
        if bid is not None and bid >= L + n:  # DeepseekV2Model: skip_mtp
            continue
        m = re.match(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.weight", name)
        if m:  # merge the experts into a single 3d tensor
            stacked.setdefault((m[1], m[3]), {})[int(m[2])] = t
            continue
        if name.endswith("experts.gate_up_proj"):  # transformers 5's fused form (Qwen2MoeModel splits it)
            gate, up = t.chunk(2, dim=1)
            stacked[(name[:-13], "gate_proj")], stacked[(name[:-13], "up_proj")] = dict(enumerate(gate)), \
                dict(enumerate(up))
            continue
        if name.endswith("experts.down_proj"):
            stacked[(name[:-10], "down_proj")] = dict(enumerate(t))
            continue
        if name.endswith("kv_b_proj.weight"):
            H, R = c["num_attention_heads"], t.shape[-1]
            k_b, v_b = t.view(H, -1, R).split([c["qk_nope_head_dim"], c["v_head_dim"]], dim=1)
            out[gname(name.replace("kv_b_proj", "k_b_proj"))] = k_b.transpose(1, 2)
            out[gname(name.replace("kv_b_proj", "v_b_proj"))] = v_b
            continue
        nx = re.match(r"model\.layers\.(\d+)\.(eh_proj|enorm|hnorm|shared_head\.norm|embed_tokens|shared_head\.head)"
                      r"\.weight", name)
        g = (gguf.TENSOR_NAMES[NEXTN_LEAVES[nx[2]]].format(bid=nx[1]) + ".weight" if nx
             else gname(name))
        out[g] = t
    for (prefix, proj), experts in stacked.items():
        out[gname(f"{prefix}.{proj}.weight")] = torch.stack([experts[e] for e in range(len(experts))])
    w = gguf.GGUFWriter(str(path), arch)
    _metadata(w, arch, c, L + n, n)
    for k in drop_meta:
        w.kv_data[0].pop(f"{arch}.{k}")
    for g, t in out.items():
        if g not in drop:
            w.add_tensor(g, t.float().contiguous().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
    case = request.param
    d = tmp_path_factory.mktemp(case)
    hf = write_hub(case, d / "hub")
    convert(d / "hub", CASES[case][0], d / "m.gguf")
    return case, hf, load(str(d / "hub"), tokenizer=False).model, load(str(d / "m.gguf"), tokenizer=False).model


def test_gguf_matches_transformers(converted):
    case, hf, from_hub, from_gguf = converted
    mine, hubs = from_gguf.state_dict(), from_hub.state_dict()
    assert set(mine) == set(hubs)
    for k, v in hubs.items():  # exact but for the fp32 round trips of 1 + w and -exp(A_log)
        assert torch.allclose(mine[k], v, atol=1e-6, rtol=1e-6), k
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0]
    got = _our_logits(from_gguf, IDS)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_mtp_weights_land_where_the_drafter_reads_them(converted):
    """deepseek2 / glm4moe: NextN built from the GGUF target == NextN from the hub checkpoint (weights and head
    output); qwen35(moe): mtp_weights under the hub's mtp.* names, equal to the hub's."""
    case, _, from_hub, from_gguf = converted
    if case.startswith("qwen"):
        assert set(from_gguf.mtp_weights) == set(from_hub.mtp_weights) and from_hub.mtp_weights
        for k, v in from_hub.mtp_weights.items():
            assert torch.allclose(from_gguf.mtp_weights[k], v, atol=1e-6, rtol=1e-6), k
        return
    heads_gguf, heads_hub = NextN(from_gguf), NextN(from_hub)
    assert heads_gguf.n_heads == 1
    a, b = heads_gguf.state_dict(), heads_hub.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    tokens = torch.tensor([IDS[:6]])
    prev = torch.randn(1, 6, BASE["hidden_size"], generator=torch.Generator().manual_seed(3))
    outs = []
    for heads, target in ((heads_gguf, from_gguf), (heads_hub, from_hub)):
        cache = heads.make_cache(1, 16, k_type="fp32")
        with torch.no_grad():
            outs.append(target.logits(heads(0, tokens, prev, torch.arange(6)[None], cache, torch.tensor([0]),
                                            torch.tensor([0]))))
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case,how", [("deepseek2", "converter_skips_mtp"), ("glm4moe", "checkpoint_without_mtp")])
def test_without_nextn_runs_plain(tmp_path, caplog, case, how):
    """DeepseekV2Model drops the MTP layers; a GLM checkpoint without them still says nextn_predict_layers 1."""
    hf = write_hub(case, tmp_path / "hub", mtp=how != "checkpoint_without_mtp")
    p = tmp_path / "m.gguf"
    convert(tmp_path / "hub", CASES[case][0], p, keep_mtp=how != "converter_skips_mtp")
    assert not any(".nextn." in t.name for t in gguf.GGUFReader(str(p)).tensors)
    m = load(str(p), tokenizer=False)
    assert m.config["num_hidden_layers"] == hf.config.num_hidden_layers and m.config["num_nextn_predict_layers"] == 0
    with caplog.at_level(logging.INFO, logger="tandem.spec"):
        assert nextn_drafter(m.model) is None
    assert "no MTP layers; no model drafter" in caplog.text
    with torch.no_grad():
        want = hf(torch.tensor([IDS])).logits[0]
    assert torch.allclose(_our_logits(m.model, IDS), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case,drop,drop_meta,needle", [
    ("deepseek2", (), ("attention.kv_lora_rank",), "deepseek2.attention.kv_lora_rank"),
    ("glm4moe", (), ("expert_count",), "glm4moe.expert_count"),
    ("qwen35moe", (), ("ssm.inner_size",), "qwen35moe.ssm.inner_size"),
    ("deepseek2", ("blk.1.exp_probs_b.bias",), (), "blk.1.exp_probs_b.bias"),
    ("glm4moe", ("blk.3.nextn.hnorm.weight",), (), "blk.3.nextn.hnorm.weight"),
    ("qwen35", ("blk.0.ssm_a",), (), "blk.0.ssm_a"),
])
def test_malformed_is_one_clear_error(tmp_path, case, drop, drop_meta, needle):
    write_hub(case, tmp_path / "hub")
    p = tmp_path / "bad.gguf"
    convert(tmp_path / "hub", CASES[case][0], p, drop=drop, drop_meta=drop_meta)
    with pytest.raises(ModelLoadError) as ei:
        load(str(p), tokenizer=False)
    assert p.name in str(ei.value) and needle in str(ei.value), str(ei.value)
