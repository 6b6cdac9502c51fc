"""Build a ready Engine from EngineOptions: target (or the embedded default), weight format, cache types, drafter."""

from __future__ import annotations

import dataclasses
import logging

import torch

from tandem.engine import memory
from tandem.engine.core import Engine
from tandem.engine.options import EngineOptions
from tandem.errors import ConfigError

log = logging.getLogger("tandem.engine")


def check_cache_type(name: str) -> str:
    """Canonical KV cache type name (bf16, f16, f32, q8_0, turbo4, turbo3, turbo2; aliases int8, fp16, ...)."""
    from tandem.kernels.quant_attention import get_format
    return get_format(name).name


def build_engine(opts: EngineOptions, n_slots: int = 1) -> Engine:
    """Load the target (+ its drafter when opts.spec.enabled) and return an Engine with n_slots slots.

    With no model drafter (none given, none known for the target, none in its checkpoint) the default chain is the
    n-gram drafter alone."""
    k_type = check_cache_type(opts.cache_type_k)  # before loading anything: a typo fails fast
    v_type = check_cache_type(opts.cache_type_v or opts.cache_type_k)
    from tandem import loading, spec

    if opts.threads:
        torch.set_num_threads(opts.threads)
    # fp32 too is prepared: its fixed-shape row blocks keep it exact; a GGUF is read straight into the format
    loaded = loading.load(opts.model, device=opts.device, dtype=torch.float32, weight_format=opts.weight_format)
    target = loaded.model
    drafter = None
    if opts.spec.enabled:
        drafter = spec.build_drafters(opts.spec.chain, lambda: load_model_drafter(opts, target, loaded),
                                      dict(n_min=opts.ngram_n_min, n_max=opts.ngram_n_max, cache_size=opts.ngram_cache))
    # the chain's order lives in the drafter: requests without a chain of their own use it (or their method's kind)
    spec_cfg = dataclasses.replace(opts.spec, enabled=drafter is not None and opts.spec.enabled, chain=())
    max_len, chosen = opts.max_len, None
    if opts.fit:
        chosen = _fit(opts, target, drafter, loaded.config, n_slots, dict(k_type=k_type, v_type=v_type,
                                                                          device=opts.device))
        max_len, n_slots = chosen.max_len, chosen.n_slots
    eng = Engine(target, loaded.tokenizer, max_len=max_len, n_slots=n_slots, cache_type_k=k_type,
                 cache_type_v=v_type, device=opts.device, drafter=drafter, spec=spec_cfg,
                 prefix_cache_mb=opts.prefix_cache_mb)
    eng.loaded, eng.fit = loaded, chosen
    eng.rss_after_load = memory.rss_bytes()  # weights, caches and warm-up: what serving starts from
    return eng


def _fit(opts: EngineOptions, target, drafter, config: dict, n_slots: int, types: dict) -> memory.Fit:
    """--fit: the context (<= --ctx-size and the model's trained context) and slots (<= asked) the free memory
    holds, measured on small caches of the real kinds (per-token and per-slot bytes)."""
    def cache_bytes(slots: int, ctx: int) -> int:
        n = target.make_cache(slots, ctx, **types).total_bytes
        if drafter is not None:
            drafter.make_cache(slots, ctx, **types)
            n += memory.drafter_cache_bytes(drafter)
        return n

    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    trained = text.get("max_position_embeddings")
    cap = min(opts.max_len, trained) if isinstance(trained, int) and trained > 0 else opts.max_len
    chosen = memory.fit(cache_bytes, cap, n_slots)
    log.warning("%s", chosen.describe())
    return chosen


def load_model_drafter(opts: EngineOptions, target, loaded):
    """The model drafter (--drafter, the known one, or the target's heads) in --draft-weight-format (default the
    target's), a draft model running on --draft-threads."""
    from tandem import spec

    d = spec.load_drafter(opts.drafter, target=target, target_loaded=loaded, device=opts.device,
                          weight_format=opts.draft_weight_format or opts.weight_format,
                          mtp_weight_format=opts.mtp_weight_format)
    if opts.draft_threads is not None:
        if not isinstance(d, spec.DraftModelDrafter):
            raise ConfigError(f"--draft-threads {opts.draft_threads}: sets a draft model's threads, but the drafter "
                              f"loaded is {d.describe() if d is not None else 'none'}")
        d.threads = opts.draft_threads
    return d


def load_engine(model: str | None = None, drafter: str | None = None, *, n_slots: int = 1, **options) -> Engine:
    """build_engine with the options as keywords (EngineOptions' fields), for tests and embedding."""
    return build_engine(EngineOptions(model=model, drafter=drafter, **options), n_slots)
