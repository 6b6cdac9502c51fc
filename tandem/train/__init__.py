"""`tandem train-assistant`, `train-nextn`, `train-draft-model`, `train-eagle3` and `export-assistant`."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path


def add_common_args(p) -> None:
    """Target, text, teacher data and optimiser options shared by train-assistant and train-nextn."""
    p.add_argument("--target", default=None, help="target model (GGUF/HF dir; default: the embedded default)")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors + report)")
    p.add_argument("--data", action="append", default=None,
                   help="text source: 'stdlib' or a file/directory (repeatable; default: stdlib)")
    p.add_argument("--draft-steps", type=int, default=3, help="draft steps unrolled in training")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--n-text", type=int, default=256, help="text windows for the teacher passes")
    p.add_argument("--n-gen", type=int, default=256, help="target greedy generations for the teacher passes")
    p.add_argument("--n-eval", type=int, default=16, help="held-out target generations for the report")
    p.add_argument("--prompt-len", type=int, default=32, help="tokens of corpus text used as a generation prompt")
    p.add_argument("--prompts", default=None, help="JSONL file ({'prompt': ...} per line) of generation prompts")
    p.add_argument("--gen-batch", type=int, default=16, help="sequences generated together")
    p.add_argument("--work-dir", default=None, help="teacher data + checkpoints (default: OUT/../.OUTNAME-work)")
    p.add_argument("--weight-format", default="q8_0",
                   help="target weights for the teacher passes: the format the drafter will be used with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-resume", action="store_true")


def add_train_args(p) -> None:
    add_common_args(p)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=None, help="assistant hidden size (must equal the target's)")
    p.add_argument("--intermediate", type=int, default=None,
                   help="MLP width (default: the target's with --init target, else 1024)")
    p.add_argument("--init", choices=("target", "random"), default="random",
                   help="random (default): small random layers over an identity path; target: each layer starts as "
                        "a copy of the target layer whose cache it reads")
    p.add_argument("--init-from", default=None, metavar="DRAFTER_DIR",
                   help="warm start: continue from a trained drafter for this target (its config, weights and "
                        "clusters; --layers/--intermediate/--centroids are then taken from it)")
    p.add_argument("--centroids", type=int, default=1024, help="vocabulary clusters for the sparse head (0 = dense)")
    p.add_argument("--top-k-clusters", type=int, default=32)


def load_target(a):
    """--threads, then the target in fp32 (drafter weights are copied from it before kernels.prepare packs it):
    (loaded, the run's start time)."""
    import torch

    from tandem import loading

    if a.threads:
        torch.set_num_threads(a.threads)
    t_start = time.time()
    return loading.load(a.target, dtype=torch.float32), t_start


def teacher_data(a, target, tokenizer, layers: list[int], out: Path):
    """(work dir, corpus, teacher data, train part, held-out part): collected once into the work dir, then loaded;
    the last --n-eval generations are held out."""
    import torch

    from tandem.errors import ConfigError
    from tandem.train.corpus import Corpus
    from tandem.train.data import DistillData, collect

    corpus = Corpus.from_sources(a.data or ["stdlib"])
    work = Path(a.work_dir) if a.work_dir else out.parent / f".{out.name}-work"
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "teacher_data.safetensors"
    gen_prompts = None
    if a.prompts:
        try:
            gen_prompts = [json.loads(x)["prompt"] for x in Path(a.prompts).read_text().splitlines() if x.strip()]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"--prompts {a.prompts}: expected JSONL lines with a 'prompt' field ({e})") from None
    if cache_path.exists():
        data = DistillData.load(cache_path)
        print(f"loaded teacher data {cache_path}: {len(data)} sequences")
    else:
        data = collect(target, tokenizer, corpus, layers=layers, n_text=a.n_text, n_gen=a.n_gen + a.n_eval,
                       seq_len=a.seq_len, prompt_len=a.prompt_len, seed=a.seed, gen_prompts=gen_prompts,
                       gen_batch=a.gen_batch)
        data.save(cache_path)
    n_train = len(data) - a.n_eval
    idx = torch.arange(len(data))
    return work, corpus, data, data.subset(idx[:n_train]), data.subset(idx[n_train:])


def run_report(a, loaded, corpus, t_start: float) -> dict:
    """The command, target, data and machine of a training run (report.json)."""
    import torch

    return {
        "command": "tandem " + " ".join(shlex.quote(x) for x in getattr(a, "argv", sys.argv[1:])),
        "target": str(loaded.path), "data_sources": a.data or ["stdlib"], "corpus": corpus.describe(),
        "prompts_file": a.prompts, "init_from": getattr(a, "init_from", None),
        "teacher_sequences": {"text": a.n_text, "generated": a.n_gen, "held_out_generated": a.n_eval,
                              "seq_len": a.seq_len},
        "total_wall_s": round(time.time() - t_start, 1), "machine": platform.platform(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def register_train_nextn(sub) -> None:
    """The `train-nextn` verb on the CLI's subparsers."""
    t = sub.add_parser("train-nextn", help="train a nextn (MTP) head for a dense target that ships without one")
    add_common_args(t)
    t.set_defaults(func=cmd_train_nextn)


def cmd_train_nextn(a) -> int:
    from tandem.train.nextn import cmd_train_nextn as run
    return run(a)


def register_train_draft_model(sub) -> None:
    """The `train-draft-model` verb: the target's first layers + head as a draft model, self-distilled."""
    t = sub.add_parser("train-draft-model", help="build a draft model (the target's first N layers + its head, "
                                                 "self-distilled) for a target that has no packaged draft model")
    add_common_args(t)
    t.add_argument("--layers", type=int, default=4, help="target layers the draft model keeps (the first N)")
    t.set_defaults(lr=2e-4, steps=600)  # fine-tuning layers that start as the target's own; --steps 0: truncate only
    t.set_defaults(func=cmd_train_draft_model)


def cmd_train_draft_model(a) -> int:
    from tandem.train.draft_model import cmd_train_draft_model as run
    return run(a)


def register_train_eagle3(sub) -> None:
    """The `train-eagle3` verb: an EAGLE-3 head (the layout vLLM and SGLang load) trained on broad data."""
    t = sub.add_parser("train-eagle3", help="train an EAGLE-3 head for a target (ShareGPT chat through its template, "
                                            "code and docs, its own answers)")
    add_common_args(t)
    t.add_argument("--sharegpt", default=None, metavar="JSON",
                   help="ShareGPT V3 JSON (its evaluation split is dropped); none: code/docs and corpus prompts only")
    t.add_argument("--n-chat", type=int, default=512, help="training windows of rendered ShareGPT conversations")
    t.add_argument("--draft-vocab", type=int, default=8192, help="draft vocabulary: the most frequent target tokens")
    t.add_argument("--intermediate", type=int, default=None, help="MLP width (default: 2 x the hidden size)")
    t.add_argument("--top-k", type=int, default=16, help="teacher logits kept per position")
    t.add_argument("--teacher-batch", type=int, default=4, help="windows per teacher forward")
    t.add_argument("--eval-every", type=int, default=200, help="held-out acceptance every N steps")
    t.add_argument("--train-dtype", choices=("bf16", "fp32"), default="bf16",
                   help="forward/backward precision (bf16 autocast keeps fp32 weights; ~2x faster on AVX512-BF16)")
    t.set_defaults(lr=5e-4, steps=1000, seq_len=256, n_text=256, n_gen=64, n_eval=16)
    t.set_defaults(func=cmd_train_eagle3)


def cmd_train_eagle3(a) -> int:
    from tandem.train.eagle3 import cmd_train_eagle3 as run
    return run(a)


def add_export_args(p) -> None:
    p.add_argument("--drafter", required=True, help="a tandem drafter directory")
    p.add_argument("--target", default=None, help="its target (default: the embedded default)")
    p.add_argument("--out", required=True, help="directory transformers' from_pretrained can load")


def cmd_train(a) -> int:
    import torch

    from tandem.errors import ConfigError
    from tandem.train import assistant_io
    from tandem.train.assistant_init import assistant_config, build_assistant, init_from_target
    from tandem.train.clusters import balanced_kmeans
    from tandem.train.trainer import TrainConfig, train

    if a.init_from and a.init == "target":  # before loading anything
        raise ConfigError("--init-from and --init target both say where the weights start: give one")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    loaded, t_start = load_target(a)
    target = loaded.model
    from tandem import kernels
    # teacher passes with the weights the drafter will be verified against at run time (and fast)
    kernels.prepare(target, a.weight_format)
    head = target.lm_head
    # the head rows exactly as the run-time drafter reads them (the packed, tied LM head)
    embed_w = (head.dequantized_weight() if hasattr(head, "dequantized_weight") else head.weight).detach().float()
    if a.hidden not in (None, target.args.hidden_size):
        raise ConfigError(f"--hidden {a.hidden}: the assistant shares the target's LM head, so its hidden size must "
                          f"equal the target's ({target.args.hidden_size})")
    inter = a.intermediate or (getattr(target.args, "intermediate_size", None) if a.init == "target" else None)
    if a.init_from:
        cfg_json, warm = assistant_io.load_for_training(a.init_from)
    else:
        cfg_json = assistant_config(target, layers=a.layers, intermediate=int(inter or 1024),
                                    centroids=a.centroids, top_k_clusters=a.top_k_clusters)
    asst = build_assistant(cfg_json, target, embed_w, seed=a.seed)
    if a.init_from:
        assistant_io.load_weights(asst, warm, a.init_from)
        print(f"warm start from {a.init_from}")
    elif a.init == "target":
        print(f"assistant layers start as copies of target layers {init_from_target(asst, target)}")
    layers = sorted(set(asst.target_layers.values()))
    work, corpus, data, train_data, eval_data = teacher_data(a, target, loaded.tokenizer, layers, out)

    cluster_of = None
    if asst.masked_embedding is not None:
        order = asst.masked_embedding.token_ordering  # a warm start keeps the drafter's learned clustering
        if not a.init_from:
            order, cent = balanced_kmeans(embed_w, a.centroids, seed=a.seed)
            asst.masked_embedding.token_ordering.copy_(order)
            with torch.no_grad():
                asst.masked_embedding.centroids.weight.copy_(cent * 4.0)
        n_clusters = asst.masked_embedding.centroids.weight.shape[0]
        cluster_of = torch.empty_like(order)
        cluster_of[order] = torch.arange(len(order)) // (len(order) // n_clusters)

    if a.init == "random" and not a.init_from:  # y starts at the scale of the target's own final hidden states
        with torch.no_grad():
            asst.model.norm.weight.fill_(float(data.hidden[:64].float().pow(2).mean().sqrt()))
    tcfg = TrainConfig(steps=a.steps, batch=a.batch, draft_steps=a.draft_steps, lr=a.lr, seed=a.seed)
    report = train(asst, target.embed, train_data, eval_data, tcfg, work, cluster_of, resume=not a.no_resume)
    report.update(run_report(a, loaded, corpus, t_start))
    assistant_io.save(asst, cfg_json, out, report)
    print(json.dumps(report.get("eval", {})))
    print(f"wrote {out}/config.json, model.safetensors, report.json")
    return 0


def cmd_export(a) -> int:
    from tandem.train import assistant_io
    assistant_io.export_for_transformers(a.drafter, a.target, a.out)
    print(f"wrote {a.out} (loadable with transformers' Gemma4AssistantForCausalLM.from_pretrained)")
    return 0
