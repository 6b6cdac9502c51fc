"""Xiaomi MiMo (HF model_type `mimo`): the Qwen2 architecture plus `num_nextn_predict_layers` MTP layers stored as
`model.mtp_layers.{i}.*`. The target runs as Qwen2; sanitize() sets the MTP weights aside in `model.nextn_weights`
(HF names, untouched) for the nextn drafter, which reads them from there."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tandem.models import qwen2

_MTP = re.compile(r"^model\.mtp_layers\.(\d+)\.")


@dataclass
class ModelArgs(qwen2.ModelArgs):
    model_type: str = "mimo"
    num_nextn_predict_layers: int = 0


class Model(qwen2.Model):
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
