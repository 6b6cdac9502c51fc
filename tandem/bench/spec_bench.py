"""Speculative bench: the nine category prompt sets, each prompt run without and with the drafter in one invocation.

Prints one line per prompt (`pred= draft= acc= rate= tok/s=`), then the aggregate JSON (mtp-bench keys plus ours).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from tandem.bench.prompts import CATEGORIES, PROMPTS
from tandem.config import SamplingParams
from tandem.errors import ConfigError
from tandem.spec.stats import SpecStats


def _run(eng, prompt: str, sampling: SamplingParams, spec) -> tuple[list[int], object, float]:
    t = time.perf_counter()
    toks, fin = eng.complete(prompt, sampling, spec=spec)
    return toks, fin, time.perf_counter() - t


def run_spec_bench(a) -> dict:
    from tandem.engine.factory import build_engine
    from tandem.engine.options import EngineOptions

    opts = EngineOptions.from_args(a)
    if not opts.spec.enabled:
        raise ConfigError("bench --spec compares runs with and without the drafter: drop --no-spec")
    eng = build_engine(opts)
    if eng.drafter is None:
        raise ConfigError("bench --spec needs a drafter: none is known for this model and none was given "
                          "(--drafter DIR)")
    spec_on = opts.spec
    spec_off = dataclasses.replace(spec_on, enabled=False)
    cats = a.categories.split(",") if a.categories else CATEGORIES
    unknown = [c for c in cats if c not in PROMPTS]
    if unknown:
        raise ConfigError(f"--categories: unknown {unknown}; known: {CATEGORIES}")
    sampling = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
    _run(eng, "Hello", SamplingParams(max_tokens=4), spec_on)  # warm-up (kernels, caches)
    total, per_cat = SpecStats(), {}
    base_tok = base_s = spec_tok = spec_s = 0.0
    identical, n_req, t_all = 0, 0, time.perf_counter()
    for cat in cats:
        cs = SpecStats()
        cb_tok = cb_s = cs_tok = cs_s = 0.0
        for i, prompt in enumerate(PROMPTS[cat]):
            plain, fin0, dt0 = _run(eng, prompt, sampling, spec_off)
            spec, fin1, dt1 = _run(eng, prompt, sampling, spec_on)
            st = fin1.stats.spec or SpecStats()
            identical += int(plain == spec)
            n_req += 1
            cs.merge(st)
            p0, p1 = fin0.stats.predicted_n, fin1.stats.predicted_n
            cb_tok, cb_s, cs_tok, cs_s = cb_tok + p0, cb_s + dt0, cs_tok + p1, cs_s + dt1
            print(f"{cat}[{i}] pred={p1} draft={st.drafted} acc={st.accepted} rate={st.acceptance_rate:.3f} "
                  f"tok/s={p1 / dt1:.1f} (plain {p0 / dt0:.1f}) same={'yes' if plain == spec else 'NO'}",
                  flush=True)
        total.merge(cs)
        base_tok, base_s, spec_tok, spec_s = base_tok + cb_tok, base_s + cb_s, spec_tok + cs_tok, spec_s + cs_s
        per_cat[cat] = {"accept_rate": round(cs.acceptance_rate, 4), "mean_acceptance_length": round(cs.mean_len, 3),
                        "baseline_tok_s": round(cb_tok / cb_s, 2), "spec_tok_s": round(cs_tok / cs_s, 2)}
    res = {
        "n_requests": n_req, "total_predicted": int(spec_tok), "total_draft": total.drafted,
        "total_draft_accepted": total.accepted, "aggregate_accept_rate": round(total.acceptance_rate, 4),
        "wall_s_total": round(time.perf_counter() - t_all, 2),
        "mean_acceptance_length": round(total.mean_len, 3),
        "acceptance_per_position": [round(x, 4) for x in total.acceptance_by_position],
        "baseline_tok_s": round(base_tok / base_s, 2), "spec_tok_s": round(spec_tok / spec_s, 2),
        "speedup": round((spec_tok / spec_s) / (base_tok / base_s), 3),
        "identical_outputs": f"{identical}/{n_req}", "n_max": spec_on.n_max, "p_min": spec_on.p_min,
        "max_tokens": a.max_tokens, "weight_format": a.weight_format,
        "cache_type_k": eng.cache.k_type, "cache_type_v": eng.cache.v_type,
        "kv_bytes_per_token": eng.cache.bytes_per_token,
        "per_category": per_cat,
    }
    if a.out:
        _save(res, Path(a.out))
    return res


def _save(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec_bench.json").write_text(json.dumps(res, indent=2) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--out needs matplotlib for the plot: pip install 'tandem[bench]'") from None
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
