"""`tandem bench`: core speed (prefill, decode, k-forward cost), the speculative form (per-category prompts) and
KV cache quality (--kv-quality: perplexity and next-token agreement with the bf16 cache, per cache type)."""

from __future__ import annotations

import json
import sys


def add_bench_args(p) -> None:
    p.add_argument("--spec", action="store_true",
                   help="speculative form: every prompt through each arm (default chain with an empty / a warm n-gram "
                        "suffix cache, each chain member alone, plain; chat template and EOS on an instruct model)")
    p.add_argument("--raw", action="store_true", help="(spec form) plain completion of the prompts, EOS ignored")
    p.add_argument("--ignore-eos", action="store_true", help="(spec form) decode --max-tokens tokens past EOS")
    p.add_argument("--compare", default=None, choices=["llama.cpp"],
                   help="also run llama-cpp-python on the GGUF (with --spec: one more arm, its greedy eval loop on the "
                        "same prompt token ids, threads and stop rule)")
    p.add_argument("--context", type=int, default=256, help="context length for decode and the k-cost table")
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--ks", default="1,2,4,8", help="k values for the k-forward cost table")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=128, help="(spec form) tokens per prompt")
    p.add_argument("--categories", default=None, help="(spec form) comma-separated subset")
    p.add_argument("--prompts", default=None,
                   help="(spec form) prompt file instead of the categories: a JSON list of strings, or JSONL / a JSON "
                        "list of objects with a \"prompt\" string or chat \"messages\" (and an optional \"category\"); "
                        "scripts/make_chat_eval.py writes ShareGPT's evaluation split")
    p.add_argument("--method", default=None,
                   help="(spec form) drafting method name (tandem.spec METHODS, e.g. mtp, draft, nextn; default auto)")
    p.add_argument("--compare-fixed", action="store_true",
                   help="(spec form) also run every prompt at the fixed length --spec-n-max (adaptive vs fixed)")
    p.add_argument("--out", default=None, help="(spec form) directory for the JSON and PNG plot")
    p.add_argument("--kv-quality", action="store_true",
                   help="KV cache quality: perplexity per cache type and next-token agreement with the bf16 cache "
                        "on held-out text (default: idlelib/NEWS.txt of this Python)")
    p.add_argument("--kv-types", default="bf16,q8_0,turbo4,turbo3,turbo2", help="(kv-quality) cache types: T (K and V) or K:V (e.g. q8_0:turbo4)")
    p.add_argument("--kv-text", default=None, help="(kv-quality) text file to score")
    p.add_argument("--kv-chunks", type=int, default=4, help="(kv-quality) chunks of the text, each from an empty cache")
    p.add_argument("--kv-chunk-len", type=int, default=1024, help="(kv-quality) tokens per chunk")
    p.add_argument("--kv-greedy-tokens", type=int, default=0,
                   help="(kv-quality) also decode every bench prompt greedily for N tokens per type and compare "
                        "the outputs with the bf16 cache's")


def cmd_bench(a) -> int:
    if a.kv_quality:
        from tandem.bench.kv_quality import run_kv_quality
        result = run_kv_quality(a)
    elif a.spec:
        from tandem.bench.spec_bench import run_spec_bench
        result = run_spec_bench(a)
    else:
        from tandem.bench.core_bench import run_core_bench
        result = run_core_bench(a)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0
