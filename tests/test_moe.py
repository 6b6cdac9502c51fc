"""MoE pieces against transformers (routers, checkpoint fusing) and bitwise row invariance after prepare() for every
new path: MoE blocks (softmax top-k, sigmoid grouped top-k, gated shared expert), QKV bias, q/k-norm, Gemma 4 MoE."""

import pytest
import torch
import torch.nn as nn

from tandem.errors import ModelLoadError
from tandem.kernels import PackedLinear, prepare
from tandem.kernels._ext import ext
from tandem.models import build, gemma4
from tandem.models.layers import GLUMLP, activation
from tandem.models.moe import Experts, SigmoidGroupedTopKRouter, SoftmaxTopKRouter, SparseMoeBlock, fuse_experts

transformers = pytest.importorskip("transformers")
needs_ext = pytest.mark.skipif(ext() is None, reason="fast CPU kernels unavailable on this machine")
D, E, I = 64, 8, 32


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in module.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return module


def test_sigmoid_grouped_router_matches_deepseek_v3():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    cfg = transformers.DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=3, n_group=4,
                                        topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    hf = randomize(DeepseekV3TopkRouter(cfg))
    hf.e_score_correction_bias.normal_(0, 0.3)
    ours = SigmoidGroupedTopKRouter(D, E, 3, 4, 2, True, 2.5)
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(20, D)
    _, w_ref, i_ref = hf(x)
    w, idx = ours(x)
    o_ref, o = i_ref.sort(-1), idx.sort(-1)
    assert torch.equal(o.values, o_ref.values)
    assert torch.allclose(w.gather(1, o.indices), w_ref.gather(1, o_ref.indices), atol=1e-6)


def test_softmax_router_and_experts_match_qwen3_moe():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    cfg = transformers.Qwen3MoeConfig(hidden_size=D, num_experts=E, num_experts_per_tok=2, moe_intermediate_size=I,
                                      norm_topk_prob=True)
    hf = randomize(Qwen3MoeSparseMoeBlock(cfg))
    ours = SparseMoeBlock(SoftmaxTopKRouter(D, E, 2, True), Experts(E, D, I, activation("silu")))
    ours.load_state_dict(hf.state_dict(), strict=True)
    x = torch.randn(2, 5, D)
    assert (ours(x) - hf(x)).abs().max() < 1e-5


def test_fuse_experts_per_expert_and_3d_forms():
    g, u, d = torch.randn(E, I, D), torch.randn(E, I, D), torch.randn(E, D, I)
    want = {"m.experts.gate_up_proj": torch.cat([g, u], 1), "m.experts.down_proj": d, "m.gate.weight": torch.ones(1)}
    per = {f"m.experts.{e}.{n}.weight": t[e] for e in range(E) for n, t in
           (("gate_proj", g), ("up_proj", u), ("down_proj", d))}
    three = {"m.experts.gate_proj": g, "m.experts.up_proj": u, "m.experts.down_proj": d}
    for form in (per, three):
        got = fuse_experts({**form, "m.gate.weight": torch.ones(1)})
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    del per["m.experts.3.up_proj.weight"]
    with pytest.raises(ModelLoadError, match=r"up_proj missing for expert\(s\) \[3\]"):
        fuse_experts(per)
    with pytest.raises(ModelLoadError, match="without up_proj"):
        fuse_experts({"m.experts.gate_proj": g, "m.experts.down_proj": d})


@needs_ext
@pytest.mark.parametrize("fmt,inter", [("bf16", I), ("q8_0", I), ("bf16", 48)])  # q8_0 packs 32-blocks
@pytest.mark.parametrize("kind", ["softmax", "grouped_shared_gate"])
def test_moe_block_row_invariant(fmt, kind, inter):
    """A row's MoE output is bitwise the same alone or among 1..16 rows (any order), experts packed; expert widths
    that are not multiples of 32 too (bf16), and the width-1 shared-expert gate."""
    act = activation("silu")
    if kind == "softmax":
        block = SparseMoeBlock(SoftmaxTopKRouter(D, E, 2, False), Experts(E, D, inter, act))
    else:
        block = SparseMoeBlock(SigmoidGroupedTopKRouter(D, E, 3, 4, 2, True, 2.5), Experts(E, D, inter, act),
                               GLUMLP(D, inter, act), "shared_expert", shared_gate=True)
    prepare(randomize(block), fmt)
    assert isinstance(block.experts.packed[0][0], PackedLinear) and isinstance(block.gate.proj, PackedLinear)
    x = torch.randn(16, 1, D)
    with torch.no_grad():
        alone = torch.cat([block(x[i:i + 1]) for i in range(16)])
        for m in range(1, 17):
            assert torch.equal(block(x[:m]), alone[:m]), m
        perm = torch.randperm(16)
        assert torch.equal(block(x[perm].view(4, 4, D)).view(16, 1, D), alone[perm])


BASE = dict(vocab_size=128, hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
MODELS = {
    "qwen2_bias": dict(model_type="qwen2"),
    "qwen3_qk_norm": dict(model_type="qwen3", head_dim=32),
    "qwen3_moe": dict(model_type="qwen3_moe", head_dim=32, num_experts=E, num_experts_per_tok=2,
                      moe_intermediate_size=I, norm_topk_prob=True),
    "gemma4_moe": dict(model_type="gemma4_text", head_dim=16, global_head_dim=32, sliding_window=4,
                       layer_types=["sliding_attention", "full_attention"], hidden_size_per_layer_input=0,
                       enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=I),
}


@needs_ext
@pytest.mark.parametrize("fmt", ["bf16", "q8_0"])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_rows_bitwise(name, fmt):
    """After prepare(fmt): a slot's decode row is bitwise the same alone or among 1..16 slots, and a 4-token verify
    forward equals 4 single-token steps bitwise."""
    model = prepare(randomize(build({**BASE, **MODELS[name]}).eval()), fmt)
    if name == "gemma4_moe":
        assert isinstance(model.model.layers[0].experts, Experts)
    g = torch.Generator().manual_seed(1)
    prompts, nxt = torch.randint(0, 128, (16, 5), generator=g), torch.randint(0, 128, (16, 4), generator=g)
    cache = model.make_cache(16, 16, k_type="f32")
    slots = torch.arange(16)
    with torch.no_grad():
        model(prompts, torch.arange(5).repeat(16, 1), cache, slots)
        step = lambda s: model(nxt[s, :1], torch.full((len(s), 1), 5), cache, s).logits  # noqa: E731
        alone = torch.cat([step(slots[i:i + 1]) for i in range(16)])
        for m in (1, 2, 3, 5, 8, 13, 16):
            assert torch.equal(step(slots[:m]), alone[:m]), m
        verify = model(nxt[:1], torch.arange(5, 9)[None], cache, slots[:1]).logits
        single = torch.cat([model(nxt[:1, t:t + 1], torch.tensor([[5 + t]]), cache, slots[:1]).logits
                            for t in range(4)], dim=1)
    assert torch.equal(verify, single)
