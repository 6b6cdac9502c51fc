"""Kernel benchmarks: `python -m tandem.bench.kernels [--formats ...] [--shapes]`.

--shapes: per linear shape of the real models (d = 576, 640, 896, 1536; FFN 8960; vocab 49k, 151k, 262k) in the GGUF
type those models store it in, the k-row cost (k-row GEMM / 1-row GEMM, k = 2, 4, 8) with cold weights.
Then, on a random-weight Gemma-3-270M, per format: single-token decode ms/step at a given context, the k-forward cost table (k-token forward /
1-token forward), the share of a step that is not kernel time (all linears and attention replaced by no-ops),
and per-linear GB/s at M = 1 and 4 (cold weights: a full model's worth of layers is cycled so caches do not help).
Timings are medians over repeats; the machine may be shared, so run it more than once.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch
import torch.nn.functional as F

from tandem import kernels
from tandem.kernels import linear as klinear
from tandem.models.gemma3 import Model, ModelArgs


def med(f, reps):
    f()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def build(fmt: str, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    m = Model(ModelArgs()).eval()
    with torch.no_grad():  # realistic scales (nn.Linear init is fine; embedding N(0,1) is too large for bf16 tests)
        m.model.embed_tokens.weight.mul_(0.03)
    kernels.prepare(m, fmt)
    gc.collect()
    return m


def step_times(model: Model, ctx: int, ks, reps: int):
    cache = model.make_cache(1, ctx + 16, k_type="f32")
    slots = torch.tensor([0])
    with torch.inference_mode():
        model(torch.randint(0, 1000, (1, ctx)), torch.arange(ctx)[None], cache, slots, logit_rows=slice(-1, None))
        out = {}
        for k in ks:
            tok = torch.randint(0, 1000, (1, k))
            pos = torch.arange(ctx, ctx + k)[None]
            out[k] = med(lambda: model(tok, pos, cache, slots), reps)
    return out


class _NoKernels:
    """Context: every PackedLinear / nn.Linear and attend() return an empty tensor of the right shape."""

    def __enter__(self):
        self.saved = (klinear.PackedLinear.forward, kernels.attend, F.linear)
        klinear.PackedLinear.forward = lambda s, x: x.new_empty(*x.shape[:-1], s.out_features)
        kernels.attend = lambda q, k, v, *a, **kw: q.new_empty(*q.shape[:-1], v.shape[-1])
        import tandem.kvcache.cache as kc
        kc.kernels.attend = kernels.attend
        return self

    def __exit__(self, *exc):
        klinear.PackedLinear.forward, kernels.attend, _ = self.saved
        import tandem.kvcache.cache as kc
        kc.kernels.attend = kernels.attend


def linear_gbps(fmt: str, reps: int = 20):
    """GB/s of each Gemma-3-270M linear shape at M=1 and M=4, weights cold (18 copies cycled, as in a step)."""
    shapes = {"q_proj": (1024, 640), "k_proj": (256, 640), "o_proj": (640, 1024), "gate/up": (2048, 640),
              "down_proj": (640, 2048)}
    res = {}
    for name, (N, K) in shapes.items():
        ws = [torch.randn(N, K) * 0.05 for _ in range(18)]
        mods = [klinear.PackedLinear.from_weight(w, fmt) if fmt != "stock_fp32" else None for w in ws]
        for M in (1, 4):
            x = torch.randn(M, K)
            if fmt == "stock_fp32":
                t = med(lambda: [F.linear(x, w) for w in ws], reps) / 18
                nbytes = N * K * 4
            else:
                t = med(lambda: [m(x) for m in mods], reps) / 18
                nbytes = mods[0].weight_bytes
            res[(name, M)] = (t * 1e3, nbytes / t / 1e9)
    N, K = 262144, 640
    w = torch.randn(N, K) * 0.05
    m = klinear.PackedLinear.from_weight(w, fmt) if fmt != "stock_fp32" else None
    del w
    for M in (1, 4, 9):
        x = torch.randn(M, K)
        if m is None:
            wf = torch.randn(N, K)
            t = med(lambda: F.linear(x, wf), 5)
            nbytes = N * K * 4
        else:
            t = med(lambda: m(x), 7)
            nbytes = m.weight_bytes
        res[("lm_head", M)] = (t * 1e3, nbytes / t / 1e9)
    return res


# (model, linear, N, K, GGUF type) as the real models store them
SHAPES = [
    ("smollm2-135m", "q/o", 576, 576, "Q4_1"), ("smollm2-135m", "gate/up", 1536, 576, "Q4_1"),
    ("smollm2-135m", "down", 576, 1536, "Q4_1"), ("smollm2-135m", "head 49k", 49152, 576, "Q8_0"),
    ("gemma3-270m", "q", 1024, 640, "Q5_0"), ("gemma3-270m", "gate/up", 2048, 640, "Q5_0"),
    ("gemma3-270m", "down", 640, 2048, "Q4_K"),
    ("gemma3-270m", "head 262k", 262144, 640, "Q8_0"),
    ("qwen2.5-0.5b", "q/o", 896, 896, "Q5_0"), ("qwen2.5-0.5b", "gate/up", 4864, 896, "Q5_0"),
    ("qwen2.5-0.5b", "head 151k", 151936, 896, "Q8_0"),
    ("qwen2.5-1.5b", "q/o", 1536, 1536, "Q4_K"), ("qwen2.5-1.5b", "gate/up", 8960, 1536, "Q4_K"),
    ("qwen2.5-1.5b", "down", 1536, 8960, "Q6_K"), ("qwen2.5-1.5b", "head 151k", 151936, 1536, "Q6_K"),
]


def random_gguf(qtype: str, N: int, K: int, seed: int = 0) -> "PackedLinear":
    """A PackedLinear of random valid `qtype` blocks (random bits, small finite fp16 scales)."""
    from tandem.kernels import kquants
    gen = torch.Generator().manual_seed(seed)
    qk, nbytes = kquants.BLOCK_BYTES[qtype]
    raw = torch.randint(0, 256, (N, K // qk * nbytes), dtype=torch.uint8, generator=gen).numpy()
    fmt = kquants.GGUF_TYPES[qtype]
    f = kquants.parse_gguf(qtype, raw, K)
    for k, v in f.items():
        if v.dtype == torch.float16:
            f[k] = (torch.randn(v.shape, generator=gen) * 1e-3).half()
    if fmt == "q8_0x8":
        return klinear.PackedLinear.from_q8_0((f["u"] ^ 0x80).view(torch.int8), f["d"], fmt=fmt)
    return klinear.PackedLinear(K, N, fmt, {f"vnni{i}": t for i, t in enumerate(kquants.pack(fmt, f))})


def shape_costs(reps: int, cpu_time: bool, cold_bytes: float = 128e6):
    """Per SHAPES entry: ms of a 1-row GEMM and the k-row / 1-row cost for k = 2, 4, 8, weights cycled through
    enough copies to exceed the caches; the row counts take turns and each keeps its fastest sweep (a shared
    machine's interference only adds time). cpu_time: the process's CPU time on one thread, which waiting for a
    busy machine's cores does not inflate."""
    clock = time.process_time if cpu_time else time.perf_counter
    for model, name, N, K, qtype in SHAPES:
        lin = random_gguf(qtype, N, K)
        mods = [lin] + [random_gguf(qtype, N, K, seed=i) for i in range(1, max(1, int(cold_bytes / lin.weight_bytes)))]
        xs = {M: torch.randn(M, K) for M in (1, 2, 4, 8)}
        t = {M: float("inf") for M in xs}
        for _ in range(reps):
            for M, x in xs.items():
                t0 = clock()
                for m in mods:
                    m(x)
                t[M] = min(t[M], (clock() - t0) / len(mods))
        print(f"[shape] {model:13s} {name:9s} {N:6d}x{K:<5d} {qtype:5s} 1 row {t[1] * 1e3:7.3f} ms "
              f"({lin.weight_bytes / t[1] / 1e9:5.1f} GB/s)  " + "  ".join(f"k={M}: {t[M] / t[1]:.2f}x" for M in (2, 4, 8)),
              flush=True)
        del mods, lin
        gc.collect()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tandem.bench.kernels", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", nargs="+", default=["fp32", "bf16", "q8_0", "q8_0x8", "native"])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--linears", action="store_true", help="also per-linear GB/s")
    ap.add_argument("--shapes", action="store_true", help="only the per-shape k-row costs of the real models' linears")
    ap.add_argument("--cpu-time", action="store_true", help="--shapes on one thread, timed in CPU seconds (for a "
                    "loaded machine; TANDEM_VNNI_NARROW_MIN=n: narrow tiles from n rows on in every format)")
    a = ap.parse_args(argv)
    if a.shapes:
        if a.cpu_time:
            torch.set_num_threads(1)
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {'CPU' if a.cpu_time else 'wall'} time")
        return shape_costs(a.reps, a.cpu_time)
    ks = (1, 2, 4, 8)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, fast kernels: "
          f"{'yes' if kernels.linear.ext() is not None else 'no'}")
    for fmt in a.formats:
        model = build(fmt)
        wbytes = sum(b.numel() * b.element_size() for b in list(model.parameters()) + list(model.buffers()))
        t = step_times(model, a.ctx, ks, a.reps)
        with _NoKernels():
            t0 = step_times(model, a.ctx, (1, 4), a.reps)
        table = "  ".join(f"k={k}: {t[k] / t[1]:.2f}x" for k in ks)
        print(f"[{fmt}] weights {wbytes / 1e6:.0f} MB  decode@{a.ctx}: {t[1] * 1e3:.2f} ms/step "
              f"({wbytes / t[1] / 1e9:.1f} GB/s eff)  k-cost: {table}  (k=8: {t[8] * 1e3:.2f} ms)")
        print(f"[{fmt}] glue with kernels as no-ops: k=1 {t0[1] * 1e3:.2f} ms ({t0[1] / t[1]:.0%} of step), "
              f"k=4 {t0[4] * 1e3:.2f} ms ({t0[4] / t[4]:.0%})", flush=True)
        del model
        gc.collect()
    if a.linears:
        for fmt in ["stock_fp32"] + [f for f in a.formats if f != "fp32"]:
            r = linear_gbps(fmt)
            print(f"[{fmt}] " + "  ".join(f"{n}@M{M}: {ms:.3f}ms {gb:.1f}GB/s" for (n, M), (ms, gb) in r.items()),
                  flush=True)


if __name__ == "__main__":
    main()
