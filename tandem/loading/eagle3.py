"""EAGLE-3 head directories in the public layout (what vLLM's `Eagle3LlamaForCausalLM` and SGLang's
`LlamaForCausalLMEagle3` load): config.json with architectures [LlamaForCausalLMEagle3], model_type llama,
draft_vocab_size, optional target_hidden_size / eagle_aux_hidden_state_layer_ids; weights model.safetensors (or
pytorch_model.bin) named `fc.weight`, `midlayer.*`, `norm.weight`, `lm_head.weight`, `d2t`, `t2d`, optional
`embed_tokens.weight`. vLLM also reads `layers.0.*` for `midlayer.*` (speculators' layout): so do we.

A head trained here is saved in exactly that layout; tandem's own fields (target fingerprint, recommended draft
length, training report) ride in config.json under "tandem" / "recommended", which vLLM and SGLang ignore.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tandem.errors import ModelLoadError
from tandem.loading.hf import read_json
from tandem.models.eagle3 import ARCHITECTURES, Eagle3, Eagle3Args, default_aux_layers

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# the Llama config keys a public EAGLE-3 config carries (written on export)
LLAMA_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
              "num_hidden_layers", "hidden_act", "rms_norm_eps", "max_position_embeddings", "attention_bias",
              "mlp_bias", "vocab_size", "draft_vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")


def eagle3_config(path: str | Path) -> dict | None:
    """config.json of an EAGLE-3 head directory (its architectures name one), else None."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return None
    cfg = read_json(p)
    archs = cfg.get("architectures") or []
    return cfg if isinstance(archs, list) and any(a in ARCHITECTURES for a in archs) else None


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHTS:
        f = d / name
        if not f.is_file():
            continue
        try:
            raw = load_file(str(f)) if name.endswith(".safetensors") else torch.load(f, map_location="cpu",
                                                                                       weights_only=True)
        except Exception as e:  # truncated / not a checkpoint
            raise ModelLoadError(f"{f}: cannot read ({type(e).__name__}: {e})") from None
        return {(("midlayer." + k[len("layers.0."):]) if k.startswith("layers.0.") else k): v
                for k, v in raw.items()}
    raise ModelLoadError(f"EAGLE-3 head {d}: none of {list(WEIGHTS)} found")


def load_eagle3(path: str | Path, target_layers: int, target_hidden: int, target_vocab: int,
                dtype=torch.float32) -> Eagle3:
    """The head from a public-layout directory (its aux_layers: the target layers whose inputs it reads), checked
    against the target's layer count, hidden size and vocabulary (ModelLoadError naming file, field, expected and
    got)."""
    d = Path(path)
    cfg = eagle3_config(d)
    if cfg is None:
        raise ModelLoadError(f"{d}/config.json: architectures must name one of {list(ARCHITECTURES)}")
    args = Eagle3Args.from_dict(cfg)
    where = f"{d}/config.json"
    if args.vocab_size != target_vocab:
        raise ModelLoadError(f"{where}: vocab_size {args.vocab_size}, the target's vocabulary has {target_vocab}")
    if args.target_hidden_size != target_hidden:
        raise ModelLoadError(f"{where}: target_hidden_size {args.target_hidden_size} (hidden_size when absent), "
                             f"the target's hidden size is {target_hidden}")
    layers = args.aux_layers(target_layers)
    if not all(0 <= i <= target_layers for i in layers):
        raise ModelLoadError(f"{where}: aux hidden state layers {list(layers)} outside [0, {target_layers}] "
                             f"(the target has {target_layers} layers)")
    sd = _read_weights(d)
    model = Eagle3(args, layers, own_embedding="embed_tokens.weight" in sd)
    if "d2t" in sd and "t2d" not in sd:  # vLLM and SGLang never read t2d: derive it
        sd["t2d"] = torch.zeros(args.vocab_size, dtype=torch.bool)
        sd["t2d"][torch.arange(len(sd["d2t"])) + sd["d2t"].long()] = True
    want = model.state_dict()
    bad = [f"{k}: expected {tuple(want[k].shape)}, got {tuple(v.shape)}" for k, v in sd.items()
           if k in want and tuple(want[k].shape) != tuple(v.shape)]
    if bad:
        raise ModelLoadError(f"EAGLE-3 head {d}: tensor shape mismatch (config {where}): {bad[:4]}")
    sd = {k: (v.long() if k == "d2t" else v.bool() if k == "t2d" else v.to(dtype)) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in ("d2t", "t2d") or args.draft_vocab_size != args.vocab_size]
    if missing or unexpected:
        raise ModelLoadError(f"EAGLE-3 head {d}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    ids = model.to_target(torch.arange(args.draft_vocab_size))
    if int(ids.max()) >= args.vocab_size or int(ids.min()) < 0:
        raise ModelLoadError(f"EAGLE-3 head {d}: d2t maps draft ids outside the target vocabulary [0, "
                             f"{args.vocab_size}) ({int(ids.min())}..{int(ids.max())})")
    return model.requires_grad_(False).eval()


def public_config(model: Eagle3, target_layers: int) -> dict:
    """The config.json vLLM and SGLang read. Default layers are left implicit (both then agree); others are
    written for each: top level in vLLM's numbering (inputs), eagle_config in SGLang's (outputs, one less)."""
    a = model.args
    cfg = {"architectures": [ARCHITECTURES[0]], "model_type": "llama", "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}
    cfg.update({k: getattr(a, k) for k in LLAMA_KEYS if getattr(a, k, None) is not None})
    rope = dict(a.rope())
    cfg["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type") != "default":
        cfg["rope_scaling"] = rope
    if a.target_hidden_size != a.hidden_size:
        cfg["target_hidden_size"] = a.target_hidden_size
    if a.norm_before_residual:
        cfg["norm_before_residual"] = True
    aux_layers = tuple(model.aux_layers)
    if aux_layers != default_aux_layers(target_layers):
        cfg["eagle_aux_hidden_state_layer_ids"] = list(aux_layers)
        cfg["eagle_config"] = {"use_aux_hidden_state": True,
                               "eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux_layers]}
    return cfg


def save_eagle3(model: Eagle3, target_layers: int, out: str | Path,
                extra: dict | None = None, dtype=torch.bfloat16) -> Path:
    """Write config.json + model.safetensors in the public layout (float weights in `dtype`, d2t int64, t2d bool);
    `extra` (tandem's own keys) is merged into config.json. Returns the directory."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: (v if k in ("d2t", "t2d") else v.to(dtype)).contiguous() for k, v in model.state_dict().items()}
    cfg = public_config(model, target_layers)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    cfg.update(extra or {})
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out
