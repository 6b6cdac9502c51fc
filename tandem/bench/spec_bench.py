"""Speculative bench: the nine category prompt sets (or --prompts FILE), every prompt run by every arm back to back
in one invocation, outputs checked against plain decoding on every prompt.

Arms: `spec` the engine's default chain with an EMPTY n-gram suffix cache (what one `tandem generate` sees),
`spec_warm` the same with the suffix cache learnt from the earlier prompts (a server), each member of a chain alone
(`ngram`, the model drafter's kind; empty suffix cache), `fixed` (--compare-fixed: length n_max every round),
`chain` (with --spec-tree: the same drafters drafting chains, against which the trees are measured),
`plain`, and `llama_cpp` (--compare llama.cpp: llama-cpp-python's greedy eval loop on the same GGUF, prompt token
ids, thread count and stop rule). On a model whose file carries a chat template the prompts go through it as chat
messages and generation stops at EOS; --raw (plain completion) and --ignore-eos keep the old regime, labelled in the
output. Prints one line per prompt, a table per arm (tok/s, x plain, x llama.cpp, acceptance), then the JSON
(mtp-bench keys plus ours: per category and per arm tok/s, acceptance per position, per prompt rows).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import OrderedDict
from pathlib import Path

from tandem.bench.prompts import CATEGORIES, PROMPTS, load_prompts
from tandem.config import SamplingParams, SpecConfig
from tandem.errors import ConfigError
from tandem.spec.chain import kinds_of
from tandem.spec.drafter import get_method
from tandem.spec.stats import SpecStats


def bench_prompts(a) -> dict[str, list]:
    """--prompts FILE (tandem.bench.prompts.load_prompts), else the built-in categories (--categories subset)."""
    if getattr(a, "prompts", None):
        return load_prompts(a.prompts)
    cats = a.categories.split(",") if a.categories else CATEGORIES
    unknown = [c for c in cats if c not in PROMPTS]
    if unknown:
        raise ConfigError(f"--categories: unknown {unknown}; known: {CATEGORIES}")
    return {c: PROMPTS[c] for c in cats}


def bench_spec(opts, a) -> SpecConfig:
    """The speculative settings the bench runs: the engine flags plus --method (any name in the method table)."""
    if not opts.spec.enabled:
        raise ConfigError("bench --spec compares runs with and without the drafter: drop --no-spec")
    spec = dataclasses.replace(opts.spec, method=a.method) if getattr(a, "method", None) else opts.spec
    get_method(spec.method)  # an unknown name is refused before anything loads
    return spec


class Regime:
    """How prompts become token ids and when generation stops: the chat template (a model whose file carries one,
    unless --raw) and EOS (respected unless --ignore-eos or raw)."""

    def __init__(self, eng, raw: bool, ignore_eos: bool):
        self.eng = eng
        self.chat = not raw and bool(eng.loaded.chat_template)
        self.ignore_eos = ignore_eos or not self.chat
        self.label = (("chat template" if self.chat else "raw prompts" + ("" if raw else " (no chat template)"))
                      + (", EOS ignored" if self.ignore_eos else ", stop at EOS"))
        if self.chat:
            from tandem.chat import ChatEncoder, template_for
            self.encoder = ChatEncoder(template_for(eng.loaded, eng.tokenizer), eng.tokenizer)

    def ids(self, prompt, where: str) -> list[int]:
        if self.chat:
            msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.eng.encode(self.encoder.encode(msgs))
        if isinstance(prompt, list):
            raise ConfigError(f"prompt {where} is chat messages, but this run is {self.label}: drop --raw, or use a "
                              f"model with a chat template")
        return self.eng.encode(prompt)


class _Arm:
    """Totals of one way of running the prompts over one category (or all)."""

    def __init__(self):
        self.tok, self.s, self.stats = 0, 0.0, SpecStats()

    def add(self, n: int, dt: float, stats: SpecStats | None) -> None:
        self.tok, self.s = self.tok + n, self.s + dt
        if stats is not None:
            self.stats.merge(stats)

    @property
    def tok_s(self) -> float:
        return round(self.tok / self.s, 2) if self.s else 0.0

    def spec_dict(self, prefix: str = "") -> dict:
        st = self.stats
        d = {prefix + "accept_rate": round(st.acceptance_rate, 4), prefix + "mean_acceptance_length":
             round(st.mean_len, 3), prefix + "mean_k": round(st.drafted / st.rounds, 3) if st.rounds else 0.0,
             prefix + "nodes_per_round": round(st.nodes_per_draft, 3), prefix + "trees": st.trees,
             prefix + "tok_s": self.tok_s}
        if len(st.by_drafter) > 1:  # a chain: which member won the rounds, and how its drafts fared
            d[prefix + "by_drafter"] = {k: dict(v) for k, v in st.by_drafter.items()}
        return d


def spec_arms(eng, spec_on: SpecConfig, compare_fixed: bool) -> dict[str, tuple[SpecConfig, str]]:
    """name -> (the request's SpecConfig, its suffix cache: "cold" empty, "warm" learnt from earlier prompts)."""
    arms = {"plain": (dataclasses.replace(spec_on, enabled=False), "cold"), "spec": (spec_on, "cold")}
    suffix, chain_for = _suffix_cache(eng.drafter), getattr(eng.drafter, "chain_for", None)
    if suffix is not None and suffix.size > 0 and "ngram" in (chain_for(spec_on) if chain_for else ("ngram",)):
        arms["spec_warm"] = (spec_on, "warm")
    members = kinds_of(eng.drafter)
    if len(members) > 1:
        arms.update({m: (dataclasses.replace(spec_on, chain=(m,), method="auto"), "cold") for m in members})
    if spec_on.adaptive and compare_fixed:
        arms["fixed"] = (dataclasses.replace(spec_on, adaptive=False), "cold")
    if spec_on.tree:  # the same drafters drafting chains: what the tree is measured against
        arms["chain"] = (dataclasses.replace(spec_on, tree=False), "cold")
    return arms


def run_spec_bench(a) -> dict:
    from tandem.engine.factory import build_engine
    from tandem.engine.options import EngineOptions

    opts = EngineOptions.from_args(a)
    spec_on, prompts = bench_spec(opts, a), bench_prompts(a)
    if spec_on.method == "ngram" and not opts.spec.chain:  # the model-free drafter needs no flag of its own
        opts = dataclasses.replace(opts, spec=dataclasses.replace(opts.spec, chain=("ngram",)))
    eng = build_engine(opts)
    if eng.drafter is None:
        raise ConfigError("bench --spec needs a drafter: the engine loaded none")
    llama = None
    if getattr(a, "compare", None) == "llama.cpp":
        from tandem.bench.e2e import LlamaGreedy, common_prefix
        if eng.loaded.kind != "gguf":
            raise ConfigError(f"--compare llama.cpp needs a GGUF model, got {eng.loaded.kind} {eng.loaded.path}")
        llama = LlamaGreedy(str(eng.loaded.path), a.threads or _threads(), n_ctx=eng.max_len)
    spec_on = spec_on.resolved(getattr(eng.drafter, "recommended", None))  # unset n_max / p_min, as reported
    regime = Regime(eng, getattr(a, "raw", False), getattr(a, "ignore_eos", False))
    arms = spec_arms(eng, spec_on, getattr(a, "compare_fixed", False))
    print(f"bench: {eng.loaded.path} | {regime.label} | drafter: {eng.describe_drafter()} | arms: "
          f"{', '.join(arms)}{', llama_cpp' if llama else ''}", file=sys.stderr, flush=True)
    sampling = SamplingParams(max_tokens=a.max_tokens, ignore_eos=regime.ignore_eos)
    warm_ids = regime.ids("Hello", "warm-up")
    eng.complete(warm_ids, SamplingParams(max_tokens=4), spec=spec_on)  # warm-up (kernels, caches)
    if llama is not None:
        llama.generate(warm_ids, 4, set())
    names = list(arms) + (["llama_cpp"] if llama else [])
    total = {k: _Arm() for k in names}
    per_cat, rows, t_all = {}, [], time.perf_counter()
    suffix, warm_table = _suffix_cache(eng.drafter), OrderedDict()
    for cat, texts in prompts.items():
        cs = {k: _Arm() for k in names}
        for i, prompt in enumerate(texts):
            ids = regime.ids(prompt, f"{cat}[{i}]")
            outs, row = {}, {"prompt": f"{cat}[{i}]", "prompt_tokens": len(ids)}
            for name, (spec, cache) in arms.items():
                if suffix is not None:
                    suffix.table = warm_table if cache == "warm" else OrderedDict()
                t = time.perf_counter()
                toks, fin = eng.complete(ids, sampling, spec=spec)
                dt = time.perf_counter() - t
                if suffix is not None and cache == "warm":
                    warm_table = suffix.table
                outs[name] = toks
                for arm in (cs[name], total[name]):
                    arm.add(fin.stats.predicted_n, dt, fin.stats.spec)
                row[f"{name}_tok_s"] = round(fin.stats.predicted_n / dt, 2)
            row["tokens"] = len(outs["plain"])
            row["spec_equals_plain"] = all(o == outs["plain"] for o in outs.values())
            if llama is not None:
                eos = set() if regime.ignore_eos else set(eng.tokenizer.eos_ids)
                theirs, n, dt = llama.generate(ids, min(a.max_tokens, eng.max_len - len(ids)), eos)
                for arm in (cs["llama_cpp"], total["llama_cpp"]):
                    arm.add(n, dt, None)
                row["llama_cpp_tok_s"] = round(n / dt, 2)
                row["plain_equals_llama_cpp"] = theirs == outs["plain"]
                row["llama_cpp_common_prefix"] = common_prefix(outs["plain"], theirs)
            rows.append(row)
            print(f"{row['prompt']} in={len(ids)} out={row['tokens']} tok/s "
                  + " ".join(f"{k}={row[f'{k}_tok_s']:.1f}" for k in names)
                  + f" same={'yes' if row['spec_equals_plain'] else 'NO'}"
                  + (f" ==llama.cpp={row['plain_equals_llama_cpp']}" if llama else ""), flush=True)
        per_cat[cat] = _summary(cs)
    res = {"model": str(eng.loaded.path), "regime": regime.label, "drafter": eng.describe_drafter(),
           "n_requests": len(rows), "total_predicted": total["spec"].tok, "total_draft": total["spec"].stats.drafted,
           "total_draft_accepted": total["spec"].stats.accepted,
           "aggregate_accept_rate": round(total["spec"].stats.acceptance_rate, 4),
           "wall_s_total": round(time.perf_counter() - t_all, 2),
           "acceptance_per_position": [round(x, 4) for x in total["spec"].stats.acceptance_by_position],
           **_summary(total), **_arm_table(total),
           "identical_outputs": f"{sum(r['spec_equals_plain'] for r in rows)}/{len(rows)}",
           "method": spec_on.method, "adaptive": spec_on.adaptive, "n_max": spec_on.n_max, "p_min": spec_on.p_min,
           "max_tokens": a.max_tokens, "threads": a.threads or _threads(), "weight_format": a.weight_format,
           "cache_type_k": eng.cache.k_type, "cache_type_v": eng.cache.v_type,
           "kv_bytes_per_token": eng.cache.bytes_per_token, "per_category": per_cat,
           "exact": eng.exact[0], "exact_reason": eng.exact[1], "per_prompt": rows}
    if llama is not None:
        res["llama_cpp_match_rate"] = round(sum(r["plain_equals_llama_cpp"] for r in rows) / len(rows), 3)
        res["llama_cpp_mean_common_prefix"] = round(sum(r["llama_cpp_common_prefix"] for r in rows) / len(rows), 2)
    _print_table(res, names)
    if a.out:
        _save(res, Path(a.out))
    return res


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def _suffix_cache(drafter):
    """The n-gram drafter's suffix cache (alone or in a chain), if it keeps one."""
    ngram = drafter if drafter.kind == "ngram" else getattr(drafter, "members", {}).get("ngram")
    return getattr(ngram, "suffix", None)


def _summary(arms: dict[str, _Arm]) -> dict:
    """One category's (or the whole run's) figures: plain tok/s, the speculative arm's, then each other arm's
    (warm cache, members alone, fixed length, llama.cpp) under its name as prefix, with its speedup over plain."""
    spec, base = arms["spec"], arms["plain"].tok_s
    d = {"baseline_tok_s": base, "spec_tok_s": spec.tok_s, **spec.spec_dict(),
         "speedup": round(spec.tok_s / base, 3) if base else 0.0}
    d.pop("tok_s")
    for name, arm in arms.items():
        if name in ("plain", "spec"):
            continue
        d.update(arm.spec_dict(f"{name}_") if name != "llama_cpp" else {f"{name}_tok_s": arm.tok_s})
        d[f"{name}_speedup"] = round(arm.tok_s / base, 3) if base else 0.0
    if "chain" in arms:
        d["tree_vs_chain"] = round(spec.tok_s / arms["chain"].tok_s, 3) if arms["chain"].tok_s else 0.0
    if "fixed" in arms:
        d["adaptive_vs_fixed"] = round(spec.tok_s / arms["fixed"].tok_s, 3) if arms["fixed"].tok_s else 0.0
    return d


def _arm_table(total: dict[str, _Arm]) -> dict:
    """Per arm over all prompts: tok/s, ratio to plain and to llama.cpp, acceptance, acceptance per position."""
    base, ref = total["plain"].tok_s, total["llama_cpp"].tok_s if "llama_cpp" in total else None
    out = {}
    for name, arm in total.items():
        st = arm.stats
        row = {"tok_s": arm.tok_s, "vs_plain": round(arm.tok_s / base, 3) if base else 0.0}
        if ref:
            row["vs_llama_cpp"] = round(arm.tok_s / ref, 3)
        if st.rounds:
            row.update(accept_rate=round(st.acceptance_rate, 4), mean_acceptance_length=round(st.mean_len, 3),
                       nodes_per_round=round(st.nodes_per_draft, 3), trees=st.trees,
                       acceptance_per_position=[round(x, 4) for x in st.acceptance_by_position])
        out[name] = row
    return {"arms": out}


def _print_table(res: dict, names: list[str]) -> None:
    print(f"\n{res['model']} | {res['regime']} | {res['n_requests']} prompts | spec == plain on "
          f"{res['identical_outputs']}", file=sys.stderr)
    print(f"{'arm':<12} {'tok/s':>8} {'x plain':>8} {'x llama':>8} {'accept':>7} {'mean len':>8} {'nodes':>6}  "
          "per position",
          file=sys.stderr)
    for name in names:
        r = res["arms"][name]
        pos = " ".join(f"{x:.2f}" for x in r.get("acceptance_per_position", [])[:8])
        print(f"{name:<12} {r['tok_s']:>8.2f} {r['vs_plain']:>8.3f} {r.get('vs_llama_cpp', float('nan')):>8.3f} "
              f"{r.get('accept_rate', float('nan')):>7.3f} {r.get('mean_acceptance_length', float('nan')):>8.3f} "
              f"{r.get('nodes_per_round', float('nan')):>6.2f}  "
              f"{pos}", file=sys.stderr, flush=True)


def _save(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec_bench.json").write_text(json.dumps(res, indent=2) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the JSON is the result; the plot is optional
        print(f"wrote {out / 'spec_bench.json'}; no plot: matplotlib is not installed (pip install 'tandem[bench]')",
              file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    acc = res["acceptance_per_position"]
    ax1.bar(range(1, len(acc) + 1), acc, color="#4477aa")
    ax1.set(xlabel="draft position", ylabel="acceptance (given drafted)", ylim=(0, 1),
            title=f"acceptance per position (mean len {res['mean_acceptance_length']})")
    arms = list(res["arms"])
    ax2.bar(range(len(arms)), [res["arms"][n]["tok_s"] for n in arms], color="#4477aa")
    ax2.set_xticks(range(len(arms)), arms, rotation=45, ha="right")
    ax2.set(ylabel="tok/s", title=f"end-to-end tok/s per arm ({res['regime']})")
    fig.tight_layout()
    fig.savefig(out / "spec_bench.png", dpi=100)
