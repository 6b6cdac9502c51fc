"""MoE pieces against transformers (routers, checkpoint fusing) and bitwise row invariance of the MoE blocks after
prepare() (softmax top-k, sigmoid grouped top-k, gated shared expert); whole models: tests/test_row_invariance.py."""

import pytest
import torch
import torch.nn as nn

from tandem.errors import ModelLoadError
from tandem.kernels import PackedLinear, prepare
from tandem.kernels._ext import ext
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
