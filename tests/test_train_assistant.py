"""Drafter training on a tiny random target: loss falls, acceptance rises far above an untrained assistant's,
and the saved directory loads back (tandem format) and exports for transformers."""

import json

import pytest
import torch

from tandem.models import gemma3
from tandem.train.assistant_init import assistant_config, build_assistant
from tandem.train.clusters import balanced_kmeans
from tandem.train.data import DistillData, greedy_continue, teacher_pass
from tandem.train.trainer import TrainConfig, eval_acceptance, train


def tiny_target(seed=0):
    torch.manual_seed(seed)
    args = gemma3.ModelArgs(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                            sliding_window=16, layer_types=["sliding_attention", "full_attention"])
    m = gemma3.Model(args).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.normal_(0, 0.3)
    m.requires_grad_(False)
    return m


def make_data(target, n_seq, seq_len, seed):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 256, (int(torch.randint(4, 9, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n_seq)]
    seqs = greedy_continue(target, prompts, seq_len)
    layers = sorted({target.last_layer_of_type(t) for t in ("sliding_attention", "full_attention")})
    return teacher_pass(target, seqs, layers, top_k=16, gen_start=[len(p) for p in prompts])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    target = tiny_target()
    train_data = DistillData.cat([make_data(target, 16, 48, s) for s in range(4)])
    eval_data = make_data(target, 16, 48, 99)
    cfg = assistant_config(target, layers=2, intermediate=128, centroids=8, top_k_clusters=2)
    embed = target.model.embed_tokens.weight.detach().clone()
    return target, train_data, eval_data, cfg, embed, tmp_path_factory.mktemp("asst")


def test_training_raises_acceptance(setup):
    target, train_data, eval_data, cfg, embed, out = setup
    asst = build_assistant(cfg, target, embed, seed=0)
    order, cent = balanced_kmeans(embed, 8, log=lambda *_: None)
    asst.masked_embedding.token_ordering.copy_(order)
    with torch.no_grad():
        asst.masked_embedding.centroids.weight.copy_(cent * 4)
    cluster_of = torch.empty_like(order)
    cluster_of[order] = torch.arange(256) // 32
    before = eval_acceptance(asst, target.embed, eval_data, 3)
    report = train(asst, target.embed, train_data, eval_data,
                   TrainConfig(steps=300, batch=8, lr=3e-3, warmup=20, eval_every=1000, ckpt_every=1000), out,
                   cluster_of, resume=False, log=lambda *_: None)
    after = report["eval"]
    hist = json.loads((out / "train_history.json").read_text())
    first = sum(h["loss"] for h in hist[:10]) / 10
    last = sum(h["loss"] for h in hist[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert after["accept_cumulative"][0] > before["accept_cumulative"][0] + 0.3, (before, after)
    assert after["mean_acceptance_length"] > before["mean_acceptance_length"] + 0.5, (before, after)


def test_cluster_ordering_is_a_balanced_permutation():
    w = torch.randn(512, 16)
    order, cent = balanced_kmeans(w, 16, iters=2, log=lambda *_: None)
    assert sorted(order.tolist()) == list(range(512))
    assert cent.shape == (16, 16)


def test_init_from_target_copies_the_layers_it_reads():
    """--init target: each assistant layer is the target layer whose cache it reads, the score scale folded into
    q_norm (the assistant attends with scale 1), Gemma 3's (1 + w) norms turned into plain multipliers."""
    from tandem.train.assistant_init import init_from_target
    target = tiny_target()
    cfg = assistant_config(target, layers=2, intermediate=128, centroids=0)
    asst = build_assistant(cfg, target, target.model.embed_tokens.weight.detach(), seed=0)
    assert init_from_target(asst, target) == [0, 1]
    for layer, i in zip(asst.model.layers, (0, 1)):
        src = target.model.layers[i]
        assert torch.equal(layer.self_attn.q_proj.weight, src.self_attn.q_proj.weight)
        assert torch.equal(layer.mlp.down_proj.weight, src.mlp.down_proj.weight)
        q = torch.randn(5, 32)
        torch.testing.assert_close(layer.self_attn.q_norm(q), src.self_attn.q_norm(q) * src.self_attn.scale)
        x = torch.randn(5, 64)
        torch.testing.assert_close(layer.input_layernorm(x), src.input_layernorm(x))
    x = torch.randn(5, 64)
    torch.testing.assert_close(asst.model.norm(x), target.model.norm(x))


def test_init_from_continues_a_saved_drafter(setup, tmp_path):
    """--init-from: a saved drafter comes back with the same weights and clusters (bf16 as shipped), so training
    can continue from it; a drafter that does not fit is refused by name."""
    from tandem.errors import ModelLoadError
    from tandem.train import assistant_io
    target, _, eval_data, cfg, embed, _ = setup
    asst = build_assistant(cfg, target, embed, seed=3)
    order, _ = balanced_kmeans(embed, 8, log=lambda *_: None)
    asst.masked_embedding.token_ordering.copy_(order)
    assistant_io.save(asst, cfg, tmp_path / "d", {})
    cfg2, sd = assistant_io.load_for_training(str(tmp_path / "d"))
    assert cfg2 == cfg
    warm = build_assistant(cfg2, target, embed, seed=0)
    assistant_io.load_weights(warm, sd, "d")
    for k, v in asst.state_dict().items():
        got = warm.state_dict()[k]
        shared = k in ("model.embed_tokens.weight", "lm_head.weight")  # the target's, never saved
        want = v if not v.is_floating_point() or shared else v.to(torch.bfloat16).float()
        assert torch.equal(got, want), k
    assert torch.equal(warm.masked_embedding.token_ordering, order)
    other = build_assistant(assistant_config(target, layers=2, intermediate=64, centroids=8, top_k_clusters=2),
                            target, embed, seed=0)
    with pytest.raises(ModelLoadError, match="shape mismatch.*mlp"):
        assistant_io.load_weights(other, sd, "d")
    with pytest.raises(ModelLoadError, match="config.json missing"):
        assistant_io.load_for_training(str(tmp_path))


def test_init_from_conflicts_with_init_target(tmp_path, capsys):
    from tandem.cli import main
    rc = main(["train-assistant", "--out", str(tmp_path / "o"), "--init-from", str(tmp_path), "--init", "target"])
    assert rc == 2 and "--init-from and --init target" in capsys.readouterr().err
