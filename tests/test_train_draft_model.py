"""`tandem train-draft-model` on a tiny random llama target (an HF directory with a word-level tokenizer): the
truncated model's hidden state is the target's after its first N layers; the saved directory loads through
load_drafter(DIR) as kind draft-model (vocabulary check with both tokenizers) and spec == plain at T=0; a few
distillation steps with the shared trainer lower the loss and raise held-out acceptance; a bad --layers is refused."""

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel

from tandem import loading
from tandem.config import SamplingParams, SpecConfig
from tandem.engine import Engine
from tandem.errors import ConfigError
from tandem.spec import DraftModelDrafter, load_drafter
from tandem.train.data import DistillData, greedy_continue, teacher_pass
from tandem.train.draft_model import check_saved, draft_losses, eval_draft, save, truncate
from tandem.train.trainer import TrainConfig, train

V, L, N = 64, 4, 2


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny random Llama saved by transformers, with a word-level tokenizer; loaded as tandem loads any HF dir."""
    from transformers import LlamaConfig, LlamaForCausalLM
    d = tmp_path_factory.mktemp("target")
    cfg = LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=L, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
                      bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.25)
        m.model.embed_tokens.weight.mul_(6.0)  # a peaked next-token distribution, as a trained LM has
    m.save_pretrained(str(d))
    HFTokenizer(WordLevel({f"w{i}": i for i in range(V)}, unk_token="w3")).save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w2", "eos_token": "w1", "pad_token": "w0"}))
    return loading.load(str(d), dtype=torch.float32)


def _prompts(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, V, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def test_truncation_keeps_the_targets_first_layers(target):
    draft, cfg = truncate(target.model, target.config, N)
    assert cfg["num_hidden_layers"] == N and target.config["num_hidden_layers"] == L
    assert len(draft.model.layers) == N and draft.lm_head.weight is draft.model.embed_tokens.weight
    seen = {}
    hook = target.model.model.layers[N - 1].register_forward_hook(lambda m, i, o: seen.update(x=o))
    toks = torch.tensor([_prompts(1, 0)[0] * 3])
    pos = torch.arange(toks.shape[1])[None]
    try:
        target.model(toks, pos, target.model.make_cache(1, 64, k_type="f32"), logit_rows=slice(0, 0))
    finally:
        hook.remove()
    h = draft(toks, pos, draft.make_cache(1, 64, k_type="f32"), logit_rows=slice(0, 0)).hidden
    assert torch.equal(h, target.model.model.norm(seen["x"]))
    with pytest.raises(ConfigError, match=r"--layers 4: .*num_hidden_layers = 4"):
        truncate(target.model, target.config, L)


def _data(model, prompts, seq_len=40):
    seqs = greedy_continue(model, prompts, seq_len)
    return teacher_pass(model, seqs, [], top_k=16, gen_start=[len(p) for p in prompts])


@pytest.fixture(scope="module")
def trained(target, tmp_path_factory):
    """The N-layer draft model distilled 40 steps on the target's own generations, saved as a directory."""
    draft, cfg = truncate(target.model, target.config, N)
    train_data = DistillData.cat([_data(target.model, _prompts(16, s)) for s in range(2)])
    eval_data = _data(target.model, _prompts(8, 99))
    tcfg = TrainConfig(steps=30, batch=4, lr=3e-3, warmup=3, negatives=V, draft_steps=3, eval_every=1000,
                       ckpt_every=1000)
    # held-out loss with every other token as a negative: the full-vocabulary cross-entropy to the teacher's top-K
    held_out = torch.no_grad()(lambda: float(draft_losses(draft, None, eval_data, tcfg, None, torch.arange(V))[0]))
    before = held_out(), eval_draft(draft, None, eval_data, 3)
    for n, p in draft.named_parameters():
        p.requires_grad_("embed_tokens" not in n and "lm_head" not in n)
    work = tmp_path_factory.mktemp("work")
    report = train(draft, None, train_data, eval_data, tcfg, work, resume=False, log=lambda *_: None,
                   losses=draft_losses, evaluate=eval_draft)
    draft.requires_grad_(False)
    after = held_out(), report["eval"]
    out = tmp_path_factory.mktemp("draft")
    save(draft.eval(), cfg, target.tokenizer, target.chat_template, out, report)
    check_saved(out, draft, target.model, target.tokenizer, "target")
    return before, after, out, draft


def test_distillation_lowers_the_loss(trained):
    (loss0, ev0), (loss1, ev1), *_ = trained
    assert loss1 < loss0 - 0.05, (loss0, loss1)
    assert ev1["mean_acceptance_length"] > ev0["mean_acceptance_length"], (ev0, ev1)


def test_saved_dir_loads_as_a_draft_model_and_is_lossless(trained, target):
    *_, out, draft = trained
    d = load_drafter(str(out), target=target.model, target_loaded=target, weight_format="fp32")
    assert isinstance(d, DraftModelDrafter) and d.kind == "draft-model"
    assert all(torch.equal(a, b) for a, b in zip(d.model.state_dict().values(), draft.state_dict().values()))
    eng = Engine(target.model, max_len=96, drafter=d, spec=SpecConfig(method="draft", n_max=4, adaptive=False))
    plain = Engine(target.model, max_len=96)
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    drafted = 0
    for p in _prompts(6, 7):
        got, fin = eng.complete(p, greedy)
        assert got == plain.complete(p, greedy)[0], p
        drafted += fin.stats.spec.drafted
    assert drafted > 0
