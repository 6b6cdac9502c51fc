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


def load_for_training(drafter_dir: str) -> tuple[dict, dict]:
    """(config.json dict, state dict) of a tandem drafter directory, to continue training it."""
    cfg = _drafter_config(Path(drafter_dir), "--init-from")
    return cfg, load_file(str(Path(drafter_dir) / "model.safetensors"))


def _drafter_config(src: Path, what: str) -> dict:
    """config.json of a gemma4_assistant drafter directory that also holds model.safetensors, else ModelLoadError."""
    from tandem.errors import ModelLoadError

    for name in ("config.json", "model.safetensors"):
        if not (src / name).is_file():
            raise ModelLoadError(f"{what} {src}: {name} missing (expected a tandem drafter directory)")
    try:
        cfg = json.loads((src / "config.json").read_text())
    except ValueError as e:
        raise ModelLoadError(f"{src / 'config.json'}: invalid JSON ({e})") from None
    if cfg.get("model_type") != "gemma4_assistant":
        raise ModelLoadError(f"{src / 'config.json'}: model_type {cfg.get('model_type')!r}, expected "
                             "'gemma4_assistant'")
    return cfg


def load_weights(asst, sd: dict, where: str) -> None:
    """Copy a drafter's trained weights into a freshly built assistant (the shared embedding/head stay the target's)."""
    from tandem.errors import ModelLoadError

    own = asst.state_dict()
    shared = {"model.embed_tokens.weight", "lm_head.weight"}
    missing = sorted(k for k in own if k not in sd and k not in shared)
    unknown = sorted(k for k in sd if k not in own)
    bad = sorted(k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape))
    if missing or unknown or bad:
        raise ModelLoadError(f"--init-from {where}: weights do not fit this target's assistant "
                             f"(missing {missing[:4]}, unexpected {unknown[:4]}, shape mismatch {bad[:4]})")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v.to(own[k].dtype))


def export_for_transformers(drafter_dir: str, target: str | None, out_dir: str) -> None:
    """Write a directory Gemma4AssistantForCausalLM.from_pretrained loads: the shared embedding is copied in.

    A drafter sharing its target's embedding is first loaded for `target` the way tandem serves it, so a drafter
    that is incomplete or trained for another target raises ModelLoadError instead of exporting something that
    transformers would load with missing (randomly initialised) or misfitting weights."""
    from tandem import loading
    from tandem.spec import load_drafter

    src = Path(drafter_dir)
    cfg = _drafter_config(src, "drafter")
    sd = load_file(str(src / "model.safetensors"))
    if (cfg.get("tandem") or {}).get("shared_target_embeddings"):
        tgt = loading.load(target, dtype=torch.float32, tokenizer=False)
        load_drafter(str(src), target=tgt.model, target_loaded=tgt, weight_format="fp32")  # fit + weights check
        sd["model.embed_tokens.weight"] = tgt.model.model.embed_tokens.weight.detach().to(SHIPPED_DTYPE).contiguous()
    sd = {k: (v.long() if k.endswith("token_ordering") else v) for k, v in sd.items()}
    hf_cfg = {k: v for k, v in cfg.items() if k != "tandem"}
    # Gemma4AssistantConfig.validate_architecture requires 0; Gemma4TextConfig's default is 262144
    hf_cfg["text_config"] = {**hf_cfg.get("text_config", {}), "vocab_size_per_layer_input": 0}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
