"""KV cache quality: perplexity per cache type and next-token agreement with the bf16 cache, on held-out text.

The text (default: documentation shipped with this Python, idlelib/NEWS.txt, else argparse.py) is cut into chunks
of --kv-chunk-len tokens (BOS first); each chunk runs from an empty cache in pieces of PIECE tokens with all logits,
so every prediction reads K/V back through the cache type under test (the same row-invariant kernel as decoding).
With --kv-greedy-tokens N, every `bench --spec` prompt is also decoded greedily for N tokens per type and compared
with the bf16-cache output (whole outputs identical, and tokens up to the first difference).
"""

from __future__ import annotations

import dataclasses
import math
import sysconfig
import time
from pathlib import Path

import torch

from tandem.errors import ConfigError

PIECE = 128  # rows per forward: bounds the [PIECE, vocab] logits held at once
DEFAULT_TYPES = "bf16,q8_0,turbo4,turbo3,turbo2"


def default_text() -> Path:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for rel in ("idlelib/NEWS.txt", "argparse.py"):
        if (stdlib / rel).is_file():
            return stdlib / rel
    raise ConfigError("no default text found in the Python stdlib; pass --kv-text FILE")


def chunks_of(tokenizer, text: str, n_chunks: int, length: int) -> list[list[int]]:
    """n_chunks consecutive chunks of `length` ids each (BOS, when the tokenizer has one, then length - 1 ids)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_id] if getattr(tokenizer, "bos_id", None) is not None else []
    body = length - len(bos)
    n = min(n_chunks, len(ids) // body)
    if n == 0:
        raise ConfigError(f"text has {len(ids)} tokens, fewer than one chunk of {length} (--kv-chunk-len)")
    return [bos + ids[i * body:(i + 1) * body] for i in range(n)]


@torch.inference_mode()
def score(eng, chunk: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(nll [L-1] of each next token, argmax [L-1] of each prediction) for one chunk from an empty cache."""
    eng.cache.set_length(0, 0)
    nll, top = [], []
    for p0 in range(0, len(chunk), PIECE):
        logits = eng.forward_rows(0, chunk[p0:p0 + PIECE]).logits[0].float()  # [piece, vocab]
        tgt = torch.tensor(chunk[p0 + 1:p0 + PIECE + 1])
        logits = logits[:len(tgt)]
        nll.append(torch.nn.functional.cross_entropy(logits, tgt, reduction="none"))
        top.append(logits.argmax(-1))
    return torch.cat(nll), torch.cat(top)


def run_kv_quality(a) -> dict:
    from tandem.engine.factory import build_engine
    from tandem.engine.options import EngineOptions

    opts = EngineOptions.from_args(a).plain()
    eng = build_engine(dataclasses.replace(opts, max_len=max(opts.max_len, a.kv_chunk_len)))
    path = Path(a.kv_text) if a.kv_text else default_text()
    chunks = chunks_of(eng.tokenizer, path.read_text(encoding="utf-8", errors="replace"), a.kv_chunks,
                       a.kv_chunk_len)
    types = [t.strip() for t in a.kv_types.split(",") if t.strip()]
    if "bf16" not in types:
        types.insert(0, "bf16")  # the reference of the agreement
    types.sort(key=lambda t: t != "bf16")
    res = {"model": str(eng.loaded.path), "weight_format": a.weight_format, "text": str(path),
           "chunks": len(chunks), "chunk_len": a.kv_chunk_len, "predictions": sum(len(c) - 1 for c in chunks),
           "types": {}}
    base_top, base_out = None, None
    for t in types:
        kt, _, vt = t.partition(":")  # "K:V" measures a mixed pair, e.g. q8_0:turbo4
        # room for a chunk, or for a bench prompt (well under a chunk) plus its greedy tokens
        eng.cache = eng.model.make_cache(1, a.kv_chunk_len + a.kv_greedy_tokens, k_type=kt, v_type=vt or kt,
                                         device=eng.device)
        name = eng.cache.k_type if eng.cache.k_type == eng.cache.v_type else f"{eng.cache.k_type}:{eng.cache.v_type}"
        t0 = time.perf_counter()
        scored = [score(eng, c) for c in chunks]
        nll = torch.cat([s[0] for s in scored])
        top = torch.cat([s[1] for s in scored])
        base_top = top if t == "bf16" else base_top
        res["types"][name] = {
            "kv_bytes_per_token": eng.cache.bytes_per_token,
            "ppl": round(math.exp(float(nll.double().mean())), 4),
            "agree_vs_bf16": round(float((top == base_top).double().mean()), 4),
            "seconds": round(time.perf_counter() - t0, 1)}
        if a.kv_greedy_tokens:
            outs = greedy_outputs(eng, a.kv_greedy_tokens)
            base_out = outs if t == "bf16" else base_out
            res["types"][name].update(_compare(outs, base_out))
    _print_table(res)
    return res


def greedy_outputs(eng, n: int) -> list[list[int]]:
    """Greedy completions of every bench prompt, n tokens each (EOS ignored), with the engine's current cache."""
    from tandem.bench.prompts import CATEGORIES, PROMPTS
    from tandem.config import SamplingParams

    sp = SamplingParams(max_tokens=n, ignore_eos=True)
    return [eng.complete(p, sp)[0] for c in CATEGORIES for p in PROMPTS[c]]


def _compare(outs: list[list[int]], base: list[list[int]]) -> dict:
    """Whole-output equality with the bf16 outputs, and the mean share of tokens before the first difference."""
    def prefix(a, b):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return n / max(1, len(b))
    return {"greedy_identical": f"{sum(o == b for o, b in zip(outs, base))}/{len(base)}",
            "greedy_prefix_share": round(sum(prefix(o, b) for o, b in zip(outs, base)) / len(base), 4)}


def _print_table(res: dict) -> None:
    print(f"model {res['model']}  weights {res['weight_format']}")
    print(f"text {res['text']}: {res['chunks']} chunks x {res['chunk_len']} tokens, {res['predictions']} predictions")
    base = res["types"]["bf16"]["ppl"]
    greedy = "greedy_identical" in res["types"]["bf16"]
    print(f"{'KV type':14}{'bytes/tok':>11}{'ppl':>10}{'ppl/bf16':>10}{'agree':>8}"
          + (f"{'greedy same':>13}{'prefix':>8}" if greedy else ""))
    for t, r in res["types"].items():
        print(f"{t:14}{r['kv_bytes_per_token']:>11}{r['ppl']:>10.4f}{r['ppl'] / base:>10.4f}{r['agree_vs_bf16']:>8.4f}"
              + (f"{r['greedy_identical']:>13}{r['greedy_prefix_share']:>8.3f}" if greedy else ""))
