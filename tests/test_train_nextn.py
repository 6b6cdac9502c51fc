"""`tandem train-nextn` on a tiny random llama target: training lowers the loss and raises held-out acceptance; the
unrolled training drafts are the run-time drafter's; the saved head (its own weights only, hub names) loads through
load_drafter(DIR) and spec == plain at T=0; a head trained for another target is refused, naming both."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tandem import kernels
from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine
from tandem.errors import ModelLoadError
from tandem.models.decoder import DecoderArgs, DecoderLM
from tandem.spec import load_drafter
from tandem.spec.drafter import DraftContext, PromptState
from tandem.spec.nextn import NextNDrafter
from tandem.train.data import DistillData, greedy_continue, teacher_pass
from tandem.train.nextn import chain_outputs, eval_head, head_losses, init_weights, save, trainable_head
from tandem.train.trainer import TrainConfig, train

V, L = 96, 2


def tiny_llama(seed=0, layers=L):
    torch.manual_seed(seed)
    args = DecoderArgs(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0)
    m = DecoderLM(args).eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(6.0)  # a peaked next-token distribution, as a trained LM has
    m.requires_grad_(False)
    return m


def make_data(target, n_seq, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, V, (int(torch.randint(3, 8, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_seq)]
    seqs = greedy_continue(target, prompts, seq_len)
    return teacher_pass(target, seqs, [], top_k=16, gen_start=[len(p) for p in prompts])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A head trained 60 steps on a tiny target, saved."""
    target = tiny_llama()
    weights = init_weights(target)
    train_data = DistillData.cat([make_data(target, 16, 32, s) for s in range(2)])
    eval_data = make_data(target, 8, 32, 99)
    heads = trainable_head(target, weights)
    before = eval_head(heads, target.embed, eval_data, 3)
    work = tmp_path_factory.mktemp("work")
    cfg = TrainConfig(steps=60, batch=4, lr=3e-3, warmup=5, negatives=V, eval_every=1000, ckpt_every=1000)
    E = target.lm_head.weight.detach()
    report = train(heads, target.embed, train_data, eval_data, cfg, work, resume=False, log=lambda *_: None,
                   losses=lambda *a: head_losses(*a, E=E), evaluate=eval_head)
    out = tmp_path_factory.mktemp("head")
    save(heads, target, "tiny-a", out, report)
    hist = json.loads((work / "train_history.json").read_text())
    return before, report["eval"], hist, out, target, heads, eval_data


def test_training_lowers_loss_and_raises_acceptance(trained):
    before, after, hist, *_ = trained
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    print(first, last, before, after)
    assert last < 0.8 * first, (first, last)
    assert after["mean_acceptance_length"] > before["mean_acceptance_length"] + 0.2, (before, after)


def test_saved_dir_holds_only_the_head(trained):
    out = trained[3]
    sd = load_file(str(out / "model.safetensors"))
    assert all(k.startswith(f"model.layers.{L}.") for k in sd), sorted(sd)
    assert {f"model.layers.{L}.eh_proj.weight", f"model.layers.{L}.self_attn.q_proj.weight",
            f"model.layers.{L}.shared_head.norm.weight"} <= set(sd)
    assert not any("embed_tokens" in k or "lm_head" in k or "shared_head.head" in k for k in sd)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["kind"] == "nextn" and cfg["target"]["name"] == "tiny-a" and cfg["target"]["num_hidden_layers"] == L


def test_training_drafts_are_the_run_time_drafts(trained):
    """chain_outputs' greedy drafts from start n == NextNDrafter.propose after begin() on the prompt t_0..t_{n-1}."""
    *_, out, target, heads, eval_data = trained
    drafter = load_drafter(str(out), target=tiny_llama(), weight_format="fp32", mtp_weight_format="fp32")
    drafter.heads.load_state_dict(heads.state_dict())  # the fp32 weights (the file is bf16)
    drafter.make_cache(1, 64, k_type="f32", v_type="f32", device="cpu")
    logits = drafter.target.logits
    checked = 0
    for b in range(3):
        tokens, hidden = eval_data.tokens[b:b + 1], eval_data.hidden[b:b + 1].float()
        with torch.no_grad():
            steps = {s: logits(y).argmax(-1)[0] for s, y, _ in
                     chain_outputs(heads, tokens, hidden, 3, lambda s, y: logits(y).argmax(-1))}
        for n in (3, 11, 20, 27):
            drafter.begin(0, PromptState(tokens[0, :n].tolist(), hidden[0, :n], None))
            ctx = DraftContext(0, int(tokens[0, n]), n, None, SamplingParams(temperature=0.0), k_max=3)
            got = drafter.propose([ctx])[0].tokens.tolist()
            drafter.end(0)
            want = [int(steps[0][n - 1]), int(steps[1][n - 1]), int(steps[2][n - 1])]
            assert got == want, (b, n, got, want)
            checked += 1
    assert checked == 12


@pytest.mark.parametrize("fmt", ["fp32", "q8_0"])
def test_loaded_head_drafts_losslessly(trained, fmt):
    out = trained[3]
    target = tiny_llama()
    if fmt != "fp32":
        kernels.prepare(target, fmt)
    drafter = load_drafter(str(out), target=target, weight_format=fmt)
    assert isinstance(drafter, NextNDrafter) and drafter.heads.n_heads == 1
    eng = Engine(target, None, max_len=64, n_slots=2, drafter=drafter, spec=SpecConfig(n_max=3),
                 cache_type_k="f32" if fmt == "fp32" else "bf16")
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, V, (int(torch.randint(2, 10, (1,), generator=g)),), generator=g).tolist()
               for _ in range(5)]
    plain = [eng.complete(p, sp, spec=SpecConfig(enabled=False))[0] for p in prompts]
    fins = [eng.complete(p, sp) for p in prompts]
    assert [t for t, _ in fins] == plain
    assert sum(f.stats.spec.accepted for _, f in fins) > 0


def test_head_for_another_target_is_refused(trained):
    out = trained[3]
    other = SimpleNamespace(path="tiny-b", tokenizer=None)
    for target in (tiny_llama(seed=1), tiny_llama(layers=3)):
        with pytest.raises(ModelLoadError) as e:
            load_drafter(str(out), target=target, target_loaded=other, weight_format="fp32")
        assert "tiny-a" in str(e.value) and "tiny-b" in str(e.value), e.value
        assert not getattr(target, "nextn_weights", None)  # nothing attached
