"""GGUF archs `qwen35` / `qwen35moe` (Qwen3.5 / Qwen3.6 text), as conversion/qwen.py Qwen3_5(Moe)TextModel writes them.

What the converter does, undone here: every `*norm.weight` but the Gated DeltaNet's own (ssm_norm) is stored as
1 + w; A_log as -exp(A_log); dt_bias renamed ssm_dt.bias; conv1d squeezed to [C, K]; when linear_num_value_heads >
linear_num_key_heads the V heads of in_proj_qkv / in_proj_z / in_proj_a / in_proj_b / A_log / dt_bias / conv1d /
out_proj are reordered from grouped-by-K-head to tiled (_LinearAttentionVReorderBase). Layer kinds come from
full_attention_interval; partial rotary from rope.dimension_count. The MTP layers (mtp_num_hidden_layers) are
appended at blk.{L..} with mtp.fc / pre_fc_norm_embedding / pre_fc_norm_hidden / norm written as every MTP layer's
blk.{L + j}.nextn.{eh_proj, enorm, hnorm, shared_head_norm}; regroup() returns them to the hub's `mtp.*` names,
which the model keeps aside in `mtp_weights`.
"""

from __future__ import annotations

import re

import torch

from tandem.errors import ModelLoadError
from tandem.loading.gguf_archs import common as c
from tandem.loading.gguf_archs.base import GGUFArch

_LIN = "model.layers.{bid}.linear_attn."
_LAYER = {
    "blk.{bid}.attn_norm.weight": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.post_attention_norm.weight": "model.layers.{bid}.post_attention_layernorm.weight",
    **{f"blk.{{bid}}.attn_{g}.weight": f"model.layers.{{bid}}.self_attn.{g}_proj.weight" for g in "qkv"},
    "blk.{bid}.attn_output.weight": "model.layers.{bid}.self_attn.o_proj.weight", **c.QK_NORM,
    "blk.{bid}.attn_qkv.weight": _LIN + "in_proj_qkv.weight",
    "blk.{bid}.attn_gate.weight": _LIN + "in_proj_z.weight",
    "blk.{bid}.ssm_alpha.weight": _LIN + "in_proj_a.weight",
    "blk.{bid}.ssm_beta.weight": _LIN + "in_proj_b.weight",
    "blk.{bid}.ssm_out.weight": _LIN + "out_proj.weight",
    "blk.{bid}.ssm_norm.weight": _LIN + "norm.weight",
    "blk.{bid}.ssm_conv1d.weight": _LIN + "conv1d.weight",
    "blk.{bid}.ssm_a": _LIN + "A_log",
    "blk.{bid}.ssm_dt.bias": _LIN + "dt_bias",
    **{k: v for k, v in c.NEXTN.items() if "embed_tokens" not in k and "shared_head_head" not in k},
}
_MOE = {
    "blk.{bid}.ffn_gate_inp.weight": "model.layers.{bid}.mlp.gate.weight",
    **{f"blk.{{bid}}.ffn_{p}_exps.weight": f"model.layers.{{bid}}.mlp.experts.{p}_proj"
       for p in ("gate", "up", "down")},
    **{f"blk.{{bid}}.ffn_{p}_shexp.weight": f"model.layers.{{bid}}.mlp.shared_expert.{p}_proj.weight"
       for p in ("gate", "up", "down")},
    "blk.{bid}.ffn_gate_inp_shexp.weight": "model.layers.{bid}.mlp.shared_expert_gate.weight",
}
_GLOBAL = {k: v for k, v in c.DECODER_TENSORS.items() if "{bid}" not in k}
_KEYS = {**c.CONFIG_KEYS, "ssm.conv_kernel": "linear_conv_kernel_dim", "ssm.state_size": "linear_key_head_dim",
         "ssm.group_count": "linear_num_key_heads", "ssm.time_step_rank": "linear_num_value_heads",
         "full_attention_interval": "full_attention_interval"}
_MOE_KEYS = {"expert_count": "num_experts", "expert_used_count": "num_experts_per_tok",
             "expert_feed_forward_length": "moe_intermediate_size",
             "expert_shared_feed_forward_length": "shared_expert_intermediate_size"}
_FULL = ["attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight", "attn_q_norm.weight",
         "attn_k_norm.weight"]
_LINEAR = ["attn_qkv.weight", "attn_gate.weight", "ssm_alpha.weight", "ssm_beta.weight", "ssm_out.weight",
           "ssm_norm.weight", "ssm_conv1d.weight", "ssm_a", "ssm_dt.bias"]
_MTP_SHARED = {"eh_proj": "mtp.fc", "enorm": "mtp.pre_fc_norm_embedding", "hnorm": "mtp.pre_fc_norm_hidden",
               "shared_head.norm": "mtp.norm"}


def _finalize(cfg, f, moe: bool):
    a = f.architecture
    L, n = c.split_nextn(cfg, f, key="mtp_num_hidden_layers")
    c.uniform(cfg, f, "num_attention_heads", "num_key_value_heads", "intermediate_size")
    need = ["num_attention_heads", "head_dim", "linear_conv_kernel_dim", "linear_key_head_dim",
            "linear_num_key_heads", "linear_num_value_heads", "full_attention_interval"]
    need += list(_MOE_KEYS.values()) if moe else []
    missing = [k for k in need if k not in cfg]
    inner = f.meta(f"{a}.ssm.inner_size")
    if missing or inner is None:
        keys = {h: g for g, h in {**_KEYS, **_MOE_KEYS}.items()}
        lacks = [f"{a}.{keys[k]}" for k in missing] or [f"{a}.ssm.inner_size"]
        raise ModelLoadError(f"{f.path}: GGUF metadata lacks {lacks}")
    if not moe:
        c.no_experts(cfg, f)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg["linear_value_head_dim"] = int(inner) // cfg["linear_num_value_heads"]
    rot = f.meta(f"{a}.rope.dimension_count")
    cfg["partial_rotary_factor"] = int(rot) / cfg["head_dim"] if rot is not None else 0.25
    cfg["rope_parameters"] = c.rope_parameters(cfg, f)
    ffn = ([f"ffn_{p}.weight" for p in ("gate", "up", "down")] if not moe else
           [g.format(bid=0)[len("blk.0."):] for g in _MOE])
    every = ["attn_norm.weight", "post_attention_norm.weight"] + ffn
    interval = cfg["full_attention_interval"]
    blocks = {i: every + (_FULL if (i + 1) % interval == 0 else _LINEAR) for i in range(L)}
    blocks.update({i: every + _FULL + list(c.NEXTN_REQUIRED) for i in range(L, L + n)})
    c.require(f, blocks)


def _minus_one(t: torch.Tensor, cfg: dict) -> torch.Tensor:
    return t - 1.0


def _untile(t: torch.Tensor, dim: int, cfg: dict, head_dim: int) -> torch.Tensor:
    """Inverse of the converter's _reorder_v_heads: V heads tiled [r, n_k, hd] -> grouped [n_k, r, hd] along dim."""
    n_k, n_v = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    if n_k == n_v:
        return t
    dim %= t.dim()
    shape = list(t.shape)
    t = t.reshape(*shape[:dim], n_v // n_k, n_k, head_dim, *shape[dim + 1:])
    return t.transpose(dim, dim + 1).reshape(shape)


def _qkv(t, cfg):
    qk = 2 * cfg["linear_num_key_heads"] * cfg["linear_key_head_dim"]
    return torch.cat([t[:qk], _untile(t[qk:], 0, cfg, cfg["linear_value_head_dim"])])


_FIXUPS = {
    r"(attn_norm|post_attention_norm|output_norm|attn_q_norm|attn_k_norm|nextn\.(enorm|hnorm|shared_head_norm))"
    r"\.weight$": _minus_one,
    r"\.attn_qkv\.weight$": _qkv,
    r"\.ssm_conv1d\.weight$": lambda t, cfg: _qkv(t, cfg)[:, None, :],  # [C, K] -> the Conv1d's [C, 1, K]
    r"\.attn_gate\.weight$": lambda t, cfg: _untile(t, 0, cfg, cfg["linear_value_head_dim"]),
    r"\.ssm_(alpha|beta)\.weight$": lambda t, cfg: _untile(t, 0, cfg, 1),
    r"\.ssm_dt\.bias$": lambda t, cfg: _untile(t, 0, cfg, 1),
    r"\.ssm_a$": lambda t, cfg: _untile(torch.log(-t), 0, cfg, 1),  # stored as -exp(A_log)
    r"\.ssm_out\.weight$": lambda t, cfg: _untile(t, 1, cfg, cfg["linear_value_head_dim"]),
}
_MTP_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_STACKED = re.compile(r"^(.*\.experts)\.(gate_proj|up_proj|down_proj)$")


def _regroup(weights: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """blk.{L + j} -> the hub's mtp.layers.{j}.* (experts per expert, as the hub stores them); the nextn tensors the
    converter copied to every MTP layer -> mtp.fc / mtp.pre_fc_norm_* / mtp.norm (one copy)."""
    L, out = cfg["num_hidden_layers"], {}
    for k, v in weights.items():
        m = _MTP_LAYER.match(k)
        if m is None or int(m[1]) < L:
            out[k] = v
            continue
        leaf = m[2].removesuffix(".weight")
        if leaf in _MTP_SHARED:
            name = _MTP_SHARED[leaf] + ".weight"
            if name in out and not torch.equal(out[name], v):
                raise ModelLoadError(f"{k}: the MTP layers' copies of {name} differ")
            out[name] = v
            continue
        name = f"mtp.layers.{int(m[1]) - L}.{m[2]}"
        s = _STACKED.match(name)
        if s is None:
            out[name] = v
        else:
            out.update({f"{s[1]}.{e}.{s[2]}.weight": v[e] for e in range(v.shape[0])})
    return out


def _arch(moe: bool) -> GGUFArch:
    layer = {**_LAYER, **(_MOE if moe else c.DENSE_MLP)}
    return GGUFArch(
        model_type="qwen3_5_moe_text" if moe else "qwen3_5_text",
        architectures=["Qwen3_5MoeForCausalLM" if moe else "Qwen3_5ForCausalLM"],
        config_keys={**_KEYS, **(_MOE_KEYS if moe else {})},
        config_defaults={**c.CONFIG_DEFAULTS},
        tensors={**_GLOBAL, **layer},
        optional={"output.weight", *layer},
        fixups=_FIXUPS,
        finalize=lambda cfg, f: _finalize(cfg, f, moe),
        regroup=_regroup,
    )


ARCH, ARCH_MOE = _arch(False), _arch(True)
