"""Build a ready Engine from names: model path (or the embedded default), weight format, cache types, drafter."""

from __future__ import annotations

import torch

from tandem.config import SpecConfig
from tandem.engine.core import Engine
from tandem.errors import ConfigError

CACHE_DTYPES = {"f32": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16,
                "fp16": torch.float16}


def cache_dtype(name: str) -> torch.dtype:
    if name not in CACHE_DTYPES:
        raise ConfigError(f"unknown cache type {name!r}; expected one of {sorted(CACHE_DTYPES)}")
    return CACHE_DTYPES[name]


def check_cache_type(name: str) -> str:
    """Canonical KV cache type name (bf16, f16, f32, q8_0, turbo4, turbo3, turbo2; aliases int8, fp16, ...)."""
    from tandem.kernels.quant_attention import get_format
    return get_format(name).name


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def load_engine(model: str | None = None, drafter: str | None = None, *, device: str = "cpu",
                weight_format: str = "q8_0", cache_type: str | None = None, cache_type_k: str | None = None,
                cache_type_v: str | None = None, max_len: int = 4096, n_slots: int = 1,
                threads: int | None = None, spec: SpecConfig | None = None, use_spec: bool = True) -> Engine:
    """Load target (+ drafter) and return an Engine. drafter=None picks the known drafter for the model, if any.

    KV cache: cache_type_k / cache_type_v (default: cache_type, else bf16); see tandem.kvcache."""
    k_type = check_cache_type(cache_type_k or cache_type or "bf16")
    v_type = check_cache_type(cache_type_v or cache_type_k or cache_type or "bf16")
    from tandem import kernels, loading

    set_threads(threads)
    loaded = loading.load(model, device=device, dtype=torch.float32)
    target = loaded.model
    if weight_format != "fp32":
        kernels.prepare(target, weight_format)
    drafter_obj = None
    if use_spec:
        from tandem import spec as spec_pkg
        find = getattr(spec_pkg, "load_drafter", None)
        if find is not None:
            drafter_obj = find(drafter, target=target, target_loaded=loaded, device=device,
                               weight_format=weight_format)
        elif drafter is not None:
            raise ConfigError("this build has no drafter support (tandem.spec.load_drafter missing)")
    spec = spec or SpecConfig(enabled=drafter_obj is not None)
    eng = Engine(target, loaded.tokenizer, max_len=max_len, n_slots=n_slots, cache_type_k=k_type,
                 cache_type_v=v_type, device=device, drafter=drafter_obj, spec=spec)
    eng.loaded = loaded
    return eng
