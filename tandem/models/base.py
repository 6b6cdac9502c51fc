"""Pieces shared by every model family: config base, output type, norms, RoPE."""

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
    """What every model forward returns. logits: [B, R, V] (R = selected rows) or None; hidden: [B, T, D]."""

    logits: torch.Tensor | None
    hidden: torch.Tensor


class CausalLM(nn.Module):
    """Base of every family's `Model`: the model declares its cache, the engine only calls `make_cache`.

    Attention-only families describe it with `kv_specs()` (layer -> (n_kv_heads, k_dim, v_dim)); families with
    recurrent state or a compressed latent override `make_cache`.
    """

    def kv_specs(self) -> dict[int, tuple[int, int, int]]:
        raise NotImplementedError(f"{type(self).__name__} must define kv_specs() or override make_cache()")

    def make_cache(self, n_slots: int, max_len: int, *, k_type: str = "bf16", v_type: str | None = None,
                   device="cpu") -> KVCache:
        """The cache this model reads and writes: `n_slots` sequences of up to `max_len` tokens."""
        return KVCache(self.kv_specs(), n_slots, max_len, device=device, k_type=k_type, v_type=v_type or k_type)


class RMSNorm(nn.Module):
    """Gemma-style RMSNorm: computed in fp32, scale is (1 + weight) unless `unit_offset=False`."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = True, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim)) if with_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            w = self.weight.float()
            out = out * (1.0 + w if self.unit_offset else w)
        return out.type_as(x)


def rope_inv_freq(head_dim: int, theta: float, partial_rotary_factor: float = 1.0,
                  device=None) -> torch.Tensor:
    """Default RoPE inverse frequencies over the rotated part of the head ([rot_dim/2])."""
    rot = int(head_dim * partial_rotary_factor)
    return 1.0 / (theta ** (torch.arange(0, rot, 2, dtype=torch.float32, device=device) / rot))


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, T, 1, 2*F] in `dtype` (halves duplicated, HF rotate_half layout)."""
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype)[:, :, None], (emb.sin() * scaling).to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated with cos/sin [B, T, 1, D] (rotate_half convention)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def embed_scale(hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Gemma multiplies embeddings by sqrt(D), rounded to the weight dtype as HF does."""
    return torch.tensor(math.sqrt(hidden_size), dtype=dtype)
