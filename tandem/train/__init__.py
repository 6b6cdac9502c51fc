"""`tandem train-assistant` and `tandem export-assistant`."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path


def add_train_args(p) -> None:
    p.add_argument("--target", default=None, help="target model (GGUF/HF dir; default: the embedded default)")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors + report)")
    p.add_argument("--data", action="append", default=None,
                   help="text source: 'stdlib' or a file/directory (repeatable; default: stdlib)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=None, help="assistant hidden size (must equal the target's)")
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--centroids", type=int, default=1024, help="vocabulary clusters for the sparse head (0 = dense)")
    p.add_argument("--top-k-clusters", type=int, default=32)
    p.add_argument("--draft-steps", type=int, default=3, help="draft steps unrolled in training")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-text", type=int, default=256, help="text windows for the teacher passes")
    p.add_argument("--n-gen", type=int, default=256, help="target greedy generations for the teacher passes")
    p.add_argument("--n-eval", type=int, default=16, help="held-out target generations for the report")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--data-cache", default=None, help="save/load the collected teacher data here")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-resume", action="store_true")


def add_export_args(p) -> None:
    p.add_argument("--drafter", required=True, help="a tandem drafter directory")
    p.add_argument("--target", default=None, help="its target (default: the embedded default)")
    p.add_argument("--out", required=True, help="directory transformers' from_pretrained can load")


def cmd_train(a) -> int:
    import torch

    from tandem import loading
    from tandem.errors import ConfigError
    from tandem.train import assistant_io
    from tandem.train.assistant_init import assistant_config, build_assistant
    from tandem.train.clusters import balanced_kmeans
    from tandem.train.corpus import Corpus
    from tandem.train.data import DistillData, collect
    from tandem.train.trainer import TrainConfig, train

    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded = loading.load(a.target, dtype=torch.float32)
    target = loaded.model
    if a.hidden not in (None, target.args.hidden_size):
        raise ConfigError(f"--hidden {a.hidden}: the assistant shares the target's LM head, so its hidden size must "
                          f"equal the target's ({target.args.hidden_size})")
    cfg_json = assistant_config(target, layers=a.layers, intermediate=a.intermediate, centroids=a.centroids,
                                top_k_clusters=a.top_k_clusters)
    asst = build_assistant(cfg_json, target, seed=a.seed)
    layers = sorted(set(asst.target_layers.values()))
    corpus = Corpus.from_sources(a.data or ["stdlib"])

    cache_path = Path(a.data_cache) if a.data_cache else out / "teacher_data.safetensors"
    if cache_path.exists():
        data = DistillData.load(cache_path)
        print(f"loaded teacher data {cache_path}: {len(data)} sequences")
    else:
        data = collect(target, loaded.tokenizer, corpus, layers=layers, n_text=a.n_text, n_gen=a.n_gen + a.n_eval,
                       seq_len=a.seq_len, prompt_len=a.prompt_len, seed=a.seed)
        data.save(cache_path)
    n_train = len(data) - a.n_eval
    idx = torch.arange(len(data))
    train_idx = torch.cat([idx[:a.n_text], idx[a.n_text:n_train]])
    eval_idx = idx[n_train:]  # the last generations: held out

    def subset(d: DistillData, i):
        return DistillData(d.tokens[i], d.hidden[i], {k: (kv[0][i], kv[1][i]) for k, kv in d.kv.items()},
                           d.top_ids[i], d.top_logp[i])

    cluster_of = None
    if asst.masked_embedding is not None:
        order, cent = balanced_kmeans(target.model.embed_tokens.weight.detach(), a.centroids, seed=a.seed)
        asst.masked_embedding.token_ordering.copy_(order)
        with torch.no_grad():
            asst.masked_embedding.centroids.weight.copy_(cent * 4.0)
        cluster_of = torch.empty_like(order)
        cluster_of[order] = torch.arange(len(order)) // (len(order) // a.centroids)

    tcfg = TrainConfig(steps=a.steps, batch=a.batch, draft_steps=a.draft_steps, lr=a.lr, seed=a.seed)
    report = train(asst, target.embed, subset(data, train_idx), subset(data, eval_idx), tcfg, out, cluster_of,
                   resume=not a.no_resume)
    report.update({
        "command": "tandem " + " ".join(shlex.quote(x) for x in sys.argv[1:]) if sys.argv[0].endswith("tandem")
        else " ".join(shlex.quote(x) for x in sys.argv),
        "target": str(loaded.path), "data_sources": a.data or ["stdlib"], "corpus": corpus.describe(),
        "teacher_sequences": {"text": a.n_text, "generated": a.n_gen, "held_out_generated": a.n_eval,
                              "seq_len": a.seq_len},
        "total_wall_s": round(time.time() - t_start, 1), "machine": platform.platform(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    })
    assistant_io.save(asst, cfg_json, out, report)
    print(json.dumps(report.get("eval", {})))
    print(f"wrote {out}/config.json, model.safetensors, report.json")
    return 0


def cmd_export(a) -> int:
    from tandem.train import assistant_io
    assistant_io.export_for_transformers(a.drafter, a.target, a.out)
    print(f"wrote {a.out} (loadable with transformers' Gemma4AssistantForCausalLM.from_pretrained)")
    return 0
