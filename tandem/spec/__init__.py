"""Speculative decoding: drafter protocol + registry, verification, stats, tracing.

Methods (SpecConfig.method) are registered in tandem.spec.drafter.METHODS; importing this package registers the
built-in ones.
"""

from __future__ import annotations

from typing import Any

from tandem.errors import ModelLoadError
from tandem.spec.drafter import METHODS, Draft, DraftContext, Drafter, Method, PromptState, get_method, register
from tandem.spec.mtp_assistant import MTPAssistantDrafter
from tandem.spec.stats import SpecStats
from tandem.spec.trace import Tracer, get_tracer, set_tracer
from tandem.spec.verify import Verdict, verify

__all__ = ["METHODS", "Draft", "DraftContext", "Drafter", "Method", "PromptState", "get_method", "register",
           "MTPAssistantDrafter", "SpecStats", "Tracer", "get_tracer", "set_tracer", "Verdict", "verify",
           "load_drafter", "drafter_for_model"]


def _name(loaded: Any, fallback: str) -> str:
    for attr in ("source", "path", "name"):
        v = getattr(loaded, attr, None)
        if v:
            return str(v)
    return fallback


def drafter_for_model(model: Any, target: Any, target_name: str = "target", name: str = "drafter") -> Drafter:
    """Wrap an already built drafter model for `target` (raises ModelLoadError if it does not fit)."""
    mtype = getattr(getattr(model, "args", None), "model_type", None)
    if mtype == "gemma4_assistant":
        return MTPAssistantDrafter(model, target, target_name, name)
    raise ModelLoadError(f"drafter {name}: model_type {mtype!r} is not a supported drafter (supported: "
                         f"gemma4_assistant)")


def load_drafter(drafter: str | None, *, target: Any, target_loaded: Any = None, device: str = "cpu",
                 weight_format: str = "bf16") -> Drafter | None:
    """Load a drafter from a path/name for `target`. drafter=None: no known default drafter -> None."""
    if drafter is None:
        return None
    import torch

    from tandem import loading

    loaded = loading.load(drafter, device=device, dtype=torch.float32, tokenizer=False)
    model = loaded.model.eval()
    if weight_format != "fp32":
        from tandem import kernels
        prepare = getattr(kernels, "prepare", None)
        if prepare is not None:
            prepare(model, weight_format)
    return drafter_for_model(model, target, _name(target_loaded, "target"), _name(loaded, drafter))
