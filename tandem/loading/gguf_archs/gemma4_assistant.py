"""GGUF architecture `gemma4-assistant`: the Gemma 4 MTP drafter as llama.cpp writes it (`--spec-type draft-mtp`).

Names and conventions are llama.cpp's (ggml-org/llama.cpp, "llama : add Gemma4 MTP" #23398 and "mtp: support for
gemma-4 E2B and E4B assistants" #24282): gguf-py/gguf/constants.py + tensor_mapping.py, conversion/gemma.py
(`Gemma4AssistantModel` on top of `Gemma4Model`/`Gemma3Model`/`TextModel`), src/models/gemma4-assistant.cpp.

What the converter does, and what is undone / read back here:
- tensors keep HF's layout (no permutation or transpose; ggml's ne order is the reverse of the torch shape, which
  the reader undoes). Gemma 4 norms are plain `x * w` (`Gemma4Model.norm_shift` is 0): no `+1` to remove.
- `model.layers.N.layer_scalar` -> `blk.N.layer_output_scale.weight` [1]; the tied head is `token_embd.weight`
  (no `output.weight`); `pre_projection`/`post_projection` -> `nextn.pre_projection`/`nextn.post_projection`.
- the centroid head (`masked_embedding.*`) is SKIPPED by the converter: llama.cpp computes the full tied head.
  A file without it loads as a dense-head assistant (what llama.cpp runs). A file that carries it under the names
  llama.cpp accepts (`masked_embd_centroids.weight`, `masked_embd_ordering`) loads HF's sparse head;
  `centroid_intermediate_top_k` is not stored anywhere, so HF's default (32, capped at num_centroids) is used.
- `rope_freqs.weight` [global_head_dim/2] is generated: 1.0 for the rotated frequency pairs of the full-attention
  layers' "proportional" RoPE, 1e30 for the rest; read back as partial_rotary_factor.
- metadata: `embedding_length_out` = backbone (target) hidden size, `attention.sliding_window_pattern` = per-layer
  bools (True = sliding), `attention.key_length` = full-attention head dim, `attention.key_length_swa` = sliding
  head dim, `rope.freq_base` / `rope.freq_base_swa`, `attention.head_count_kv` scalar or per-layer array,
  `nextn_predict_layers` = block_count. Attention scale 1 and the tanh GELU are hard-coded by llama.cpp (and HF).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tandem.errors import ModelLoadError
from tandem.loading.gguf_archs.base import GGUFArch

if TYPE_CHECKING:
    from tandem.loading.gguf import GGUFFile

NAME = "gemma4-assistant"
CENTROIDS, ORDERING, ROPE_FREQS = "masked_embd_centroids.weight", "masked_embd_ordering", "rope_freqs.weight"
HF_DEFAULT_TOP_K = 32  # Gemma4AssistantConfig.centroid_intermediate_top_k default; not stored in GGUF

TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "nextn.pre_projection.weight": "pre_projection.weight",
    "nextn.post_projection.weight": "post_projection.weight",
    "blk.{bid}.attn_norm.weight": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.attn_q.weight": "model.layers.{bid}.self_attn.q_proj.weight",
    "blk.{bid}.attn_q_norm.weight": "model.layers.{bid}.self_attn.q_norm.weight",
    "blk.{bid}.attn_output.weight": "model.layers.{bid}.self_attn.o_proj.weight",
    "blk.{bid}.post_attention_norm.weight": "model.layers.{bid}.post_attention_layernorm.weight",
    "blk.{bid}.ffn_norm.weight": "model.layers.{bid}.pre_feedforward_layernorm.weight",
    "blk.{bid}.post_ffw_norm.weight": "model.layers.{bid}.post_feedforward_layernorm.weight",
    "blk.{bid}.ffn_gate.weight": "model.layers.{bid}.mlp.gate_proj.weight",
    "blk.{bid}.ffn_up.weight": "model.layers.{bid}.mlp.up_proj.weight",
    "blk.{bid}.ffn_down.weight": "model.layers.{bid}.mlp.down_proj.weight",
    "blk.{bid}.layer_output_scale.weight": "model.layers.{bid}.layer_scalar",
    CENTROIDS: "masked_embedding.centroids.weight",
    ORDERING: "masked_embedding.token_ordering",
}

# keys of the text_config (gemma4_text) vs the assistant's own top-level keys
_TOP = ("model_type", "architectures", "backbone_hidden_size", "use_ordered_embeddings", "num_centroids",
        "centroid_intermediate_top_k", "tie_word_embeddings")


def _finalize(cfg: dict, f: "GGUFFile") -> None:
    """Flat metadata -> the HF config.json shape ({assistant keys, "text_config": {gemma4_text keys}})."""
    def fail(msg: str):
        raise ModelLoadError(f"{f.path}: {NAME}: {msg}")

    def meta(key: str, default=None, required: bool = False):
        v = f.meta(f"{NAME}.{key}")
        if v is None and required:
            fail(f"GGUF metadata lacks {NAME}.{key}")
        return default if v is None else v

    n = cfg["num_hidden_layers"]

    def per_layer(key: str, default=None, uniform: bool = False) -> list:
        v = meta(key, default, required=default is None)
        v = list(v) if isinstance(v, (list, tuple)) else [v] * n  # llama.cpp get_key_or_arr
        if len(v) != n:
            fail(f"{NAME}.{key} has {len(v)} entries for {n} blocks")
        if uniform and len(set(v)) > 1:
            fail(f"per-layer {NAME}.{key} {v} unsupported (must be the same for every layer)")
        return v

    swa = [bool(x) for x in per_layer("attention.sliding_window_pattern")]
    layer_types = ["sliding_attention" if s else "full_attention" for s in swa]
    heads = per_layer("attention.head_count", uniform=True)[0]
    kv = per_layer("attention.head_count_kv", default=heads)
    n_ff = per_layer("feed_forward_length", uniform=True)[0]
    hd_full = int(meta("attention.key_length", cfg["hidden_size"] // heads))
    hd_swa = int(meta("attention.key_length_swa", required=True))
    if int(meta("attention.value_length", hd_full)) != hd_full:
        fail("value_length != key_length (llama.cpp requires them equal)")
    if int(meta("attention.value_length_swa", required=True)) != hd_swa:
        fail("value_length_swa != key_length_swa (llama.cpp requires them equal)")
    n_rot_full = int(meta("rope.dimension_count", hd_full))
    n_rot_swa = int(meta("rope.dimension_count_swa", n_rot_full))
    if n_rot_full != hd_full or n_rot_swa != hd_swa:
        fail(f"rope.dimension_count {n_rot_full} / _swa {n_rot_swa} must equal the head dims {hd_full} / {hd_swa} "
             f"(partial RoPE is expressed through {ROPE_FREQS})")
    nextn = meta("nextn_predict_layers")
    if nextn is not None and int(nextn) != n:
        fail(f"nextn_predict_layers {nextn} != block_count {n} (llama.cpp requires them equal)")
    if "sliding_window" not in cfg:  # required by llama.cpp too
        fail(f"GGUF metadata lacks {NAME}.attention.sliding_window")
    if "backbone_hidden_size" not in cfg:
        fail(f"GGUF metadata lacks {NAME}.embedding_length_out (the target's hidden size)")

    names = set(f.tensor_names)
    full = {"rope_type": "proportional", "rope_theta": float(cfg.pop("rope_theta", 10000.0)),
            "partial_rotary_factor": 1.0}
    if "full_attention" in layer_types:
        if ROPE_FREQS not in names:
            fail(f"missing tensor {ROPE_FREQS!r} (required when a layer is full attention)")
        full["partial_rotary_factor"] = _partial_rotary_factor(f, hd_full, fail)
    sliding = {"rope_type": "default", "rope_theta": float(meta("rope.freq_base_swa", 10000.0))}

    if "token_embd.weight" not in names:
        fail("missing tensor 'token_embd.weight'")
    vocab = int(f.tensor_info()["token_embd.weight"][1][0])
    if cfg.get("vocab_size", vocab) != vocab:
        fail(f"tokenizer has {cfg['vocab_size']} tokens but token_embd.weight has {vocab} rows")
    cfg["vocab_size"] = vocab

    centroids = {CENTROIDS, ORDERING} & names
    if len(centroids) == 1:
        fail(f"has {sorted(centroids)[0]!r} without {sorted({CENTROIDS, ORDERING} - centroids)[0]!r}")
    if centroids:
        n_c = int(f.tensor_info()[CENTROIDS][1][0])
        cfg.update(use_ordered_embeddings=True, num_centroids=n_c,
                   centroid_intermediate_top_k=min(HF_DEFAULT_TOP_K, n_c))
    else:
        cfg.update(use_ordered_embeddings=False)

    full_over = {"head_dim": hd_full}
    kv_swa = {k for k, s in zip(kv, swa) if s}
    kv_full = {k for k, s in zip(kv, swa) if not s}
    if len(kv_swa) > 1 or len(kv_full) > 1:
        fail(f"attention.head_count_kv {kv} must be the same for every layer of a type")
    if kv_full and kv_swa and kv_full != kv_swa:
        full_over["num_key_value_heads"] = int(next(iter(kv_full)))
    text = {k: v for k, v in cfg.items() if k not in _TOP}
    text.update(
        model_type="gemma4_text", num_attention_heads=int(heads), intermediate_size=int(n_ff),
        num_key_value_heads=int(next(iter(kv_swa or kv_full))), head_dim=hd_swa, global_head_dim=hd_full,
        layer_types=layer_types, rope_parameters={"sliding_attention": sliding, "full_attention": full},
        per_layer_config={str(i): dict(full_over) for i, s in enumerate(swa) if not s},
        num_kv_shared_layers=int(meta("attention.shared_kv_layers", n)),
        hidden_size_per_layer_input=int(meta("embedding_length_per_layer_input", 0)), vocab_size_per_layer_input=0,
        tie_word_embeddings=True)
    top = {k: cfg[k] for k in _TOP if k in cfg}
    cfg.clear()
    cfg.update(top, tie_word_embeddings=True, text_config=text)


def _partial_rotary_factor(f: "GGUFFile", hd_full: int, fail) -> float:
    """rope_freqs.weight = [1.0] * rotated pairs + [1e30] * the rest (conversion/gemma.py generate_extra_tensors)."""
    ff = f.read(ROPE_FREQS).flatten()
    if ff.numel() != hd_full // 2:
        fail(f"{ROPE_FREQS} has {ff.numel()} entries, expected global head_dim/2 = {hd_full // 2}")
    rot = int((ff == 1.0).sum())
    if not torch.equal(ff[:rot], torch.ones(rot)) or not bool((ff[rot:] >= 1e29).all()):
        fail(f"{ROPE_FREQS} is not [1.0]*k + [1e30]*rest (unsupported RoPE frequency factors)")
    return 2.0 * rot / hd_full


ARCH = GGUFArch(
    model_type="gemma4_assistant",
    architectures=["Gemma4AssistantForCausalLM"],
    config_keys={
        "context_length": "max_position_embeddings",
        "block_count": "num_hidden_layers",
        "embedding_length": "hidden_size",
        "embedding_length_out": "backbone_hidden_size",
        "attention.layer_norm_rms_epsilon": "rms_norm_eps",
        "attention.sliding_window": "sliding_window",
        "rope.freq_base": "rope_theta",
    },
    config_defaults={
        "hidden_activation": "gelu_pytorch_tanh",  # llama.cpp: LLM_FFN_GELU (tanh approximation)
        "attention_bias": False,
        "attention_dropout": 0.0,
        "final_logit_softcapping": None,  # the assistant applies none (llama.cpp's graph neither)
        "attention_k_eq_v": False,  # Q-only attention: K/V come from the target's cache
        "enable_moe_block": False,
        "use_double_wide_mlp": False,
    },
    tensors=TENSORS,
    optional={CENTROIDS, ORDERING},
    derived={ROPE_FREQS},
    needs_tokenizer=False,
    finalize=_finalize,
)
