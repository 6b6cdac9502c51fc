"""Qwen2 / Qwen2.5 (HF model_type `qwen2`): bias on q/k/v (not on o), sliding window on layers >= max_window_layers
when use_sliding_window."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.models.decoder import DecoderArgs, DecoderLM
from tandem.models.layers import Attention


@dataclass
class ModelArgs(DecoderArgs):
    model_type: str = "qwen2"
    use_sliding_window: bool = False
    max_window_layers: int = 28
    rms_norm_eps: float = 1e-6

    def __post_init__(self):
        if not self.use_sliding_window:
            self.sliding_window = None
        if self.layer_types is None:  # as Qwen2Config resolves it
            self.layer_types = ["sliding_attention" if self.sliding_window is not None and i >= self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
        super().__post_init__()


class Model(DecoderLM):
    def make_attention(self, args: ModelArgs, i: int) -> Attention:
        return Attention(i, args.hidden_size, args.num_attention_heads, args.num_key_value_heads, args.head_dim,
                         qkv_bias=True, window=args.window(i))
