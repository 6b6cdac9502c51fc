"""Speculative decoding: drafter protocol v2 + the registry of kinds, the draft-length policy, verification,
stats, tracing.

Drafter kinds (tandem.spec.drafter.KINDS) are registered by their modules, imported here; request-level method
names (SpecConfig.method) map onto kinds in tandem.spec.drafter.METHODS.
"""

from __future__ import annotations

import logging
from typing import Any

from tandem.errors import ModelLoadError
from tandem.spec.assistant import MTPAssistantDrafter
from tandem.spec.draft_model import DraftModelDrafter
from tandem.spec.nextn import NextNDrafter  # noqa: F401  (registers kind `nextn`)
from tandem.spec.eagle3 import Eagle3Drafter, load_eagle3_drafter  # registers kind `eagle3`
from tandem.loading.eagle3 import eagle3_config
from tandem.spec.nextn_dir import load_nextn_dir, nextn_dir_config
from tandem.spec.ngram import NgramDrafter  # registers kind `ngram`
from tandem.spec.chain import ChainDrafter, build_drafters, check_spec
from tandem.spec.drafter import (KINDS, METHODS, Draft, DraftContext, Drafter, Kind, Method, PromptState,
                                 get_method, in_target_kind, kind_of, register_kind, register_method)
from tandem.spec.policy import DraftPolicy, read_recommended
from tandem.spec.stats import SpecStats
from tandem.spec.trace import Tracer, get_tracer, set_tracer
from tandem.spec.verify import Verdict, verify

__all__ = ["KINDS", "METHODS", "Draft", "DraftContext", "Drafter", "Kind", "Method", "PromptState", "get_method",
           "in_target_kind", "kind_of", "register_kind", "register_method", "DraftPolicy", "MTPAssistantDrafter",
           "DraftModelDrafter", "Eagle3Drafter", "NgramDrafter", "ChainDrafter", "build_drafters", "check_spec",
           "SpecStats", "Tracer", "get_tracer", "set_tracer", "Verdict", "verify", "load_drafter", "drafter_for_model"]

log = logging.getLogger("tandem.spec")


def _name(loaded: Any, fallback: str) -> str:
    for attr in ("source", "path", "name"):
        v = getattr(loaded, attr, None)
        if v:
            return str(v)
    return fallback


def drafter_for_model(model: Any, target: Any, target_name: str = "target", name: str = "drafter", *,
                      tokenizer: Any = None, target_tokenizer: Any = None) -> Drafter:
    """Wrap an already built drafter model for `target`, as the kind the model is (ModelLoadError if it does not
    fit). A drafter that owns a cache still needs make_cache (Engine.__init__ calls it)."""
    return kind_of(model, name).build(model, target, target_name=target_name, name=name, tokenizer=tokenizer,
                                      target_tokenizer=target_tokenizer)


def load_drafter(drafter: str | None, *, target: Any, target_loaded: Any = None, device: str = "cpu",
                 weight_format: str = "bf16", mtp_weight_format: str | None = None) -> Drafter | None:
    """Load a drafter from a path for `target`; its kind comes from what the path holds (an assistant, or any
    full model with the target's vocabulary: a draft model). drafter=None: the shipped drafter known for this
    target, else the one its checkpoint carries (an in-target kind, e.g. nextn MTP heads, in mtp_weight_format,
    default the target's format), else None (the default chain is then n-gram alone). A drafter directory's config.json
    may carry `recommended` n_max / p_min (tandem.spec.policy.read_recommended): drafter.recommended."""
    if drafter is None:
        from tandem.drafters import known_drafter
        found = known_drafter(getattr(target_loaded, "path", None))
        if found is None:
            return _in_target_drafter(target, _name(target_loaded, "target"), mtp_weight_format)
        drafter = str(found)
    d = _load_path(drafter, target, target_loaded, device, weight_format, mtp_weight_format)
    d.recommended = read_recommended(drafter)  # the drafter's own n_max / p_min, for requests that set none
    return d


def _load_path(drafter: str, target: Any, target_loaded: Any, device: str, weight_format: str,
               mtp_weight_format: str | None) -> Drafter:
    import torch

    from tandem import loading

    head_cfg = nextn_dir_config(drafter)
    if head_cfg is not None:  # a trained nextn head: attached to the target, drafts as kind nextn
        return load_nextn_dir(drafter, head_cfg, target, _name(target_loaded, "target"), mtp_weight_format)
    if eagle3_config(drafter) is not None:  # an EAGLE-3 head (public layout), in the target's format by default
        return load_eagle3_drafter(drafter, target, _name(target_loaded, "target"), mtp_weight_format)
    cfg = _shared_embedding_config(drafter)
    tokenizer = None
    if cfg is not None:
        model = _load_shared_embedding_drafter(drafter, cfg, target)
    else:
        loaded = loading.load(drafter, device=device, dtype=torch.float32,
                              weight_format=None if weight_format == "fp32" else weight_format)
        model, tokenizer = loaded.model.eval(), loaded.tokenizer
    if weight_format != "fp32" and getattr(model, "kernel_format", None) != weight_format:
        from tandem import kernels
        kernels.prepare(model, weight_format)
    return drafter_for_model(model, target, _name(target_loaded, "target"), str(drafter), tokenizer=tokenizer,
                             target_tokenizer=getattr(target_loaded, "tokenizer", None))


def _in_target_drafter(target: Any, target_name: str, weight_format: str | None) -> Drafter | None:
    kind = in_target_kind(target)
    if kind is None:
        log.info("%s: no drafter given, none shipped for it, and its checkpoint carries none (no MTP layers); "
                 "no model drafter (the default chain drafts with n-gram lookup alone)", target_name)
        return None
    return kind.build(None, target, target_name=target_name, name=target_name, weight_format=weight_format)


def _shared_embedding_config(path: str) -> dict | None:
    """config.json of a tandem-trained drafter whose tied head is the target's embedding (not stored), else None."""
    from pathlib import Path

    from tandem.loading.hf import read_json

    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = read_json(cfg_path)
    extra = cfg.get("tandem") or {}
    if not isinstance(extra, dict):
        raise ModelLoadError(f"{cfg_path}: field 'tandem' must be a JSON object, got {type(extra).__name__}")
    return cfg if extra.get("shared_target_embeddings") else None


def _load_shared_embedding_drafter(path: str, cfg: dict, target: Any):
    """Build the assistant, load its own weights, and make its tied head the target's (shared modules, no copy)."""
    from pathlib import Path

    from safetensors.torch import load_file

    from tandem import models

    wpath = Path(path) / "model.safetensors"
    if not wpath.is_file():
        raise ModelLoadError(f"drafter {path}: model.safetensors missing")
    from tandem.config import check_model_config
    from tandem.loading import _no_init
    check_model_config(cfg, str(Path(path) / "config.json"), ModelLoadError)
    with _no_init():  # the tied head is about to become the target's: don't initialise a [V, D] table
        model = models.build(cfg)
    tv = getattr(getattr(target, "args", None), "vocab_size", None)
    if tv != model.args.vocab_size or target.args.hidden_size != model.args.hidden_size:
        raise ModelLoadError(f"drafter {path} shares its target's embedding but does not fit the target: "
                             f"drafter (vocab {model.args.vocab_size}, hidden {model.args.hidden_size}) vs target "
                             f"(vocab {tv}, hidden {getattr(target.args, 'hidden_size', None)})")
    model.lm_head = target.lm_head
    model.model.embed_tokens = target.model.embed_tokens
    try:
        raw = load_file(str(wpath))
    except Exception as e:  # truncated / not safetensors
        raise ModelLoadError(f"{wpath}: cannot read safetensors ({type(e).__name__}: {e})") from None
    sd = {k: (v.long() if k.endswith("token_ordering") else v.float()) for k, v in raw.items()}
    want = model.state_dict()
    bad = [f"{k}: expected {tuple(want[k].shape)}, got {tuple(v.shape)}" for k, v in sd.items()
           if k in want and want[k].shape != v.shape]
    if bad:
        raise ModelLoadError(f"{wpath}: tensor shape mismatch: {bad[:4]}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(("lm_head.", "model.embed_tokens."))]
    if missing or unexpected:
        raise ModelLoadError(f"drafter {wpath}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    model.requires_grad_(False)
    return model.eval()
