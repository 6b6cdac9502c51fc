"""Speculative bench: the nine category prompt sets (or --prompts FILE), each prompt run without and with the
drafter (--method: any drafting method name; --compare-fixed: also at the fixed length n_max when adaptive;
--compare-members: also with each member of a chain alone) in one invocation, the arms of a prompt back to back.
Every arm of a prompt starts from the same n-gram suffix cache (what earlier prompts taught it), so no arm drafts
from another arm's run of the same prompt. Prints one line per prompt (`pred= draft= acc= rate= tok/s=`), then the aggregate JSON (mtp-bench keys
plus ours: per category and overall tok/s, acceptance, mean accepted length, mean k verified per round).
--compare llama.cpp runs the end-to-end comparison instead (tandem.bench.e2e).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

from tandem.bench.prompts import CATEGORIES, PROMPTS, load_prompts
from tandem.config import SamplingParams, SpecConfig
from tandem.errors import ConfigError
from tandem.spec.chain import kinds_of
from tandem.spec.drafter import get_method
from tandem.spec.stats import SpecStats


def _run(eng, prompt: str, sampling: SamplingParams, spec) -> tuple[list[int], object, float]:
    t = time.perf_counter()
    toks, fin = eng.complete(prompt, sampling, spec=spec)
    return toks, fin, time.perf_counter() - t


def bench_prompts(a) -> dict[str, list[str]]:
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


class _Arm:
    """Totals of one way of running the prompts (plain, speculative, fixed length) over one category."""

    def __init__(self):
        self.tok, self.s, self.stats = 0, 0.0, SpecStats()

    def add(self, fin, dt: float) -> None:
        self.tok, self.s = self.tok + fin.stats.predicted_n, self.s + dt
        if fin.stats.spec is not None:
            self.stats.merge(fin.stats.spec)

    @property
    def tok_s(self) -> float:
        return round(self.tok / self.s, 2) if self.s else 0.0

    def spec_dict(self, prefix: str = "") -> dict:
        st = self.stats
        d = {prefix + "accept_rate": round(st.acceptance_rate, 4), prefix + "mean_acceptance_length":
             round(st.mean_len, 3), prefix + "mean_k": round(st.drafted / st.rounds, 3) if st.rounds else 0.0,
             prefix + "tok_s": self.tok_s}
        if len(st.by_drafter) > 1:  # a chain: which member won the rounds, and how its drafts fared
            d[prefix + "by_drafter"] = {k: dict(v) for k, v in st.by_drafter.items()}
        return d


def run_spec_bench(a) -> dict:
    from tandem.engine.factory import build_engine
    from tandem.engine.options import EngineOptions

    opts = EngineOptions.from_args(a)
    spec_on, prompts = bench_spec(opts, a), bench_prompts(a)
    if spec_on.method == "ngram" and not opts.spec.chain:  # the model-free drafter needs no flag of its own
        opts = dataclasses.replace(opts, spec=dataclasses.replace(opts.spec, chain=("ngram",)))
    if getattr(a, "compare", None) == "llama.cpp":
        from tandem.bench.e2e import run_e2e_compare
        return run_e2e_compare(a, opts, spec_on, prompts)
    eng = build_engine(opts)
    if eng.drafter is None:
        raise ConfigError("bench --spec needs a drafter: none is known for this model and none was given "
                          "(--drafter DIR)")
    spec_on = spec_on.resolved(getattr(eng.drafter, "recommended", None))  # unset n_max / p_min, as reported
    arms = {"plain": dataclasses.replace(spec_on, enabled=False), "spec": spec_on}
    if spec_on.adaptive and getattr(a, "compare_fixed", False):
        arms["fixed"] = dataclasses.replace(spec_on, adaptive=False)
    if getattr(a, "compare_members", False):
        members = kinds_of(eng.drafter)
        if len(members) < 2:
            raise ConfigError(f"--compare-members needs a chain of drafters (--spec-chain), the engine has "
                              f"{eng.drafter.describe()}")
        arms.update({m: dataclasses.replace(spec_on, chain=(m,)) for m in members})
    suffix = _suffix_cache(eng.drafter)
    sampling = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
    _run(eng, "Hello", SamplingParams(max_tokens=4), spec_on)  # warm-up (kernels, caches)
    total = {k: _Arm() for k in arms}
    per_cat, identical, n_req, t_all = {}, 0, 0, time.perf_counter()
    for cat, texts in prompts.items():
        cs = {k: _Arm() for k in arms}
        for i, prompt in enumerate(texts):
            outs, rates, fins = {}, {}, {}
            learnt = copy.deepcopy(suffix.table) if suffix is not None else None
            for name, spec in arms.items():
                if suffix is not None:
                    suffix.table = copy.deepcopy(learnt)
                toks, fin, dt = _run(eng, prompt, sampling, spec)
                outs[name], rates[name], fins[name] = toks, fin.stats.predicted_n / dt, fin
                cs[name].add(fin, dt)
                total[name].add(fin, dt)
            same = all(o == outs["plain"] for o in outs.values())
            identical, n_req = identical + same, n_req + 1
            st = fins["spec"].stats.spec or SpecStats()
            print(f"{cat}[{i}] pred={fins['spec'].stats.predicted_n} draft={st.drafted} acc={st.accepted} "
                  f"rate={st.acceptance_rate:.3f} tok/s " + " ".join(f"{k}={v:.1f}" for k, v in rates.items())
                  + f" same={'yes' if same else 'NO'}", flush=True)
        per_cat[cat] = _summary(cs)
    res = {"n_requests": n_req, "total_predicted": total["spec"].tok, "total_draft": total["spec"].stats.drafted,
           "total_draft_accepted": total["spec"].stats.accepted,
           "aggregate_accept_rate": round(total["spec"].stats.acceptance_rate, 4),
           "wall_s_total": round(time.perf_counter() - t_all, 2),
           "acceptance_per_position": [round(x, 4) for x in total["spec"].stats.acceptance_by_position],
           **_summary(total), "identical_outputs": f"{identical}/{n_req}", "method": spec_on.method,
           "adaptive": spec_on.adaptive, "n_max": spec_on.n_max, "p_min": spec_on.p_min, "max_tokens": a.max_tokens,
           "weight_format": a.weight_format, "cache_type_k": eng.cache.k_type, "cache_type_v": eng.cache.v_type,
           "kv_bytes_per_token": eng.cache.bytes_per_token, "per_category": per_cat,
           "exact": eng.exact[0], "exact_reason": eng.exact[1]}
    if a.out:
        _save(res, Path(a.out))
    return res


def _suffix_cache(drafter):
    """The n-gram drafter's suffix cache (alone or in a chain), if it keeps one."""
    ngram = drafter if drafter.kind == "ngram" else getattr(drafter, "members", {}).get("ngram")
    return getattr(ngram, "suffix", None)


def _summary(arms: dict[str, _Arm]) -> dict:
    """One category's (or the whole run's) figures: plain tok/s, the speculative arm's, then each other arm's
    (fixed length, chain members alone) under its name as prefix, with its speedup over plain."""
    spec, base = arms["spec"], arms["plain"].tok_s
    d = {"baseline_tok_s": base, "spec_tok_s": spec.tok_s, **spec.spec_dict(),
         "speedup": round(spec.tok_s / base, 3) if base else 0.0}
    d.pop("tok_s")
    for name, arm in arms.items():
        if name in ("plain", "spec"):
            continue
        d.update(arm.spec_dict(f"{name}_"))
        d[f"{name}_speedup"] = round(arm.tok_s / base, 3) if base else 0.0
    if "fixed" in arms:
        d["adaptive_vs_fixed"] = round(spec.tok_s / arms["fixed"].tok_s, 3) if arms["fixed"].tok_s else 0.0
    return d


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
    cats = list(res["per_category"])
    xs = range(len(cats))
    ax2.bar([x - 0.2 for x in xs], [res["per_category"][c]["baseline_tok_s"] for c in cats], 0.4, label="plain")
    ax2.bar([x + 0.2 for x in xs], [res["per_category"][c]["spec_tok_s"] for c in cats], 0.4, label="speculative")
    ax2.set_xticks(list(xs), cats, rotation=45, ha="right")
    ax2.set(ylabel="tok/s", title=f"decode tok/s per category (speedup {res['speedup']}x)")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(out / "spec_bench.png", dpi=100)
