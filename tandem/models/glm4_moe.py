"""GLM-4.5 / GLM-4.5-Air (HF model_type `glm4_moe`): GQA attention with QKV bias (attention_bias, never on o_proj),
optional q/k RMSNorm (use_qk_norm), partial rotary (partial_rotary_factor, default 0.5: rotate_half over the first
head_dim * factor dims of each head, as transformers' Glm4MoeAttention), and DeepSeek-V3's MoE: sigmoid grouped
top-k router with e_score_correction_bias, shared experts, `first_k_dense_replace` dense layers.

MTP (nextn) layers: GLM-4.5 checkpoints carry `num_nextn_predict_layers` extra layers at `model.layers.{L + i}`.
They are not part of the target: sanitize() sets them aside in `model.nextn_weights` (HF names, untouched) for the
nextn drafter, which reads them from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from tandem.models.deepseek_v3 import GroupedMoeArgs, GroupedMoeLM
from tandem.models.layers import Attention, RMSNorm


@dataclass
class ModelArgs(GroupedMoeArgs):
    model_type: str = "glm4_moe"
    use_qk_norm: bool = False
    rms_norm_eps: float = 1e-5

    def __post_init__(self):
        rp = self.rope_parameters or self.rope_scaling or {}
        if self.partial_rotary_factor is None and "partial_rotary_factor" not in rp:
            self.partial_rotary_factor = 0.5  # Glm4MoeConfig's default
        super().__post_init__()


class Model(GroupedMoeLM):
    def make_attention(self, args: ModelArgs, i: int) -> Attention:
        norm = partial(RMSNorm, eps=args.rms_norm_eps, unit_offset=False) if args.use_qk_norm else None
        return Attention(i, args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                         qkv_bias=args.attention_bias, o_bias=False, qk_norm=norm)
