"""Xiaomi MiMo (HF model_type `mimo`): the Qwen2 architecture plus `num_nextn_predict_layers` MTP layers stored as
`model.mtp_layers.{i}.*`. The target runs as Qwen2; sanitize() sets the MTP weights aside in `model.nextn_weights`
(HF names, untouched) for the nextn drafter, which reads them from there."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.models import qwen2

_MTP = "model.mtp_layers."


@dataclass
class ModelArgs(qwen2.ModelArgs):
    model_type: str = "mimo"
    num_nextn_predict_layers: int = 0


class Model(qwen2.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.nextn_weights: dict[str, torch.Tensor] = {}

    def sanitize(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        self.nextn_weights = {k: v for k, v in weights.items() if k.startswith(_MTP)}
        return super().sanitize({k: v for k, v in weights.items() if not k.startswith(_MTP)})
