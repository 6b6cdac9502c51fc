"""The nextn drafter on Qwen3.5 / Qwen3.6 (dense and MoE; `mtp.*`, hybrid Gated DeltaNet target) and MiMo
(`model.mtp_layers.*`, a qwen2 target).

transformers 5.23 has no MTP for these families (it refuses MTP for stateful models and has no MiMo class), so the
reference head is the published formula (vLLM / SGLang qwen3_5_mtp.py, XiaomiMiMo's modeling_mimo.py as vLLM's
mimo_mtp.py mirrors it) built from transformers' OWN modules on the same weights: Qwen3_5(Moe)DecoderLayer /
Qwen3_5RMSNorm, Qwen2DecoderLayer / Qwen2RMSNorm, run over the whole sequence with a causal mask (no cache). Our
heads, run in chunks on their own cache, give the same logits within 1e-4, for every head j fed head j-1's output.
Then: the drafter's cache == a from-scratch run after every round; spec == plain at T=0 (60 prompts, q8_0, engine
and batch scheduler, rejected rounds included: the hybrid target cache rolls back its recurrent state); the T>0
distribution of the first three tokens == the target's (chi-square) with one-hot and sampled drafts; the VL layout
loads and `tandem generate` names the drafter.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2 as q2  # noqa: E402
from transformers.models.qwen3_5 import modeling_qwen3_5 as q35  # noqa: E402
from transformers.models.qwen3_5_moe import modeling_qwen3_5_moe as q35m  # noqa: E402

from tandem.config import SamplingParams, SpecConfig  # noqa: E402
from tandem.engine import Engine  # noqa: E402
from tandem.loading import load  # noqa: E402
from tandem.models import build  # noqa: E402
from tandem.sampling import process_logits  # noqa: E402
from tandem.spec.nextn import nextn_drafter  # noqa: E402
from tests.test_nextn import cache_rows, heads_from_scratch, spec_equals_plain_60, tandem_rounds  # noqa: E402
from tests.test_nextn_engine import save_tokenizer  # noqa: E402

V, D = 128, 64
QWEN = dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-6,
            linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=8,
            linear_conv_kernel_dim=4,
            layer_types=["linear_attention", "full_attention", "linear_attention", "linear_attention"])
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64)
MIMO = dict(vocab_size=V, hidden_size=D, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6)
FAMILIES = ["qwen3_5", "qwen3_5_moe", "mimo"]
TOL = 1e-4


def _randomize(module: nn.Module, g: torch.Generator, unit_offset: bool) -> None:
    """O(1) activations: norm weights w in [0.5, 1.5] ((1 + w) norms: w in [-0.5, 0.5]), as test_qwen3_5.py."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
            elif name.endswith(("A_log", "dt_bias")):
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 1)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith("linear_attn.norm.weight") or not unit_offset:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.rand(p.shape, generator=g) - 0.5)


class RefMTP(nn.Module):
    """The published MTP formula on transformers' modules; names are the checkpoint's (minus its prefix)."""

    def __init__(self, family: str, cfg, n: int):
        super().__init__()
        self.family = family
        mcfg = copy.deepcopy(cfg)
        mcfg.num_hidden_layers, mcfg.layer_types = n, ["full_attention"] * n
        if family == "mimo":
            self.layers = nn.ModuleList(MiMoRefLayer(mcfg, j) for j in range(n))
            return
        mod = q35m if family == "qwen3_5_moe" else q35
        norm = mod.Qwen3_5MoeRMSNorm if family == "qwen3_5_moe" else mod.Qwen3_5RMSNorm
        layer = mod.Qwen3_5MoeDecoderLayer if family == "qwen3_5_moe" else mod.Qwen3_5DecoderLayer
        self.fc = nn.Linear(2 * D, D, bias=False)
        self.pre_fc_norm_embedding, self.pre_fc_norm_hidden, self.norm = (norm(D, eps=cfg.rms_norm_eps)
                                                                          for _ in range(3))
        self.layers = nn.ModuleList(layer(mcfg, j) for j in range(n))

    def forward(self, hf, j: int, tokens: torch.Tensor, prev: torch.Tensor, positions: torch.Tensor):
        """Head j over the whole sequence: tokens [1, T], prev [1, T, D], positions [1, T] -> logits [1, T, V]."""
        emb = hf.model.embed_tokens(tokens)
        T = tokens.shape[1]
        mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
        pe = hf.model.rotary_emb(emb, positions)
        if self.family == "mimo":
            return hf.lm_head(self.layers[j](emb, prev, pe, mask, positions))
        x = self.fc(torch.cat([self.pre_fc_norm_embedding(emb), self.pre_fc_norm_hidden(prev)], -1))
        x = self.layers[j](x, position_embeddings=pe, attention_mask=mask, position_ids=positions)
        return hf.lm_head(self.norm(x))


class MiMoRefLayer(nn.Module):
    """XiaomiMiMo's MTP layer: a Qwen2 block fed input_proj(concat(hidden_layernorm(h), token_layernorm(e)))."""

    def __init__(self, cfg, j: int):
        super().__init__()
        self.block = q2.Qwen2DecoderLayer(cfg, j)
        self.token_layernorm, self.hidden_layernorm, self.final_layernorm = (
            q2.Qwen2RMSNorm(D, eps=cfg.rms_norm_eps) for _ in range(3))
        self.input_proj = nn.Linear(2 * D, D, bias=False)

    def forward(self, emb, prev, pe, mask, positions):
        x = self.input_proj(torch.cat([self.hidden_layernorm(prev), self.token_layernorm(emb)], -1))
        return self.final_layernorm(self.block(x, attention_mask=mask, position_ids=positions,
                                               position_embeddings=pe))

    def hub(self) -> dict[str, torch.Tensor]:  # the block's modules sit directly under model.mtp_layers.{j}.
        return {k.removeprefix("block."): v for k, v in self.state_dict().items()}


def make_target(family: str, n_heads: int, seed: int = 0):
    """A transformers target, its reference MTP (trunk attention layer perturbed, so drafts are often right) and
    the hub-layout checkpoint dict (text layout) with the MTP weights in the family's names."""
    g = torch.Generator().manual_seed(seed)
    if family == "mimo":
        cfg = transformers.Qwen2Config(**MIMO, attn_implementation="eager")
        hf = transformers.Qwen2ForCausalLM(cfg).eval()
    else:
        kw = MOE if family == "qwen3_5_moe" else {}
        cls = "Qwen3_5Moe" if kw else "Qwen3_5"
        cfg = getattr(transformers, f"{cls}TextConfig")(**QWEN, **kw, mtp_num_hidden_layers=n_heads,
                                                         attn_implementation="eager")
        hf = getattr(transformers, f"{cls}ForCausalLM")(cfg).eval()
    _randomize(hf, g, family != "mimo")
    ref = RefMTP(family, cfg, n_heads).eval()
    _randomize(ref, g, family != "mimo")
    trunk = {k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()}
    src = "model.layers.1." if family != "mimo" else f"model.layers.{MIMO['num_hidden_layers'] - 1}."
    with torch.no_grad():  # each head's block: the trunk's attention layer + 30 % noise
        for layer in ref.layers:
            block = layer.block if family == "mimo" else layer
            for k, p in block.named_parameters():
                if src + k in trunk:
                    w = trunk[src + k]
                    p.copy_(w + torch.randn(w.shape, generator=g) * 0.3 * (float(w.std()) if w.numel() > 1 else 0.3))
    if family == "mimo":
        mtp = {f"model.mtp_layers.{j}.{k}": v for j, layer in enumerate(ref.layers) for k, v in layer.hub().items()}
        config = {**cfg.to_dict(), "model_type": "mimo", "num_nextn_predict_layers": n_heads}
    else:
        mtp = {f"mtp.{k}": v for k, v in ref.state_dict().items()}
        config = cfg.to_dict()
    mtp = {k: v.detach().clone().contiguous() for k, v in mtp.items()}
    return hf, ref, config, trunk, mtp


def write_checkpoint(path, family: str, n_heads: int, vl: bool = False):
    """config.json + model.safetensors as the release stores them (vl: Qwen3.5's `model.language_model.*`, a
    vision tower weight, `mtp.*` at top level, the text config under text_config)."""
    hf, ref, config, trunk, mtp = make_target(family, n_heads)
    if vl:
        trunk = {k.replace("model.", "model.language_model.", 1): v for k, v in trunk.items()}
        trunk["model.visual.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
        config = {"model_type": "qwen3_5", "text_config": config}
    (path / "config.json").write_text(json.dumps(config))
    save_file({**trunk, **mtp}, str(path / "model.safetensors"))
    return hf, ref


@pytest.mark.parametrize("family", FAMILIES)
def test_head_logits_equal_reference(tmp_path, family):
    """Two heads (MiMo: two layers; Qwen3.5: two mtp.layers sharing fc and the norms): head j over a sequence, fed
    the target's hidden rows (j = 0) or head j-1's outputs, in chunks on its own cache == the reference's logits."""
    hf, ref = write_checkpoint(tmp_path, family, 2)
    target = load(str(tmp_path), tokenizer=False).model.eval()
    heads = nextn_drafter(target, "fp32").heads
    seq = torch.randint(0, V, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        h = hf(seq, output_hidden_states=True).hidden_states[-1]  # the final-norm hidden [1, 24, D]
        cache, prev_ours, prev_ref = heads.make_cache(1, 32, k_type="f32"), h[:, :-1], h[:, :-1]
        for j in range(2):
            toks, pos = seq[:, 1 + j:], torch.arange(1 + j, 24)[None]
            want = ref(hf, j, toks, prev_ref, pos)
            outs, p = [], 0
            for c in (9, 1, 4, 1, 8):
                c = min(c, toks.shape[1] - p)
                if c > 0:
                    outs.append(heads(j, toks[:, p:p + c], prev_ours[:, p:p + c], pos[:, p:p + c], cache,
                                      torch.tensor([0]), torch.tensor([1])))
                p += c
            out = torch.cat(outs, 1)
            err = (target.logits(out) - want).abs().max().item()
            assert err < TOL, f"head {j}: max abs err {err:.2e}"
            prev_ours, prev_ref = out[:, :-1], out[:, :-1]  # head j+1 pairs token q with head j's row q-1


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_holds_the_accepted_prefix(tmp_path, family):
    """After every round (k = 3: one head recurring; two heads chained), the heads' own plain K/V cache holds
    exactly the accepted prefix (== a from-scratch run); the target's hybrid cache rolled back within each verify."""
    for n_heads in (1, 2):
        write_checkpoint(tmp_path, family, n_heads)
        target = load(str(tmp_path), tokenizer=False).model.eval()
        drafter = nextn_drafter(target, "fp32")
        assert drafter.heads.n_heads == n_heads
        prompt = torch.randint(0, V, (6,), generator=torch.Generator().manual_seed(4)).tolist()
        checked = []

        def check(d, gen):
            seq = prompt + gen
            ref, outs = heads_from_scratch(target, d.heads, seq, 1)
            n = len(seq) - 1
            assert d.cache.lengths[0] == n
            for j in range(d.heads.n_heads):  # fp32 F.linear rows depend on the row count (verify vs scratch)
                assert torch.allclose(cache_rows(d.cache, j, n - j), cache_rows(ref, j, n - j), rtol=1e-4, atol=1e-5)
                assert torch.allclose(d._out[0][j], outs[j], rtol=1e-4, atol=1e-5)
            checked.append(n)

        tokens, rounds = tandem_rounds(target, drafter, prompt, 14, 3, check_cache=check)
        assert type(drafter.cache).__name__ == "KVCache" and len(checked) == len(rounds) > 0
        drafter.end(0)


def prompts(n: int, seed: int, lo: int = 1, hi: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen3_5", "mimo"])
def test_spec_equals_plain_engine_and_batch(tmp_path, family):
    """q8_0 target and heads, bf16 caches: speculative T=0 (k up to 4, one head recurring) == plain decoding on 60
    prompts through Engine.generate and the batch scheduler (4 slots); accepted and rejected rounds both occur."""
    write_checkpoint(tmp_path, family, 1)
    spec_equals_plain_60(tmp_path)


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square p-value of counts against probs; cells expected < 5 pooled into one."""
    n = counts.sum()
    exp = probs.double() * n
    small = exp < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    exp = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp > 0
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64),
                                         torch.tensor(chi2 / 2.0, dtype=torch.float64)))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nextn", "nextn_sample"])
def test_sampling_matches_target_distribution(tmp_path, method):
    """Qwen3.5 (recurrent state) + its nextn head at T = 1, top-k 3, k = 2: the first three tokens of 300 sampled
    speculative runs are distributed as the target's exact joint p(t1) p(t2 | t1) p(t3 | t1 t2) (the third one is
    often drafted after a rejected round, so it reads a rolled-back recurrent state); chi-square at alpha 1e-3."""
    write_checkpoint(tmp_path, "qwen3_5", 1)
    target = load(str(tmp_path), tokenizer=False).model.eval()
    eng = Engine(target, None, max_len=32, n_slots=1, drafter=nextn_drafter(target, "fp32"),
                 spec=SpecConfig(method=method, n_max=2), cache_type_k="f32")
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)  # a prompt whose drafts are often right
    prompt = max(prompts(8, 2, lo=3, hi=8), key=lambda p: eng.complete(p, greedy)[1].stats.spec.accepted)
    sp = dict(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)

    plain = Engine(target, None, max_len=32, cache_type_k="f32")

    def probs(ctx):
        return process_logits(plain.prefill(0, ctx).logits[:, -1], SamplingParams(**sp))[0]

    joint = {}
    p1 = probs(prompt)
    for t1 in p1.nonzero()[:, 0].tolist():
        p2 = probs(prompt + [t1])
        for t2 in p2.nonzero()[:, 0].tolist():
            p3 = probs(prompt + [t1, t2])
            for t3 in p3.nonzero()[:, 0].tolist():
                joint[(t1, t2, t3)] = float(p1[t1] * p2[t2] * p3[t3])
    cells = sorted(joint)
    counts, acc, drafted = torch.zeros(len(cells)), 0, 0
    for s in range(300):
        toks, fin = eng.complete(prompt, SamplingParams(**sp, seed=s))
        assert tuple(toks) in joint, toks
        counts[cells.index(tuple(toks))] += 1
        acc, drafted = acc + fin.stats.spec.accepted, drafted + fin.stats.spec.drafted
    assert drafted > acc > 20, (drafted, acc)  # rounds accepted and rejected
    assert chi2_pvalue(counts, torch.tensor([joint[c] for c in cells])) > 1e-3


def test_vl_layout_and_generate_names_the_drafter(tmp_path, capsys):
    """The VL release layout (`model.language_model.*`, vision tower skipped, `mtp.*`) loads its nextn head
    (== the text layout's), and `tandem generate` drafts with it and names it."""
    from tandem.cli import main

    text, vl = tmp_path / "text", tmp_path / "vl"
    for d, is_vl in ((text, False), (vl, True)):
        d.mkdir()
        write_checkpoint(d, "qwen3_5_moe", 1, vl=is_vl)
        save_tokenizer(d)
    a, b = (nextn_drafter(load(str(d), tokenizer=False).model, "fp32").heads for d in (text, vl))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    args = ["generate", "-p", "w5 w9 w17 w4", "-n", "8", "--ignore-eos", "-c", "64", "-ctk", "f32"]
    assert main(args + ["-m", str(vl), "--mtp-weight-format", "fp32"]) == 0
    err = capsys.readouterr().err  # the default chain names both drafters
    assert "drafter: chain ngram" in err and "-> nextn (1 MTP head, in-target, fp32) | draft acceptance" in err


@pytest.mark.parametrize("family", FAMILIES)
def test_no_mtp_weights_runs_plain(family, caplog):
    """A config declaring MTP layers whose checkpoint carries none: no drafter, and the log says so."""
    _, _, config, _, _ = make_target(family, 1)
    with caplog.at_level("INFO", logger="tandem.spec"):
        assert nextn_drafter(build(config)) is None
    assert "no MTP layers; no model drafter" in caplog.text
