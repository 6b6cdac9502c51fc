"""Xiaomi MiMo (HF model_type `mimo`): the Qwen2 architecture plus `num_nextn_predict_layers` MTP layers stored as
`model.mtp_layers.{i}.*`. The target runs as Qwen2; sanitize() sets the MTP weights aside in `model.nextn_weights`
(HF names, untouched) for the nextn drafter, which builds them as `MTP` (`nextn_layout`).

MiMo's MTP layer (XiaomiMiMo's modeling_mimo.py, as vLLM's mimo_mtp.py mirrors it) is a Qwen2 decoder block whose
modules sit directly under `model.mtp_layers.{i}.`, fed
    input_proj(concat(hidden_layernorm(prev), token_layernorm(embed(token))))     -- hidden state FIRST
and closed by final_layernorm; logits by the target's LM head. Several layers chain one per draft step.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn as nn

from tandem.models import qwen2
from tandem.models.layers import DecoderLayer, RMSNorm
from tandem.models.nextn import NextN

_MTP = re.compile(r"^model\.mtp_layers\.(\d+)\.(.+)$")


@dataclass
class ModelArgs(qwen2.ModelArgs):
    model_type: str = "mimo"
    num_nextn_predict_layers: int = 0


class MTPLayer(DecoderLayer):
    """One MiMo MTP layer; module names are the checkpoint's under `model.mtp_layers.{j}.`."""

    def __init__(self, target: nn.Module, args: ModelArgs, j: int):
        D, eps = args.hidden_size, args.rms_norm_eps
        super().__init__(target.make_attention(args, j), target.make_mlp(args, j), D, eps)
        self.token_layernorm = RMSNorm(D, eps, unit_offset=False)
        self.hidden_layernorm = RMSNorm(D, eps, unit_offset=False)
        self.input_proj = nn.Linear(2 * D, D, bias=False)
        self.final_layernorm = RMSNorm(D, eps, unit_offset=False)

    def head(self, emb: torch.Tensor, prev: torch.Tensor, cos_sin, cache_pos: torch.Tensor, cache,
             slots: torch.Tensor) -> torch.Tensor:
        """emb, prev [B, T, D]; cache_pos [B, T] (-1 = padding) -> final_layernorm output [B, T, D]."""
        x = self.input_proj(torch.cat([self.hidden_layernorm(prev.to(emb.dtype)), self.token_layernorm(emb)], -1))
        return self.final_layernorm(self(x, cos_sin, cache_pos, cache, slots))


class MTP(NextN):
    """MiMo's heads. Its reference zeroes the embedding at position 0; the heads never run position 0 (head 0's
    first entry pairs token 1 with hidden row 0)."""

    def head_args(self, t: ModelArgs, n: int) -> ModelArgs:
        return dataclasses.replace(t, num_hidden_layers=n, layer_types=["full_attention"] * n)

    def build(self, target: nn.Module) -> None:
        self.layers = nn.ModuleList(MTPLayer(target, self.args, j) for j in range(self.n_heads))

    def rename(self, key: str) -> str | None:
        m = _MTP.match(key)
        return None if m is None or int(m[1]) >= self.n_heads else f"layers.{m[1]}.{m[2]}"

    def layout(self) -> str:
        return f"model.mtp_layers.{{0..{self.n_heads - 1}}}.*"


class Model(qwen2.Model):
    nextn_layout = MTP

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.nextn_weights: dict[str, torch.Tensor] = {}

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MTP layers 0..n-1 go aside; one the config does not declare stays and fails the strict load by name."""
        def is_nextn(k: str) -> bool:
            m = _MTP.match(k)
            return m is not None and int(m[1]) < self.args.num_nextn_predict_layers

        self.nextn_weights = {k: v for k, v in weights.items() if is_nextn(k)}
        return super().sanitize({k: v for k, v in weights.items() if not is_nextn(k)})
