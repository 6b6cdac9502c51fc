"""Core speed: prefill tok/s, decode tok/s, cost of a k-token forward relative to 1 token, peak RSS."""

from __future__ import annotations

import statistics
import time

import torch

from tandem.bench.text import text_of_tokens
from tandem.engine import memory
from tandem.errors import ConfigError


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def measure_engine(eng, context: int, decode_tokens: int, ks: list[int], reps: int) -> dict:
    slot = 0
    ids = text_of_tokens(eng.tokenizer, context)
    prefill_ms = _median_ms(lambda: eng.prefill(slot, ids), max(1, reps // 2))

    # decode: greedy, one token per forward, starting from the context
    def decode():
        out = eng.prefill(slot, ids)
        tok = int(out.logits[0, -1].argmax())
        t = time.perf_counter()
        for _ in range(decode_tokens):
            tok = int(eng.forward_rows(slot, [tok], logit_rows=slice(-1, None)).logits[0, -1].argmax())
        return time.perf_counter() - t
    decode()
    decode_s = statistics.median(decode() for _ in range(max(1, reps // 2)))

    # k-forward cost at the same context: forward k rows (all logits, as verification does), then roll back
    eng.prefill(slot, ids)
    base = eng.cache.lengths[slot]
    k_ms = {}
    for k in ks:
        def fwd(k=k):
            eng.forward_rows(slot, ids[:k])
            eng.cache.rollback(slot, base)
        k_ms[k] = _median_ms(fwd, reps * 2)
    return {
        "prefill_tok_s": round(context / (prefill_ms / 1000), 1),
        "decode_tok_s": round(decode_tokens / decode_s, 2),
        "k_ms": {str(k): round(v, 2) for k, v in k_ms.items()},
        "k_cost": {str(k): round(v / k_ms[ks[0]], 3) for k, v in k_ms.items()},
    }


def measure_llama_cpp(path: str, threads: int, context: int, decode_tokens: int, reps: int, ids: list[int]) -> dict:
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("--compare llama.cpp needs llama-cpp-python: pip install 'tandem[llama]'") from None
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=context + 2 * decode_tokens,
                          n_batch=512, verbose=False, logits_all=False)

    def prefill():
        llm.reset()
        llm.eval(ids)
    prefill_ms = _median_ms(prefill, max(1, reps // 2))

    def decode():
        prefill()
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        t = time.perf_counter()
        for _ in range(decode_tokens):
            llm.eval([tok])
            tok = int(llm.scores[llm.n_tokens - 1].argmax())
        return time.perf_counter() - t
    decode()
    decode_s = statistics.median(decode() for _ in range(max(1, reps // 2)))
    return {"llama_cpp_prefill_tok_s": round(context / (prefill_ms / 1000), 1),
            "llama_cpp_decode_tok_s": round(decode_tokens / decode_s, 2)}


def run_core_bench(a) -> dict:
    from tandem.engine.factory import build_engine
    from tandem.engine.options import EngineOptions

    opts = EngineOptions.from_args(a).plain()
    ks = [int(k) for k in a.ks.split(",")]
    need = a.context + a.decode_tokens + max(ks) + 8
    if opts.max_len < need:  # before loading anything
        raise ConfigError(f"--ctx-size {opts.max_len} is too small for --context {a.context} + --decode-tokens "
                          f"{a.decode_tokens} + k {max(ks)}; need {need}")
    t_load = time.perf_counter()
    eng = build_engine(opts)
    load_s = time.perf_counter() - t_load
    threads = a.threads or torch.get_num_threads()
    res = {"model": str(eng.loaded.path), "weight_format": a.weight_format, "threads": threads,
           "context": a.context, "cache_type_k": eng.cache.k_type, "cache_type_v": eng.cache.v_type,
           "kv_bytes_per_token": eng.cache.bytes_per_token, "kv_total_mb": round(eng.cache.total_bytes / 2**20, 1),
           "exact": eng.exact[0], "exact_reason": eng.exact[1], "load_s": round(load_s, 2),
           **_memory_mb(eng)}
    res.update(measure_engine(eng, a.context, a.decode_tokens, ks, a.reps))
    res["peak_rss_tandem_mb"] = round(memory.peak_rss_bytes() / 2**20, 1)  # before llama.cpp shares the process
    if a.compare == "llama.cpp":
        if eng.loaded.kind != "gguf":
            raise ConfigError(f"--compare llama.cpp needs a GGUF model, got {eng.loaded.kind} {eng.loaded.path}")
        ids = text_of_tokens(eng.tokenizer, a.context)
        res.update(measure_llama_cpp(str(eng.loaded.path), threads, a.context, a.decode_tokens, a.reps, ids))
        res["decode_ratio_vs_llama_cpp"] = round(res["decode_tok_s"] / res["llama_cpp_decode_tok_s"], 3)
        res["prefill_ratio_vs_llama_cpp"] = round(res["prefill_tok_s"] / res["llama_cpp_prefill_tok_s"], 3)
    res["peak_rss_mb"] = round(memory.peak_rss_bytes() / 2**20, 1)  # llama.cpp's run included when compared
    _print_table(res, ks)
    return res


def _memory_mb(eng) -> dict:
    """RSS once loaded and its peak so far (the load's), the file, and the caches, in MiB."""
    import os
    m = memory.report(eng)
    mb = lambda b: None if b is None else round(b / 2**20, 1)  # noqa: E731
    path = str(eng.loaded.path)
    return {"file_mb": mb(os.path.getsize(path)) if os.path.isfile(path) else None,
            "rss_after_load_mb": mb(m["rss_after_load_bytes"]), "peak_rss_load_mb": mb(m["peak_rss_bytes"]),
            "kv_cache_mb": mb(m["kv_cache_bytes"]), "drafter_cache_mb": mb(m["drafter_cache_bytes"])}


def _print_table(res: dict, ks: list[int]) -> None:
    print(f"model {res['model']}  weights {res['weight_format']}  threads {res['threads']}  context {res['context']}")
    print(f"KV cache K {res['cache_type_k']} V {res['cache_type_v']}: {res['kv_bytes_per_token']} bytes/token, "
          f"{res['kv_total_mb']} MB allocated")
    print(f"{'':24}{'tandem':>12}" + (f"{'llama.cpp':>12}{'ratio':>8}" if "llama_cpp_decode_tok_s" in res else ""))
    for key, lk, rk in (("prefill_tok_s", "llama_cpp_prefill_tok_s", "prefill_ratio_vs_llama_cpp"),
                        ("decode_tok_s", "llama_cpp_decode_tok_s", "decode_ratio_vs_llama_cpp")):
        line = f"{key:24}{res[key]:>12}"
        if lk in res:
            line += f"{res[lk]:>12}{res[rk]:>8}"
        print(line)
    print("k-forward cost (k tokens / 1 token): " + "  ".join(
        f"k={k}: {res['k_cost'][str(k)]}x ({res['k_ms'][str(k)]} ms)" for k in ks))
    print(f"load {res['load_s']} s; RSS after load {res['rss_after_load_mb']} MB, peak during load "
          f"{res['peak_rss_load_mb']} MB (file {res['file_mb']} MB, KV cache {res['kv_cache_mb']} MB, drafter caches "
          f"{res['drafter_cache_mb']} MB); peak RSS {res['peak_rss_tandem_mb']} MB after Tandem's runs, "
          f"{res['peak_rss_mb']} MB at the end")
