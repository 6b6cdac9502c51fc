"""The nextn (MTP) heads that DeepSeek-V3 and GLM-4.5 checkpoints carry at `model.layers.{L + j}`, built from the
target (its config, `nextn_weights`, RoPE tables; embedding and LM head are the target's, shared, never copied).

Head j, as transformers' MtpLayer (modeling_layers.py) with these families' configs:
    h' = eh_proj(concat(enorm(embed(token)), hnorm(prev)))        prev: the target's final-norm hidden (j = 0) or
    h' = decoder block of the family (attention + MoE) over h'      head j-1's output one position earlier
    out = shared_head.norm(h')                                     logits = target.lm_head(out)
The block is always MoE (transformers' get_mtp_config sets first_k_dense_replace = 0) and has its OWN cache, the
family's cache declared for the heads as if they were layers 0..n-1. Head j's first entry sits one position after
head j-1's, so its cache index is `position - offset[slot] - j` (RoPE uses the absolute position).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.nn as nn

from tandem.errors import ModelLoadError
from tandem.models.layers import DecoderLayer, RMSNorm
from tandem.models.moe import fuse_experts
from tandem.models.rope import rope_cos_sin

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# the target's embedding and head are used instead (transformers' MtpModel ignores these copies too)
_SHARED = ("shared_head.head.weight", "embed_tokens.weight")


class SharedHead(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.norm = RMSNorm(dim, eps, unit_offset=False)


class NextNLayer(DecoderLayer):
    """One MTP head; module names are the checkpoint's under `model.layers.{L + j}.`."""

    def __init__(self, target: nn.Module, args, j: int):
        D, eps = args.hidden_size, args.rms_norm_eps
        super().__init__(target.make_attention(args, j), target.make_mlp(args, j), D, eps)
        self.enorm = RMSNorm(D, eps, unit_offset=False)
        self.hnorm = RMSNorm(D, eps, unit_offset=False)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(D, eps)

    def head(self, emb: torch.Tensor, prev: torch.Tensor, cos_sin, cache_pos: torch.Tensor, cache,
             slots: torch.Tensor) -> torch.Tensor:
        """emb, prev [B, T, D]; cache_pos [B, T] (-1 = padding) -> shared_head.norm output [B, T, D]."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(prev.to(emb.dtype))], dim=-1))
        return self.shared_head.norm(self(x, cos_sin, cache_pos, cache, slots))


def has_nextn(target: nn.Module) -> bool:
    return bool(getattr(target, "nextn_weights", None)) and getattr(target.args, "num_nextn_predict_layers", 0) > 0


class NextN(nn.Module):
    """The target's `num_nextn_predict_layers` heads (`layers[j]`); the target is held, not registered."""

    def __init__(self, target: nn.Module):
        super().__init__()
        if not has_nextn(target):
            raise ModelLoadError(f"{target.args.model_type}: this checkpoint has no MTP (nextn) layers")
        t = target.args
        # the family's config seen by its heads: n layers, all MoE (as transformers' get_mtp_config); a dense
        # family (a head trained by `tandem train-nextn`) has no dense/MoE split
        moe = {"first_k_dense_replace": 0} if hasattr(t, "first_k_dense_replace") else {}
        self.args = dataclasses.replace(t, num_hidden_layers=t.num_nextn_predict_layers, **moe)
        self._target = [target]
        self.layers = nn.ModuleList(NextNLayer(target, self.args, j) for j in range(self.n_heads))
        self._load(target.nextn_weights, t.num_hidden_layers)
        self.requires_grad_(False)

    @property
    def n_heads(self) -> int:
        return self.args.num_hidden_layers

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def _load(self, weights: dict[str, torch.Tensor], L: int) -> None:
        sd, odd = {}, []
        for k, v in weights.items():
            m = _LAYER.match(k)
            if m is None or not L <= int(m[1]) < L + self.n_heads:
                odd.append(k)
            elif m[2] not in _SHARED:
                sd[f"layers.{int(m[1]) - L}.{m[2]}"] = v.float()
        if odd:
            raise ModelLoadError(f"{self.args.model_type}: MTP weights {odd[:4]} are not in the hub layout "
                                 f"model.layers.{{{L}..{L + self.n_heads - 1}}}.* this head reads")
        missing, unexpected = self.load_state_dict(fuse_experts(sd), strict=False)
        if missing or unexpected:
            raise ModelLoadError(f"{self.args.model_type} MTP layers: missing weights {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")

    def kv_specs(self) -> dict[int, tuple[int, int, int]]:
        return type(self.target).kv_specs(self)

    def make_cache(self, n_slots: int, max_len: int, **kw):
        """The family's own cache kind, one layer per head."""
        return type(self.target).make_cache(self, n_slots, max_len, **kw)

    def forward(self, j: int, tokens: torch.Tensor, prev: torch.Tensor, positions: torch.Tensor, cache,
                slots: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Head j over tokens [B, T] with prev [B, T, D] at absolute positions [B, T] (-1 = padding); slot b's
        head-0 entries start at offsets[b]. Writes head j's cache; returns its output [B, T, D]."""
        t = self.target
        emb = t.embed(tokens)
        cos_sin = rope_cos_sin(positions, t._inv_freq, emb.dtype, t._rope_scale)
        cache_pos = torch.where(positions >= 0, positions - offsets[:, None] - j, -1)
        return self.layers[j].head(emb, prev, cos_sin, cache_pos, cache, slots)
