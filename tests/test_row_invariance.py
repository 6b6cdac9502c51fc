"""Bitwise row invariance of every registered family after prepare(), the lossless-speculation guarantee: (a) a
decode row alone == the same row among 1..16 slots (any order), (b) a 4-row verify == 4 single steps, (c) a row with
padding rows beside it == alone. The tiny configs are the parity tests' own: as they are in q8_0 / q8_0x8 (which
need linear inputs in 32-blocks; router / shared-expert gates, Gated DeltaNet heads and Gemma 4 per-layer inputs stay
narrow),
and in bf16 with MLP / expert widths that are not multiples of 32 either (torch's CPU activations compute a tensor's
last partial 32-float step in scalar code, whose last bits differ)."""

import copy
from dataclasses import replace

import pytest
import torch

from tandem.kernels import prepare
from tandem.models import build, gemma3
from tandem.models.layers import activation
from tandem.models.moe import Experts
from tests import test_families_parity as fam
from tests import test_gemma4_parity as g4
from tests import test_glm_deepseek_parity as glm
from tests import test_qwen3_5 as q35
from tests import test_step3p5 as step
from tests.test_kernels import _tiny_args as gemma3_args
from tests.test_moe import needs_ext, randomize

transformers = pytest.importorskip("transformers")

UNALIGNED = dict(intermediate_size=80)  # the dense GLU width; expert / shared-expert widths per family
MOE_48 = dict(moe_intermediate_size=48)
FAMILIES = {  # name -> (parity test module, its config name, width overrides)
    "llama": (fam, "llama3", {}),
    "mistral": (fam, "mistral", {}),
    "qwen2": (fam, "qwen2", {}),
    "qwen3": (fam, "qwen3", {}),
    "qwen3_moe": (fam, "qwen3_moe", MOE_48),
    "glm4_moe": (glm, "glm4_moe", MOE_48),
    "deepseek_v3": (glm, "deepseek_v3_yarn", MOE_48),
    "deepseek_v3_no_q_lora": (glm, "deepseek_v3_no_q_lora", MOE_48),
    "qwen3_5": (q35, "dense", {}),
    "qwen3_5_moe": (q35, "moe", dict(MOE_48, shared_expert_intermediate_size=48)),
    "gemma4": (g4, "ple_kv_shared", {}),
    "gemma4_moe": (g4, "softcap_everything", MOE_48),
    "gemma3": (None, None, {}),
    "step3p5": (step, "step3p5", dict(MOE_48, share_expert_dim=48)),
}
V, SLOTS, PROMPT, K1 = 128, 16, 5, 4


def make(name: str, unaligned: bool):
    module, config, widths = FAMILIES[name]
    widths = {**UNALIGNED, **widths} if unaligned else {}
    if module is g4 and not unaligned:
        widths = dict(hidden_size_per_layer_input=32)  # q8_0 packs the per-layer projection (input 8 otherwise)
    if module is None:  # gemma3: test_kernels' tiny args, softcaps on
        args = replace(gemma3_args(), **widths, final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
        return gemma3.Model(args)
    if module is g4:
        cfg = transformers.Gemma4TextConfig(**{**g4.BASE, **g4.CONFIGS[config], **widths})
    else:
        cfg_cls, _, kw = module.CONFIGS[config]
        cfg = getattr(transformers, cfg_cls)(**{**module.BASE, **kw, **widths})
    return build(cfg.to_dict())


def forward(model, cache, tokens, positions, slots):
    """One forward on its own copy of `cache` (recurrent states advance): logits [B, T, V]."""
    return model(tokens, positions, copy.deepcopy(cache), slots).logits


@needs_ext
@pytest.mark.parametrize("fmt", ["q8_0", "bf16", "q8_0x8"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_rows_bitwise(name, fmt):
    model = prepare(randomize(make(name, unaligned=fmt == "bf16").eval()), fmt)
    if name.startswith("deepseek"):
        assert not hasattr(model.model.layers[0].self_attn, "kv_b_proj")  # absorbed per head, packed
    if name == "gemma4_moe":
        assert isinstance(model.model.layers[0].experts, Experts)  # packed, row-invariant experts
    assert_rows_invariant(model, name=name)


def assert_rows_invariant(model, k_type: str = "f32", v_type: str | None = None, verify: int = K1,
                          n_slots: int = SLOTS, max_len: int = 16, name: str = "") -> None:
    """(a) a decode row alone == among 2..n_slots slots and in any slot order, (b) a `verify`-row forward == that
    many single steps, (c) a decode row beside a verify (padding rows) == alone; bitwise."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, V, (n_slots, PROMPT), generator=g)
    nxt = torch.randint(0, V, (n_slots, verify), generator=g)
    cache = model.make_cache(n_slots, max_len, k_type=k_type, v_type=v_type or k_type)
    slots = torch.arange(n_slots)
    with torch.no_grad():
        model(prompts, torch.arange(PROMPT).repeat(n_slots, 1), cache, slots)
        for s in range(n_slots):
            cache.set_length(s, PROMPT)
        step = lambda s: forward(model, cache, nxt[s, :1], torch.full((len(s), 1), PROMPT), s)  # noqa: E731
        alone = torch.cat([step(slots[i:i + 1]) for i in range(n_slots)])
        for m in sorted({2, 5, 9, n_slots} & set(range(2, n_slots + 1))):  # (a)
            assert torch.equal(step(slots[:m]), alone[:m]), f"{name}: a row among {m} slots differs from alone"
        perm = torch.randperm(n_slots, generator=g)
        assert torch.equal(step(perm), alone[perm]), f"{name}: slot order changes a row"

        rows = forward(model, cache, nxt[:1], torch.arange(PROMPT, PROMPT + verify)[None], slots[:1])  # (b)
        single, c = [], copy.deepcopy(cache)
        for t in range(verify):
            single.append(model(nxt[:1, t:t + 1], torch.tensor([[PROMPT + t]]), c, slots[:1]).logits)
            c.set_length(0, PROMPT + t + 1)
        assert torch.equal(rows, torch.cat(single, 1)), f"{name}: a {verify}-row verify != {verify} single steps"

        pos = torch.tensor([[PROMPT] + [-1] * (verify - 1), list(range(PROMPT, PROMPT + verify))])  # (c)
        mixed = forward(model, cache, torch.stack([nxt[1], nxt[0]]), pos, slots[[1, 0]])
        assert torch.equal(mixed[1:], rows), f"{name}: a verify row beside a padded row differs"
        assert torch.equal(mixed[0, :1], alone[1:2, 0]), f"{name}: a decode row with padding beside it differs"


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_activation_rows_any_thread_count(act):
    """Row-invariant activations: a row alone == among N rows, for unaligned widths and for row counts whose flat
    size 3 threads would split off the 32-float steps (the plain op fails those 640 / 2048-wide cases)."""
    fn, threads = activation(act), torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            for width, rows in ((48, 17), (640, 103), (2048, 35)):  # 3 threads split these off the steps
                x = torch.randn(rows, width) * 3
                alone = torch.cat([fn(x[i:i + 1]) for i in range(rows)])
                for n in (2, 9, rows):
                    assert torch.equal(fn(x[:n]), alone[:n]), (t, width, n)
    finally:
        torch.set_num_threads(threads)
