"""A gemma4_assistant config and initial weights for any tandem target.

The assistant's hidden size equals the target's, so its tied LM head IS the target's embedding matrix: nothing of
the 262k-row table is trained or shipped (`tandem.shared_target_embeddings` in config.json says so).
"""

from __future__ import annotations

import math

import torch

from tandem.errors import ConfigError
from tandem.models import gemma4_assistant


def assistant_config(target, *, layers: int = 2, intermediate: int = 1024, heads: int | None = None,
                     centroids: int = 1024, top_k_clusters: int = 32) -> dict:
    """HF-style config.json dict (model_type gemma4_assistant with a gemma4_text text_config) fitted to target."""
    ta = target.args
    specs = target.kv_specs()
    types = ["sliding_attention", "full_attention"][:1] * (layers - 1) + ["full_attention"] if layers > 1 \
        else ["full_attention"]
    rope, dims = {}, {}
    for lt in set(types):
        layer = target.last_layer_of_type(lt)
        h_kv, dk, dv = specs[layer]
        if dk != dv:
            raise ConfigError(f"target layer {layer} ({lt}) has K dim {dk} != V dim {dv}; the assistant needs equal")
        dims[lt] = (h_kv, dk)
        rope[lt] = _rope_like(target, lt, dk)
    n_heads = heads or getattr(ta, "num_attention_heads", 4)
    sw = getattr(ta, "sliding_window", 512) or 512
    text = {
        "model_type": "gemma4_text", "vocab_size": ta.vocab_size, "hidden_size": ta.hidden_size,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": n_heads,
        "num_key_value_heads": dims.get("sliding_attention", dims["full_attention"])[0],
        "head_dim": dims.get("sliding_attention", dims["full_attention"])[1],
        "global_head_dim": dims["full_attention"][1], "layer_types": types, "rope_parameters": rope,
        # HF's assistant sliding mask is inclusive (window + 1 entries); keep the target's reach
        "sliding_window": max(1, sw - 1), "hidden_size_per_layer_input": 0, "num_kv_shared_layers": layers,
        "rms_norm_eps": getattr(ta, "rms_norm_eps", 1e-6), "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh", "attention_k_eq_v": False, "enable_moe_block": False,
        "vocab_size_per_layer_input": 0,
        "max_position_embeddings": getattr(ta, "max_position_embeddings", 32768),
    }
    return {
        "model_type": "gemma4_assistant", "architectures": ["Gemma4AssistantForCausalLM"],
        "backbone_hidden_size": ta.hidden_size, "use_ordered_embeddings": centroids > 0,
        "num_centroids": max(centroids, 1), "centroid_intermediate_top_k": top_k_clusters,
        "tie_word_embeddings": True, "text_config": text,
        "tandem": {"shared_target_embeddings": True},
    }


def _rope_like(target, layer_type: str, head_dim: int) -> dict:
    """A Gemma 4 rope_parameters entry giving the target's RoPE for layer_type (the assistant's queries must rotate
    exactly as the keys they read were rotated)."""
    ta = target.args
    rp = getattr(ta, "rope_parameters", None)
    if getattr(ta, "model_type", "") == "gemma4_text" and isinstance(rp, dict) and layer_type in rp:
        return dict(rp[layer_type])
    if hasattr(ta, "rope"):  # Gemma 3: (theta, linear factor) == proportional RoPE over the whole head
        theta, factor = ta.rope(layer_type)
        if factor == 1.0:
            return {"rope_type": "default", "rope_theta": theta}
        return {"rope_type": "proportional", "partial_rotary_factor": 1.0, "rope_theta": theta, "factor": factor}
    f = target._inv_freq[layer_type]  # any other family: recover theta from the frequencies
    theta = float(1.0 / f[1]) ** (head_dim / 2.0) if f.numel() > 1 else 10_000.0
    return {"rope_type": "default", "rope_theta": round(theta, 3)}


def build_assistant(config: dict, target, embed_weight: torch.Tensor, seed: int = 0) -> gemma4_assistant.Model:
    """Fresh assistant bound to target, its LM head tied to the target's embedding matrix (frozen)."""
    torch.manual_seed(seed)
    args = gemma4_assistant.ModelArgs.from_dict(config)
    m = gemma4_assistant.Model(args)
    for name, p in m.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif p.dim() == 2 and "embed_tokens" not in name:
            torch.nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[1]))
    with torch.no_grad():
        # the target scales scores by ~1/sqrt(head_dim); start the assistant's q_norm there (it uses scale 1)
        for layer in m.model.layers:
            layer.self_attn.q_norm.weight.fill_(layer.self_attn.head_dim ** -0.5)
            layer.self_attn.o_proj.weight.mul_(0.1)  # residual branches start small: trunk ~ identity
            layer.mlp.down_proj.weight.mul_(0.1)
        # start from "the target's hidden, renormalised": identity on the hidden half of the input
        D = m.args.hidden_size
        if m.args.backbone_hidden_size == D:
            m.pre_projection.weight[:, :D].mul_(0.1)
            m.pre_projection.weight[:, D:].copy_(torch.eye(D))
            m.post_projection.weight.copy_(torch.eye(D))
    share_target_embeddings(m, embed_weight)
    m.bind(target)
    for lt, layer in m.target_layers.items():
        if not torch.allclose(m._inv_freq[lt], target._inv_freq[lt], rtol=1e-4):
            raise ConfigError(f"assistant RoPE for {lt} does not match target layer {layer}")
    return m


def share_target_embeddings(assistant, weight: torch.Tensor) -> None:
    """Point the assistant's tied embedding/LM head at the target's embedding matrix [V, D] (no copy, frozen)."""
    if tuple(weight.shape) != (assistant.args.vocab_size, assistant.args.hidden_size):
        raise ConfigError(f"target embedding {tuple(weight.shape)} does not fit assistant "
                          f"({assistant.args.vocab_size}, {assistant.args.hidden_size})")
    p = torch.nn.Parameter(weight, requires_grad=False)
    assistant.model.embed_tokens.weight = p
    assistant.lm_head.weight = p


def _weight(lin) -> torch.Tensor:
    """fp32 [N, K] of an nn.Linear or a packed one (tandem.kernels)."""
    w = lin.dequantized_weight() if hasattr(lin, "dequantized_weight") else lin.weight
    return w.detach().float()


def _norm_scale(norm) -> torch.Tensor:
    """The multiplier an RMSNorm applies (Gemma 3's 1 + w, or w)."""
    w = norm.weight.detach().float()
    return 1.0 + w if getattr(norm, "unit_offset", False) else w


def init_from_target(m: gemma4_assistant.Model, target) -> list[int]:
    """Start each assistant layer as a copy of the target layer whose cache it reads (query side, norms, MLP) and
    the final norm as the target's: drafting then begins as "run the target's last layers on a guessed residual",
    and training only has to learn that guess (pre_projection). Returns the target layers copied."""
    layers = getattr(getattr(target, "model", None), "layers", None)
    if layers is None:
        raise ConfigError("--init target: the target has no model.layers to copy")
    copied = []
    with torch.no_grad():
        for layer in m.model.layers:
            src = layers[m.target_layers[layer.layer_type]]
            a, sa = layer.self_attn, src.self_attn
            if _weight(sa.q_proj).shape != a.q_proj.weight.shape:
                raise ConfigError(f"--init target: q_proj {tuple(_weight(sa.q_proj).shape)} of the target does "
                                  f"not fit the assistant's {tuple(a.q_proj.weight.shape)} (use the target's heads)")
            a.q_proj.weight.copy_(_weight(sa.q_proj))
            a.o_proj.weight.copy_(_weight(sa.o_proj))
            # the assistant attends with scale 1: fold the target's score scale into q_norm
            a.q_norm.weight.copy_(_norm_scale(sa.q_norm) * float(getattr(sa, "scale", 1.0)))
            for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                         "post_feedforward_layernorm"):
                getattr(layer, name).weight.copy_(_norm_scale(getattr(src, name)))
            n = min(layer.mlp.gate_proj.weight.shape[0], _weight(src.mlp.gate_proj).shape[0])
            layer.mlp.gate_proj.weight[:n].copy_(_weight(src.mlp.gate_proj)[:n])
            layer.mlp.up_proj.weight[:n].copy_(_weight(src.mlp.up_proj)[:n])
            layer.mlp.down_proj.weight[:, :n].copy_(_weight(src.mlp.down_proj)[:, :n])
            copied.append(m.target_layers[layer.layer_type])
        m.model.norm.weight.copy_(_norm_scale(target.model.norm))
        D = m.args.hidden_size
        if m.args.backbone_hidden_size == D:  # guess: the residual of the next token ~ its own embedding
            m.pre_projection.weight.zero_()
            m.pre_projection.weight[:, :D].copy_(torch.eye(D))
            m.post_projection.weight.copy_(torch.eye(D))
    return copied
