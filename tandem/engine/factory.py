"""Build a ready Engine from EngineOptions: target (or the embedded default), weight format, cache types, drafter."""

from __future__ import annotations

import dataclasses

import torch

from tandem.engine.core import Engine
from tandem.engine.options import EngineOptions
from tandem.errors import ConfigError


def check_cache_type(name: str) -> str:
    """Canonical KV cache type name (bf16, f16, f32, q8_0, turbo4, turbo3, turbo2; aliases int8, fp16, ...)."""
    from tandem.kernels.quant_attention import get_format
    return get_format(name).name


def build_engine(opts: EngineOptions, n_slots: int = 1) -> Engine:
    """Load the target (+ its drafter when opts.spec.enabled) and return an Engine with n_slots slots.

    With no drafter (none given, none known for the target, none in its checkpoint) the engine's speculation is
    switched off."""
    k_type = check_cache_type(opts.cache_type_k)  # before loading anything: a typo fails fast
    v_type = check_cache_type(opts.cache_type_v or opts.cache_type_k)
    from tandem import kernels, loading, spec

    if opts.threads:
        torch.set_num_threads(opts.threads)
    loaded = loading.load(opts.model, device=opts.device, dtype=torch.float32)
    target = loaded.model
    kernels.prepare(target, opts.weight_format)  # fp32 too: its fixed-shape row blocks keep it exact
    drafter = None
    if opts.spec.enabled:
        drafter = spec.build_drafters(opts.spec.chain, lambda: load_model_drafter(opts, target, loaded),
                                      dict(n_min=opts.ngram_n_min, n_max=opts.ngram_n_max, cache_size=opts.ngram_cache))
    # the chain's order lives in the drafter: requests without a chain of their own use it (or their method's kind)
    spec_cfg = dataclasses.replace(opts.spec, enabled=drafter is not None and opts.spec.enabled, chain=())
    eng = Engine(target, loaded.tokenizer, max_len=opts.max_len, n_slots=n_slots, cache_type_k=k_type,
                 cache_type_v=v_type, device=opts.device, drafter=drafter, spec=spec_cfg,
                 prefix_cache_mb=opts.prefix_cache_mb)
    eng.loaded = loaded
    return eng


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
