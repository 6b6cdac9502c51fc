"""train-eagle3's pieces on a tiny random target (fp32): the training-time test unrolls exactly the run-time
drafting (the reference EAGLE-3 forward of tests/test_eagle3.py), teacher shards stream back, and a short training
run raises the held-out acceptance."""

import json

import pytest
import torch

pytest.importorskip("transformers")
from tandem.loading.eagle3 import load_eagle3  # noqa: E402
from tandem.train.data import greedy_continue  # noqa: E402
from tandem.train.eagle3 import (ShardData, Windows, draft_vocab, eval_acceptance, new_head,  # noqa: E402
                                 teacher_shards, ttt_losses, ttt_outputs)
from tandem.train.trainer import TrainConfig, train  # noqa: E402
from tests.test_eagle3 import AUX, D, L, V, RefHead, hf_aux, pair, prompts, write_head  # noqa: E402,F401


def test_training_time_test_is_runtime_drafting(pair, tmp_path):
    """Row i of step s (fed its own drafts) == the reference drafts from anchor i (the engine's drafts)."""
    ref, ours = pair
    t = write_head(tmp_path / "head")
    head = load_eagle3(tmp_path / "head", L, D, V)
    rh = RefHead(t, ours.model.embed_tokens.weight.detach())
    seq, S = prompts(1, 5, 12, 13)[0], 3
    aux = hf_aux(ref, seq)
    drafts = lambda y: head.to_target(head.logits(y).argmax(-1))  # noqa: E731
    with torch.no_grad():
        got = [drafts(y[:, :len(seq) - S])[0] for _, y in
               ttt_outputs(head, ours.embed, torch.tensor([seq]), aux[None], S, drafts)]
    for i in range(len(seq) - S):
        assert [int(g[i]) for g in got] == rh.drafts(seq[1:i + 2], aux[:i + 1], S), i


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_teacher_shards_stream_and_training_raises_acceptance(pair, tmp_path, monkeypatch, autocast):
    _, ours = pair
    import tandem.train.eagle3 as te
    monkeypatch.setattr(te, "SHARD", 4)
    ours.aux_layers = AUX
    T = 24
    text = [p + p for p in prompts(12, 7, 12, 13)]  # repetitive text: something to learn
    gen = greedy_continue(ours, [p[:4] for p in prompts(12, 8, 4, 5)], T)
    train_w = Windows(text[:8] + gen[:8], [T] * 8 + [4] * 8, ["text"] * 8 + ["regenerated"] * 8)
    held_w = Windows(gen[8:], [4] * 4, ["regenerated"] * 4)
    files = teacher_shards(ours, train_w, tmp_path, "train", 8, 3)
    held = teacher_shards(ours, held_w, tmp_path, "heldout", 8, 3)
    assert len(files) == 4 and teacher_shards(ours, train_w, tmp_path, "train", 8, 3) == files  # resumed: kept
    assert te.timing(tmp_path)["teacher_train"]["tokens"] == 16 * T  # measured once, not again when resumed
    data = ShardData(files)
    b = data.subset(torch.tensor([0, 13]))
    assert len(data) == 16 and b.tokens.tolist() == [train_w.ids[0], train_w.ids[13]]
    assert b.aux.shape == (2, T, 3 * D) and b.top_ids.shape == (2, T, 8) and b.start.tolist() == [T, 4]
    vocab, cover = draft_vocab(train_w, 12, V)
    assert len(vocab) == 12 and 0.75 < cover <= 1
    head = new_head(ours, vocab, 64, 0).train()
    head.requires_grad_(True)
    to_draft = torch.full((V,), -1, dtype=torch.long)
    to_draft[head.to_target(torch.arange(len(vocab)))] = torch.arange(len(vocab))
    before = eval_acceptance(head.eval(), ours.embed, ShardData(held), 3)
    cfg = TrainConfig(steps=60, batch=4, draft_steps=3, lr=3e-3, warmup=5, eval_every=60, ckpt_every=30,
                      loss_top_k=8, autocast=autocast)
    rep = train(head.train(), ours.embed, data, ShardData(held), cfg, tmp_path / "work", log=lambda *_: None,
                losses=lambda *a: ttt_losses(*a, to_draft=to_draft), evaluate=eval_acceptance)
    ours.aux_layers = ()
    after = rep["eval"]
    assert after["rows_exact"] > 0 and before["rows_exact"] == after["rows_exact"]
    assert after["mean_acceptance_length"] > before["mean_acceptance_length"] + 0.2, (before, after)
    assert rep["final"]["loss"] < rep["loss_first"]


@pytest.mark.slow
def test_cli_end_to_end_on_a_real_model(tmp_path, capsys):
    """`tandem train-eagle3` on SmolLM2 (code/docs windows, a few steps): the public-layout head, its report and
    TRAINING.md are written, the stage times are measured, and the head loads as its target's drafter."""
    from tandem import loading
    from tandem.cli import main
    from tandem.spec import load_drafter

    out = tmp_path / "head"
    assert main(["train-eagle3", "--target", "smollm2-135m-instruct", "--weight-format", "native", "--out", str(out),
                 "--seq-len", "64", "--n-text", "4", "--n-gen", "0", "--n-eval", "2", "--draft-vocab", "512",
                 "--intermediate", "128", "--steps", "4", "--batch", "2", "--eval-every", "2", "--threads", "1"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["data"]["teacher_tokens"] == (4 + 2) * 64 and rep["data"]["teacher_s"] > 0
    assert rep["command"].startswith("tandem train-eagle3") and "Held-out acceptance" in (out / "TRAINING.md").read_text()
    target = loading.load("smollm2-135m-instruct").model
    d = load_drafter(str(out), target=target)
    assert d.kind == "eagle3" and d.head.args.draft_vocab_size == 512
