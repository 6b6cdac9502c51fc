"""The llama.cpp arm of `tandem bench --spec --compare llama.cpp` (tandem.bench.spec_bench): llama-cpp-python's eval
loop, greedy over the real logits, on the same GGUF, thread count, prompt token ids and stop rule as Tandem. Against
Tandem's plain output the rate of identical outputs and the mean common prefix are reported (different kernels may
break near-ties differently)."""

from __future__ import annotations

import time

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

    def generate(self, ids: list[int], n: int, eos: set[int]) -> tuple[list[int], int, float]:
        """Up to n greedy tokens after the prompt ids, stopping at a token in `eos` (counted, as Tandem counts it,
        but not returned); returns the tokens, the count and the wall seconds (prefill included, as Tandem's)."""
        t = time.perf_counter()
        self.llm.reset()
        self.llm.eval(ids)
        out = [self._argmax()]
        while len(out) < n and out[-1] not in eos:
            self.llm.eval([out[-1]])
            out.append(self._argmax())
        dt = time.perf_counter() - t
        return (out[:-1] if out[-1] in eos else out), len(out), dt


def common_prefix(a: list[int], b: list[int]) -> int:
    """Tokens two greedy outputs share before they first differ (quantized kernels may split near-ties)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
