"""HF model directories: config.json + model.safetensors (or a sharded index), tokenizer.json if present."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tandem.config import check_model_config
from tandem.errors import ModelLoadError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            d = json.load(fh)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: invalid JSON ({e})") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e})") from None
    if not isinstance(d, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, found {type(d).__name__}")
    return d


def read_config(model_dir: str | os.PathLike) -> dict:
    d = Path(model_dir)
    p = d / "config.json"
    if not p.is_file():
        raise ModelLoadError(f"{d}: no config.json (not an HF model directory)")
    cfg = read_json(p)
    if "model_type" not in cfg:
        raise ModelLoadError(f"{p}: no model_type")
    check_model_config(cfg, str(p), ModelLoadError)
    return cfg


def weight_files(model_dir: str | os.PathLike) -> dict[str, list[str] | None]:
    """shard file -> tensor names it should hold (None = all; single-file checkpoints)."""
    d = Path(model_dir)
    if (d / INDEX).is_file():
        idx = read_json(d / INDEX)
        wm = idx.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise ModelLoadError(f"{d / INDEX}: no weight_map")
        shards: dict[str, list[str]] = {}
        for name, shard in wm.items():
            shards.setdefault(shard, []).append(name)
        missing = [s for s in shards if not (d / s).is_file()]
        if missing:
            raise ModelLoadError(f"{d / INDEX}: missing shard file(s) {missing} in {d}")
        return shards
    if (d / SINGLE).is_file():
        return {SINGLE: None}
    raise ModelLoadError(f"{d}: no {SINGLE} or {INDEX}")


def state_dict(model_dir: str | os.PathLike, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint (mmap'd through safetensors), cast to `dtype` when floating point."""
    from safetensors import safe_open

    d = Path(model_dir)
    out: dict[str, torch.Tensor] = {}
    for shard, names in weight_files(d).items():
        path = d / shard
        try:
            with safe_open(str(path), framework="pt") as fh:
                keys = list(fh.keys())
                if names is not None:
                    absent = sorted(set(names) - set(keys))
                    if absent:
                        raise ModelLoadError(f"{path}: index lists tensor(s) not in the shard: {absent[:8]}")
                for k in keys:
                    t = fh.get_tensor(k)
                    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                        t = t.to(dtype)
                    out[k] = t
        except ModelLoadError:
            raise
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read safetensors ({type(e).__name__}: {e})") from None
    return out


def read_tokenizer(model_dir: str | os.PathLike, config: dict):
    """(Tokenizer or None, chat template or None)."""
    d = Path(model_dir)
    tc_path = d / "tokenizer_config.json"
    tc = read_json(tc_path) if tc_path.is_file() else {}
    template = tc.get("chat_template")
    if (d / "chat_template.jinja").is_file():
        template = (d / "chat_template.jinja").read_text(encoding="utf-8")
    elif template is None and (d / "chat_template.json").is_file():
        template = read_json(d / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    tok = None
    if (d / "tokenizer.json").is_file():
        from tandem.tokenizer import Tokenizer
        gen = d / "generation_config.json"
        cfg = dict(config)
        if gen.is_file():
            g = read_json(gen)
            if g.get("eos_token_id") is not None:
                cfg["eos_token_id"] = g["eos_token_id"]
                check_model_config({"vocab_size": config.get("vocab_size"), "eos_token_id": g["eos_token_id"]},
                                   str(gen), ModelLoadError)
        tok = Tokenizer.from_file(d / "tokenizer.json", cfg, tc)
    return tok, template
