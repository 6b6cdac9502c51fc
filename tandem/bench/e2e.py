"""`tandem bench --spec --compare llama.cpp`: end-to-end tokens/s per prompt of Tandem speculative and Tandem plain
(Engine.generate, the user's path: detokenizer, stops, events) and llama.cpp plain (llama-cpp-python's eval loop,
greedy over the real logits) on the same GGUF, thread count and prompt token ids, in one run. Tandem spec == plain is
checked on every prompt; vs llama.cpp the rate of identical outputs and the mean common prefix are reported
(different kernels may break near-ties differently)."""

from __future__ import annotations

import dataclasses
import time

import torch

from tandem.config import SamplingParams
from tandem.errors import ConfigError


class LlamaGreedy:
    """llama-cpp-python's eval loop, argmax of the last row's logits (llama_get_logits_ith: `llm.scores` stays zero
    unless logits_all)."""

    def __init__(self, path: str, threads: int, n_ctx: int):
        try:
            import llama_cpp
        except ImportError:
            raise ConfigError("--compare llama.cpp needs llama-cpp-python: pip install 'tandem[llama]'") from None
        import numpy as np
        self.lib, self.np = llama_cpp, np
        self.llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                                   n_batch=512, verbose=False, logits_all=False)
        self.n_vocab = self.llm.n_vocab()

    def _argmax(self) -> int:
        ptr = self.lib.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def generate(self, ids: list[int], n: int) -> tuple[list[int], float]:
        """n greedy tokens after the prompt ids; returns them and the wall seconds (prefill included, as Tandem's)."""
        t = time.perf_counter()
        self.llm.reset()
        self.llm.eval(ids)
        out = [self._argmax()]
        while len(out) < n:
            self.llm.eval([out[-1]])
            out.append(self._argmax())
        return out, time.perf_counter() - t


def run_e2e_compare(a, opts, spec_on, prompts: dict[str, list[str]]) -> dict:
    from tandem.engine.factory import build_engine

    eng = build_engine(opts)
    spec_on = spec_on.resolved(getattr(eng.drafter, "recommended", None))  # unset n_max / p_min, as reported
    if eng.loaded.kind != "gguf":
        raise ConfigError(f"--compare llama.cpp needs a GGUF model, got {eng.loaded.kind} {eng.loaded.path}")
    if eng.drafter is None:
        raise ConfigError("bench --spec needs a drafter: none is known for this model and none was given (--drafter)")
    threads = a.threads or torch.get_num_threads()
    llama = LlamaGreedy(str(eng.loaded.path), threads, n_ctx=min(eng.max_len, 2048))
    sampling = SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
    spec_off = dataclasses.replace(spec_on, enabled=False)
    eng.complete("Hello", SamplingParams(max_tokens=4), spec=spec_on)  # warm-up (kernels, caches)
    llama.generate(eng.encode("Hello"), 4)
    rows, tot = [], {"spec": [0, 0.0], "plain": [0, 0.0], "llama_cpp": [0, 0.0]}
    for cat, texts in prompts.items():
        for i, prompt in enumerate(texts):
            ids = eng.encode(prompt)
            row = {"prompt": f"{cat}[{i}]"}
            outs = {}
            for name, spec in (("spec", spec_on), ("plain", spec_off)):
                t = time.perf_counter()
                toks, fin = eng.complete(ids, sampling, spec=spec)
                outs[name] = toks
                _add(row, tot, name, fin.stats.predicted_n, time.perf_counter() - t)
            outs["llama_cpp"], dt = llama.generate(ids, len(outs["plain"]))
            _add(row, tot, "llama_cpp", len(outs["llama_cpp"]), dt)
            row["spec_equals_plain"] = outs["spec"] == outs["plain"]
            row["plain_equals_llama_cpp"] = outs["plain"] == outs["llama_cpp"]
            row["llama_cpp_common_prefix"] = _common_prefix(outs["plain"], outs["llama_cpp"])
            rows.append(row)
            print(f"{row['prompt']} spec {row['spec_tok_s']} plain {row['plain_tok_s']} llama.cpp "
                  f"{row['llama_cpp_tok_s']} tok/s  spec==plain {row['spec_equals_plain']}  "
                  f"==llama.cpp {row['plain_equals_llama_cpp']}", flush=True)
    agg = {f"{k}_tok_s": round(n / s, 2) for k, (n, s) in tot.items()}
    return {"model": str(eng.loaded.path), "threads": threads, "max_tokens": a.max_tokens, "method": spec_on.method,
            "adaptive": spec_on.adaptive, "n_max": spec_on.n_max, **agg,
            "spec_vs_llama_cpp": round(agg["spec_tok_s"] / agg["llama_cpp_tok_s"], 3),
            "plain_vs_llama_cpp": round(agg["plain_tok_s"] / agg["llama_cpp_tok_s"], 3),
            "spec_vs_plain": round(agg["spec_tok_s"] / agg["plain_tok_s"], 3),
            "spec_equals_plain": f"{sum(r['spec_equals_plain'] for r in rows)}/{len(rows)}",
            "llama_cpp_match_rate": round(sum(r["plain_equals_llama_cpp"] for r in rows) / len(rows), 3),
            "llama_cpp_mean_common_prefix": round(sum(r["llama_cpp_common_prefix"] for r in rows) / len(rows), 2),
            "per_prompt": rows}


def _common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens two greedy outputs share before they first differ (quantized kernels may split near-ties)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _add(row: dict, tot: dict, name: str, n: int, s: float) -> None:
    row[f"{name}_tok_s"] = round(n / s, 2)
    tot[name][0] += n
    tot[name][1] += s
