"""Qwen3-MoE (HF model_type `qwen3_moe`): Qwen3 attention (q/k norms) with a softmax top-k MoE (norm_topk_prob)
on every `decoder_sparse_step`-th layer not in `mlp_only_layers`; the others keep a dense GLU MLP."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from tandem.models.decoder import DecoderArgs, DecoderLM
from tandem.models.layers import GLUMLP, Attention, activation
from tandem.models.moe import Experts, SoftmaxTopKRouter, SparseMoeBlock, fuse_experts
from tandem.models.qwen3 import qk_norm_attention


@dataclass
class ModelArgs(DecoderArgs):
    model_type: str = "qwen3_moe"
    use_sliding_window: bool = False
    num_experts: int = 128
    num_local_experts: int | None = None  # what transformers 5 serialises num_experts as
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] | None = None

    def __post_init__(self):
        if not self.use_sliding_window:
            self.sliding_window = None
        self.mlp_only_layers = list(self.mlp_only_layers or [])
        if self.num_local_experts is not None:
            self.num_experts = self.num_local_experts
        super().__post_init__()

    def is_sparse(self, i: int) -> bool:
        return (i not in self.mlp_only_layers and self.num_experts > 0
                and (i + 1) % self.decoder_sparse_step == 0)


class Model(DecoderLM):
    def make_attention(self, args: ModelArgs, i: int) -> Attention:
        return qk_norm_attention(args, i)

    def make_mlp(self, args: ModelArgs, i: int) -> nn.Module:
        act = activation(args.hidden_act, args.model_type)
        if not args.is_sparse(i):
            return GLUMLP(args.hidden_size, args.intermediate_size, act)
        gate = SoftmaxTopKRouter(args.hidden_size, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob)
        return SparseMoeBlock(gate, Experts(args.num_experts, args.hidden_size, args.moe_intermediate_size, act))

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return super().sanitize(fuse_experts(weights))
