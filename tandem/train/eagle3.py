"""`tandem train-eagle3`: an EAGLE-3 head (tandem.models.eagle3) for a target, trained on this machine.

Teacher = the target's forward passes (prefill speed) over broad text packed into windows of --seq-len tokens:
ShareGPT conversations rendered with the target's chat template (tandem.sharegpt.split drops the conversations
reserved for evaluation), code and docs (tandem.train.corpus), and the target's own greedy answers to ShareGPT
first turns. Each window's aux hidden states (bf16) and the teacher's top-K go to shard files on disk, written once
(collection resumes where it stopped); training streams batches from them (trainer.train: resumable checkpoints).
A held-out split of the same sources gives the per-position acceptance during training.

Training-time test (as EAGLE-3 trains and as tandem.spec.eagle3 drafts): step 0 runs every row i = (t_{i+1},
fc(a_i)) at position i; step s feeds row i the token t_{i+1+s} with its own step s-1 output at position i+s,
attending step 0's rows <= i plus its own chain (train.nextn.ChainKV). Loss: cross-entropy of the draft
vocabulary's logits against the teacher's top-K restricted to it. Draft vocabulary: the training windows' most
frequent target tokens (d2t / t2d); lm_head starts as the target's rows for them, norm as its final norm.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from tandem.models.eagle3 import Eagle3, Eagle3Args, default_aux_layers
from tandem.train.data import greedy_continue, text_windows
from tandem.train.nextn import ChainKV
from tandem.train.trainer import TrainConfig

SHARD = 16  # windows per teacher shard


@dataclass
class Windows:
    """Token windows of one split, each seq_len long; start[i]: the first token the target generated itself."""

    ids: list[list[int]]
    start: list[int]
    source: list[str]


def _pack(seqs, seq_len: int, n: int) -> list[list[int]]:
    """Token sequences concatenated and cut into n windows of seq_len (the tail that does not fill one dropped)."""
    out, buf = [], []
    for s in seqs:
        buf += s
        while len(buf) >= seq_len and len(out) < n:
            out.append(buf[:seq_len])
            buf = buf[seq_len:]
        if len(out) >= n:
            break
    return out


def chat_windows(a, tokenizer, template, log=print):
    """(train conversations' windows, held-out ones, prompts to regenerate (train), (held-out)) from ShareGPT."""
    from tandem.sharegpt import split

    train, reserved = split(a.sharegpt)
    log(f"ShareGPT {a.sharegpt}: {len(train)} conversations for training, dropped {len(reserved)} reserved for "
        "evaluation (shared/eval-exclude)")
    random.Random(a.seed).shuffle(train)
    n_held = max(1, len(train) // 50)
    held, train = train[:n_held], train[n_held:]
    render = lambda c: tokenizer.encode(template.render(c.messages, add_generation_prompt=False),  # noqa: E731
                                        add_special_tokens=False)
    ask = lambda c: tokenizer.encode(template.render([{"role": "user", "content": c.first_user}]),  # noqa: E731
                                     add_special_tokens=False)
    tr = _pack(map(render, train), a.seq_len, a.n_chat)
    he = _pack(map(render, held), a.seq_len, a.n_eval)
    return tr, he, _prompts(map(ask, reversed(train)), a.n_gen, a.seq_len), _prompts(map(ask, held), a.n_eval,
                                                                                      a.seq_len)


def _prompts(rendered, n: int, seq_len: int) -> list[list[int]]:
    """The first n whole rendered prompts (generation header included) that leave half the window to answer."""
    out = []
    for ids in rendered if n else ():
        if len(ids) <= seq_len // 2:
            out.append(ids)
            if len(out) == n:
                break
    return out


def build_windows(a, target, tokenizer, template, corpus, work: Path, log=print) -> dict[str, Windows]:
    """The train / heldout windows, made once and kept in work/windows.json (the run resumes with the same)."""
    path = work / "windows.json"
    if path.exists():
        return {k: Windows(**v) for k, v in json.loads(path.read_text()).items()}
    t0 = time.time()
    tr, he, gen_tr, gen_he = chat_windows(a, tokenizer, template, log) if a.sharegpt else ([], [], [], [])
    text = text_windows(tokenizer, corpus, a.n_text + a.n_eval, a.seq_len, a.seed)
    out = {"train": Windows(tr + text[:a.n_text], [a.seq_len] * (len(tr) + len(text[:a.n_text])),
                            ["chat"] * len(tr) + ["text"] * len(text[:a.n_text])),
           "heldout": Windows(he + text[a.n_text:], [a.seq_len] * (len(he) + len(text[a.n_text:])),
                              ["chat"] * len(he) + ["text"] * len(text[a.n_text:]))}
    for split, prompts in (("train", gen_tr), ("heldout", gen_he)):  # the target's own answers
        for i in tqdm(range(0, len(prompts), a.gen_batch), desc=f"regenerate {split}", unit="batch"):
            ps = prompts[i:i + a.gen_batch]
            out[split].ids += greedy_continue(target, ps, a.seq_len)
            out[split].start += [len(p) for p in ps]
            out[split].source += ["regenerated"] * len(ps)
    log(f"windows: {({k: len(w.ids) for k, w in out.items()})} x {a.seq_len} tokens in {time.time() - t0:.0f}s")
    path.write_text(json.dumps({k: vars(w) for k, w in out.items()}))
    _add_time(work, "windows", 0, time.time() - t0)
    return out


def timing(work: Path) -> dict:
    """Measured stage times of the run so far, over all its sessions: windows (regeneration), teacher_<split>."""
    f = work / "timing.json"
    return json.loads(f.read_text()) if f.exists() else {}


def _add_time(work: Path, stage: str, tokens: int, seconds: float) -> None:
    """Accumulate a stage's measured tokens and seconds in work/timing.json (a resumed run adds to it)."""
    t = timing(work)
    old = t.get(stage, {"tokens": 0, "seconds": 0.0})
    t[stage] = {"tokens": old["tokens"] + tokens, "seconds": round(old["seconds"] + seconds, 1)}
    (work / "timing.json").write_text(json.dumps(t, indent=1))


@torch.inference_mode()
def teacher_shards(target, w: Windows, work: Path, split: str, top_k: int, batch: int, log=print) -> list[Path]:
    """Shards work/teacher/{split}-NNNNN.safetensors: tokens, aux (bf16), top_ids (int32), top_logp (fp16), start;
    a shard already on disk is kept (resume). Logs the teacher's tokens/s."""
    d = work / "teacher"
    d.mkdir(parents=True, exist_ok=True)
    files, done, t0 = [], 0, time.time()
    for s in tqdm(range(0, len(w.ids), SHARD), desc=f"teacher {split}", unit="shard"):
        f = d / f"{split}-{s // SHARD:05d}.safetensors"
        files.append(f)
        if f.exists():
            continue
        parts, t_shard = {"tokens": [], "aux": [], "top_ids": [], "top_logp": []}, time.time()
        for b in range(s, min(s + SHARD, len(w.ids)), batch):
            seqs = w.ids[b:min(b + batch, s + SHARD, len(w.ids))]
            B, T = len(seqs), len(seqs[0])
            toks = torch.tensor(seqs)
            out = target(toks, torch.arange(T).expand(B, T), target.make_cache(B, T, k_type="f32"),
                         torch.arange(B), logit_rows=slice(0, 0))
            for i in range(B):  # [T, V] logits one sequence at a time
                v, idx = torch.log_softmax(target.logits(out.hidden[i]).float(), -1).topk(top_k, -1)
                parts["top_ids"].append(idx.int())
                parts["top_logp"].append(v.half())
            parts["tokens"].append(toks)
            parts["aux"].append(out.aux.to(torch.bfloat16))
            done += B * T
        t = {k: (torch.cat(v) if k in ("tokens", "aux") else torch.stack(v)).contiguous() for k, v in parts.items()}
        t["start"] = torch.tensor(w.start[s:s + SHARD], dtype=torch.long)
        save_file(t, str(f))
        _add_time(work, f"teacher_{split}", int(t["tokens"].numel()), time.time() - t_shard)
    if done:
        log(f"teacher {split}: {done} tokens in {time.time() - t0:.0f}s ({done / (time.time() - t0):.0f} tokens/s)")
    return files


@dataclass
class Batch:
    tokens: torch.Tensor  # [B, T]
    aux: torch.Tensor  # [B, T, n * Dt] bf16
    top_ids: torch.Tensor  # [B, T, K] int32: the teacher's top-K next tokens at each position
    top_logp: torch.Tensor  # [B, T, K] fp16
    start: torch.Tensor  # [B]


class ShardData:
    """Teacher windows streamed from shard files (read per batch, memory-mapped)."""

    def __init__(self, files: list[Path]):
        self.rows = []
        for f in files:
            with safe_open(str(f), "pt") as h:
                self.rows += [(f, r) for r in range(h.get_slice("tokens").get_shape()[0])]

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, idx) -> Batch:
        cols: dict[str, list] = {k: [] for k in Batch.__dataclass_fields__}
        for i in idx.tolist() if torch.is_tensor(idx) else idx:
            f, r = self.rows[i]
            with safe_open(str(f), "pt") as h:
                for k in cols:
                    cols[k].append(h.get_slice(k)[r:r + 1])
        return Batch(**{k: torch.cat(v) for k, v in cols.items()})


def ttt_outputs(head: Eagle3, embed, tokens: torch.Tensor, aux: torch.Tensor, steps: int, drafts=None):
    """Step 0 over rows 0..T-2, then steps 1..steps-1 over rows 0..T-1-steps. tokens [B, T], aux [B, T, n*Dt];
    drafts(y) -> the target ids fed to the next step [B, N] (None: the data's tokens). Yields (s, out [B, R, D])."""
    B, T = tokens.shape
    kv, slots = ChainKV(), torch.arange(B)
    y = head(embed(tokens[:, 1:]).float(), head.fuse(aux[:, :-1].float()), torch.arange(T - 1).expand(B, -1), kv,
             slots)
    yield 0, y
    N = T - steps
    prev = y[:, :N]
    for s in range(1, steps):
        kv.step = s
        toks = tokens[:, 1 + s:N + 1 + s] if drafts is None else drafts(prev)
        prev = head(embed(toks).float(), prev, torch.arange(s, N + s).expand(B, -1), kv, slots)
        yield s, prev


def ttt_losses(head: Eagle3, embed, batch: Batch, cfg: TrainConfig, cluster_of, neg_ids, *,
               to_draft: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """trainer.train's loss hook: weighted cross-entropy of every unrolled step against the teacher's top-K
    restricted to the draft vocabulary (to_draft [V]: draft id of each target id, -1 outside)."""
    total, stats = 0.0, {}
    for s, y in ttt_outputs(head, embed, batch.tokens, batch.aux, cfg.draft_steps):
        rows = slice(1 + s, 1 + s + y.shape[1])  # row i predicts token i+2+s: the teacher at position i+1+s
        ids = batch.top_ids[:, rows, :cfg.loss_top_k].long()
        d = to_draft[ids]
        p = torch.softmax(batch.top_logp[:, rows, :cfg.loss_top_k].float().masked_fill(d < 0, float("-inf")), -1)
        ok = (d >= 0).any(-1)  # rows whose teacher keeps some mass in the draft vocabulary
        logits = head.logits(y)  # [B, R, Vd]
        logq = torch.log_softmax(logits, -1).gather(-1, d.clamp(min=0))
        loss = -((torch.nan_to_num(p) * logq).sum(-1) * ok).sum() / ok.sum().clamp(min=1)
        acc = head.to_target(logits.argmax(-1)) == ids[..., 0]
        total = total + cfg.step_weights[min(s, len(cfg.step_weights) - 1)] * loss
        stats[f"loss{s}"], stats[f"acc{s}"] = float(loss.detach()), float(acc.float().mean())
    return total, stats


@torch.no_grad()
def eval_acceptance(head: Eagle3, embed, data: ShardData, draft_steps: int) -> dict:
    """Greedy drafting as at run time on the held-out windows, a draft counted while it equals the target's argmax:
    over the target's own answers (accept_cumulative, exact: every later token is the target's argmax) and the
    first draft over all held-out text (accept_first_all)."""
    alive_sum, rows, first, n_all = torch.zeros(draft_steps), 0, 0, 0
    for b in range(len(data)):
        x = data.subset([b])
        T = x.tokens.shape[1]
        N = T - draft_steps
        i = torch.arange(N)
        alive = (i + 2 >= x.start[0])[None]  # every token the chain drafts is the target's own greedy token
        rows += int(alive.sum())
        drafts = lambda y: head.to_target(head.logits(y).argmax(-1))  # noqa: E731
        for s, y in ttt_outputs(head, embed, x.tokens, x.aux, draft_steps, drafts):
            d = drafts(y[:, :N])
            hit = d == x.top_ids[:, 1 + s:1 + s + N, 0].long()
            if s == 0:
                first, n_all = first + int(hit.sum()), n_all + N
            alive = alive & hit
            alive_sum[s] += alive.sum()
    per_pos = (alive_sum / max(rows, 1)).tolist()
    cond = [per_pos[0]] + [per_pos[j] / per_pos[j - 1] if per_pos[j - 1] else 0.0 for j in range(1, draft_steps)]
    return {"accept_cumulative": [round(v, 4) for v in per_pos], "accept_conditional": [round(v, 4) for v in cond],
            "mean_acceptance_length": round(1 + sum(per_pos), 4), "rows_exact": rows,
            "accept_first_all": round(first / max(n_all, 1), 4)}


def new_head(target, vocab: torch.Tensor, intermediate: int, seed: int) -> Eagle3:
    """A head shaped like the target's layers (MLP `intermediate` wide), draft vocabulary `vocab` (target ids);
    lm_head starts as the target's rows for them and norm as the target's final norm."""
    t = target.args
    args = Eagle3Args.from_dict({
        "hidden_size": t.hidden_size, "intermediate_size": intermediate, "num_attention_heads": t.num_attention_heads,
        "num_key_value_heads": t.num_key_value_heads, "head_dim": t.head_dim, "hidden_act": t.hidden_act,
        "rms_norm_eps": t.rms_norm_eps, "rope_parameters": t.rope(),
        "max_position_embeddings": t.max_position_embeddings,
        "vocab_size": t.vocab_size, "draft_vocab_size": len(vocab), "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id})
    torch.manual_seed(seed)
    head = Eagle3(args, default_aux_layers(t.num_hidden_layers))
    head.set_vocab(vocab)
    w = target.lm_head
    rows = (w.dequantized_weight() if hasattr(w, "dequantized_weight") else w.weight).detach().float()
    with torch.no_grad():
        head.lm_head.weight.copy_(rows[head.to_target(torch.arange(len(vocab)))])
        head.norm.weight.copy_(target.model.norm.weight.detach().float())
    return head


def draft_vocab(w: Windows, size: int, vocab_size: int) -> tuple[torch.Tensor, float]:
    """The `size` most frequent target tokens of the windows, and the share of tokens they cover."""
    counts = torch.bincount(torch.tensor(w.ids).flatten(), minlength=vocab_size)
    top = counts.topk(min(size, vocab_size)).indices
    return top, float(counts[top].sum() / counts.sum())


def training_md(report: dict) -> str:
    """TRAINING.md: data, token counts, steps, wall time and the held-out acceptance curve."""
    ev, d = report.get("eval") or {}, report["data"]
    curve = [(h["step"], h["eval"]["accept_cumulative"]) for h in report.get("history_eval", [])]
    lines = ["# EAGLE-3 head: training record", "", f"Command: `{report['command']}`", "",
             f"Target: {report['target']} (aux layers {report['aux_layers']})", "",
             "## Data", "", f"- windows x {d['seq_len']} tokens: train {d['train_windows']} "
             f"({d['train_by_source']}), held out {d['heldout_windows']} ({d['heldout_by_source']})",
             f"- ShareGPT: {d.get('sharegpt')}", f"- draft vocabulary {d['draft_vocab']} tokens, covering "
             f"{100 * d['vocab_coverage']:.1f} % of the training tokens", f"- teacher: {d['teacher_tokens']} tokens "
             f"at {d['teacher_tokens_per_s']} tokens/s, {d.get('teacher_s')} s (top-{d['top_k']}, aux hidden states "
             f"bf16); windows with the target's regenerated answers: {d.get('windows_s')} s", "",
             "## Training", "", f"- {report['config']['steps']} steps x batch {report['config']['batch']}, "
             f"{report['config']['draft_steps']} unrolled steps, {report['wall_s']} s "
             f"({report['steps_per_s']} steps/s); total wall {report['total_wall_s']} s", "",
             "## Held-out acceptance (exact on the target's own answers)", "",
             f"- per position (cumulative): {ev.get('accept_cumulative')}",
             f"- conditional: {ev.get('accept_conditional')}; mean length {ev.get('mean_acceptance_length')}",
             f"- first draft == target argmax over all held-out text: {ev.get('accept_first_all')}", "",
             "| step | cumulative acceptance per position |", "|---|---|"]
    lines += [f"| {s} | {c} |" for s, c in curve]
    return "\n".join(lines) + "\n"


def cmd_train_eagle3(a) -> int:
    from collections import Counter

    from tandem import kernels
    from tandem.chat import template_for
    from tandem.loading.eagle3 import save_eagle3
    from tandem.spec.nextn_dir import target_fingerprint
    from tandem.train import load_target, run_report
    from tandem.train.corpus import Corpus
    from tandem.train.trainer import train

    out = Path(a.out)
    loaded, t_start = load_target(a)
    target, tok = loaded.model, loaded.tokenizer
    kernels.prepare(target, a.weight_format)  # teacher passes with the weights the head will be verified against
    target.aux_layers = default_aux_layers(target.args.num_hidden_layers)
    work = Path(a.work_dir) if a.work_dir else out.parent / f".{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    corpus = Corpus.from_sources(a.data or ["stdlib"])
    wins = build_windows(a, target, tok, template_for(loaded, tok), corpus, work)
    vocab, coverage = draft_vocab(wins["train"], a.draft_vocab, target.args.vocab_size)
    files = {k: teacher_shards(target, w, work, k, a.top_k, a.teacher_batch) for k, w in wins.items()}
    head = new_head(target, vocab, a.intermediate or 2 * target.args.hidden_size, a.seed).train()
    head.requires_grad_(True)
    to_draft = torch.full((target.args.vocab_size,), -1, dtype=torch.long)
    to_draft[head.to_target(torch.arange(len(vocab)))] = torch.arange(len(vocab))
    tcfg = TrainConfig(steps=a.steps, batch=a.batch, draft_steps=a.draft_steps, lr=a.lr, seed=a.seed,
                       eval_every=a.eval_every, ckpt_every=min(200, a.eval_every), loss_top_k=a.top_k,
                       autocast=None if a.train_dtype == "fp32" else a.train_dtype)
    report = train(head, target.embed, ShardData(files["train"]), ShardData(files["heldout"]), tcfg, work,
                   resume=not a.no_resume, losses=partial(ttt_losses, to_draft=to_draft), evaluate=eval_acceptance)
    hist = json.loads((work / "train_history.json").read_text())
    n_tok = sum(len(w.ids) * a.seq_len for w in wins.values())
    tm = timing(work)
    t_tok = sum(v["tokens"] for k, v in tm.items() if k.startswith("teacher_"))
    teacher_s = sum(v["seconds"] for k, v in tm.items() if k.startswith("teacher_"))
    report.update(run_report(a, loaded, corpus, t_start), aux_layers=list(head.aux_layers),
                  steps_per_s=round(a.steps / max(report["wall_s"], 1e-9), 3),
                  history_eval=[{"step": h["step"], "eval": h["eval"]} for h in hist if "eval" in h])
    report["data"] = {"seq_len": a.seq_len, "train_windows": len(wins["train"].ids),
                      "heldout_windows": len(wins["heldout"].ids), "sharegpt": a.sharegpt,
                      "train_by_source": dict(Counter(wins["train"].source)),
                      "heldout_by_source": dict(Counter(wins["heldout"].source)), "draft_vocab": len(vocab),
                      "vocab_coverage": round(coverage, 4), "teacher_tokens": n_tok, "top_k": a.top_k,
                      "teacher_s": teacher_s, "teacher_tokens_per_s": round(t_tok / max(teacher_s, 1e-9), 1),
                      "windows_s": tm.get("windows", {}).get("seconds")}
    extra = {"tandem": {"target": target_fingerprint(target, Path(str(loaded.path)).name),
                        "eval": report.get("eval")}}
    save_eagle3(head.eval(), target.args.num_hidden_layers, out, extra=extra)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "TRAINING.md").write_text(training_md(report))
    print(json.dumps(report.get("eval", {})))
    print(f"wrote {out}/config.json, model.safetensors (the layout vLLM and SGLang load), report.json, TRAINING.md")
    return 0
