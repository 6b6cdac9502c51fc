"""Pieces shared by every model family: config base, output type, the model base class (declares its cache)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.errors import ConfigError
from tandem.kvcache import KVCache


@dataclass
class BaseConfig:
    """Dataclass configs built from HF config.json dicts; unknown keys are ignored (as in mlx-lm)."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Output:
    """What every model forward returns. logits: [B, R, V] (R = selected rows) or None; hidden: [B, T, D] (final
    norm); aux: [B, T, n*D] the residual stream entering each layer of the model's `aux_layers` (vLLM's numbering:
    id j = the output of layer j-1), concatenated, or None when the model was asked for none (EAGLE-3 reads it)."""

    logits: torch.Tensor | None
    hidden: torch.Tensor
    aux: torch.Tensor | None = None

    @property
    def drafter_rows(self) -> torch.Tensor:
        """What a drafter reads per row [B, T, *]: the aux hidden states when the model captures them, else hidden."""
        return self.hidden if self.aux is None else self.aux

    def with_drafter_rows(self, rows: torch.Tensor) -> "Output":
        """This Output with the drafter's rows [B, T, *] of a whole prompt (kept chunk by chunk) in their place."""
        return Output(self.logits, self.hidden, rows) if self.aux is not None else Output(self.logits, rows)

    @staticmethod
    def cat_rows(outs: list["Output"]) -> "Output":
        """Consecutive chunks of one sequence as one Output (logits of the last chunk; hidden / aux of all)."""
        aux = None if outs[-1].aux is None else torch.cat([o.aux for o in outs], 1)
        return Output(outs[-1].logits, torch.cat([o.hidden for o in outs], 1), aux)


class CausalLM(nn.Module):
    """Base of every family's `Model`: the model declares its cache, the engine only calls `make_cache`.

    Attention-only families describe it with `kv_specs()` (layer -> (n_kv_heads, k_dim, v_dim)); families with
    recurrent state or a compressed latent override `make_cache`. A family whose forward fills Output.aux sets
    `captures_aux`; `aux_layers` (set by an EAGLE-3 drafter) says which layers' inputs it captures.
    """

    captures_aux = False
    aux_layers: tuple[int, ...] = ()

    def kv_specs(self) -> dict[int, tuple[int, int, int]]:
        raise NotImplementedError(f"{type(self).__name__} must define kv_specs() or override make_cache()")

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str = "bf16", v_type: str | None = None,
                   device="cpu") -> KVCache:
        """The cache this model reads and writes: `n_slots` sequences of up to `max_len` tokens."""
        return KVCache(self.kv_specs(), n_slots, max_len, device=device, k_type=k_type, v_type=v_type or k_type)


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def embed_scale(hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Gemma multiplies embeddings by sqrt(D), rounded to the weight dtype as HF does."""
    return torch.tensor(math.sqrt(hidden_size), dtype=dtype)
