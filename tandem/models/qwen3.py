"""Qwen3 dense (HF model_type `qwen3`): Qwen2's layout without the QKV bias (unless attention_bias), with RMSNorm on
q and k per head before RoPE and head_dim from the config."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from tandem.models import qwen2
from tandem.models.decoder import DecoderLM
from tandem.models.layers import Attention, RMSNorm


@dataclass
class ModelArgs(qwen2.ModelArgs):
    model_type: str = "qwen3"


def qk_norm_attention(args: ModelArgs, i: int) -> Attention:
    """Qwen3 attention: q/k norms (plain weight), bias on q/k/v/o only with attention_bias."""
    return Attention(i, args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                     qkv_bias=args.attention_bias, o_bias=args.attention_bias, window=args.window(i),
                     qk_norm=partial(RMSNorm, eps=args.rms_norm_eps, unit_offset=False))


class Model(DecoderLM):
    def make_attention(self, args: ModelArgs, i: int) -> Attention:
        return qk_norm_attention(args, i)
