"""Save a trained assistant (HF-style dir, target embedding not duplicated) and export it for transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

SHIPPED_DTYPE = torch.bfloat16


def save(asst, config: dict, out: Path, report: dict) -> None:
    """config.json + model.safetensors (bf16; without the shared embedding/LM head) + report.json."""
    sd = {}
    for k, v in asst.state_dict().items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            continue
        if k.endswith("token_ordering"):
            sd[k] = v.to(torch.int32).contiguous()
        elif v.is_floating_point():
            sd[k] = v.detach().to(SHIPPED_DTYPE).contiguous()
        else:
            sd[k] = v.contiguous()
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def export_for_transformers(drafter_dir: str, target: str | None, out_dir: str) -> None:
    """Write a directory Gemma4AssistantForCausalLM.from_pretrained loads: the shared embedding is copied in."""
    from tandem import loading
    from tandem.errors import ModelLoadError

    src = Path(drafter_dir)
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("model_type") != "gemma4_assistant":
        raise ModelLoadError(f"{src}/config.json: model_type {cfg.get('model_type')!r}, expected 'gemma4_assistant'")
    sd = load_file(str(src / "model.safetensors"))
    if cfg.get("tandem", {}).get("shared_target_embeddings"):
        tgt = loading.load(target, dtype=torch.float32).model
        sd["model.embed_tokens.weight"] = tgt.model.embed_tokens.weight.detach().to(SHIPPED_DTYPE).contiguous()
    sd = {k: (v.long() if k.endswith("token_ordering") else v) for k, v in sd.items()}
    hf_cfg = {k: v for k, v in cfg.items() if k != "tandem"}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
