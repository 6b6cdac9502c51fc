"""A trained nextn head directory (`tandem train-nextn`): config.json {"kind": "nextn", "target": {...}} plus
model.safetensors holding ONLY the head's own weights in hub names `model.layers.{L}.*` (L = the target's layer
count); embedding and LM head stay the target's. Loading attaches the head to the target (`nextn_weights`, as a
checkpoint that carries MTP layers would) and builds kind `nextn` from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from tandem.errors import ModelLoadError
from tandem.models.nextn import NextN

N_PROBE = 16  # embedding rows whose norms identify the target (robust to its weight format)
PROBE_RTOL = 0.03


def nextn_dir_config(path: str) -> dict | None:
    """config.json of a trained nextn head directory, else None."""
    from tandem.loading.hf import read_json

    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None
    cfg = read_json(cfg_path)
    return cfg if cfg.get("kind") == "nextn" else None


@torch.no_grad()
def target_fingerprint(target: nn.Module, name: str) -> dict:
    """What a head is trained for: the target's shapes and the norms of a few embedding rows."""
    a = target.args
    ids = torch.linspace(0, a.vocab_size - 1, N_PROBE).long()
    norms = target.embed(ids[None])[0].float().norm(dim=-1)
    return {"name": name, "model_type": a.model_type, "vocab_size": a.vocab_size, "hidden_size": a.hidden_size,
            "num_hidden_layers": a.num_hidden_layers, "embed_norms": [round(float(x), 4) for x in norms]}


def check_target(cfg: dict, target: nn.Module, target_name: str, where: str, what: str = "nextn head") -> None:
    """ModelLoadError naming both targets when the head was trained for another one."""
    want, got = cfg.get("target") or {}, target_fingerprint(target, target_name)
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
    same = all(want.get(k) == got[k] for k in keys) and len(want.get("embed_norms") or []) == N_PROBE and \
        torch.allclose(torch.tensor(want["embed_norms"]), torch.tensor(got["embed_norms"]), rtol=PROBE_RTOL)
    if not same:
        desc = lambda t: f"{t.get('name')} ({', '.join(f'{k} {t.get(k)}' for k in keys)})"  # noqa: E731
        raise ModelLoadError(f"{what} {where} was trained for target {desc(want)}, not for {desc(got)}")


class TrainedNextN(NextN):
    """Heads attached to a target whose family has no MTP layers of its own (its config may lack the dense/MoE
    split the base layout resets)."""

    def head_args(self, t, n: int):
        moe = {"first_k_dense_replace": 0} if hasattr(t, "first_k_dense_replace") else {}
        return dataclasses.replace(t, num_hidden_layers=n, **moe)


def attach(target: nn.Module, weights: dict[str, torch.Tensor], n_heads: int) -> None:
    """Give a dense target the MTP layers its checkpoint lacks, in the base (DeepSeek) layout."""
    if getattr(target.args, "num_nextn_predict_layers", 0):
        raise ModelLoadError(f"{target.args.model_type}: the target already carries {target.args.num_nextn_predict_layers}"
                             " MTP layers; a trained head would replace them")
    target.nextn_weights, target.nextn_layout, target.nextn_trained = weights, TrainedNextN, True
    target.args.num_nextn_predict_layers = n_heads  # a dense family's config has no such field: set on the instance


def load_nextn_dir(path: str, cfg: dict, target: nn.Module, target_name: str, weight_format: str | None):
    """The trained head in `path` attached to `target`, as a kind-`nextn` drafter (heads in weight_format, default
    the target's)."""
    from tandem.spec.nextn import NextNDrafter

    wpath = Path(path) / "model.safetensors"
    if not wpath.is_file():
        raise ModelLoadError(f"nextn head {path}: model.safetensors missing")
    check_target(cfg, target, target_name, path)
    n = int(cfg.get("num_nextn_predict_layers", 1))
    attach(target, load_file(str(wpath)), n)
    try:
        return NextNDrafter.build(target, target, weight_format=weight_format)
    except ModelLoadError as e:
        target.nextn_weights, target.args.num_nextn_predict_layers = {}, 0  # the target stays as it was
        del target.nextn_layout, target.nextn_trained
        raise ModelLoadError(f"nextn head {path}: {e}") from None
