"""The nextn (MTP) heads a checkpoint carries, built from the target (its config, set-aside MTP weights, RoPE
tables; embedding and LM head are the target's, shared, never copied).

This base class is the DeepSeek-V3 / GLM-4.5 layout, `model.layers.{L + j}` (head j, as transformers' MtpLayer):
    h' = eh_proj(concat(enorm(embed(token)), hnorm(prev)))        prev: the target's final-norm hidden (j = 0) or
    h' = decoder block of the family (attention + MoE) over h'      head j-1's output one position earlier
    out = shared_head.norm(h')                                     logits = target.lm_head(out)
The block is always MoE (transformers' get_mtp_config sets first_k_dense_replace = 0) and has its OWN cache, the
family's cache declared for the heads as if they were layers 0..n-1. Head j's first entry sits one position after
head j-1's, so its cache index is `position - offset[slot] - j` (RoPE uses the absolute position).

A family that stores its heads otherwise (MiMo's `model.mtp_layers.*`, Qwen3.5's `mtp.*`) subclasses NextN in its
own file, overriding the hooks (count, weights_of, head_args, build, rename, head), and names the subclass in its
model's `nextn_layout` attribute.
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


def nextn_class(target: nn.Module) -> type["NextN"]:
    """The NextN (sub)class that reads this target's MTP heads."""
    return getattr(target, "nextn_layout", NextN)


def has_nextn(target: nn.Module) -> bool:
    cls = nextn_class(target)
    return bool(cls.weights_of(target)) and cls.count(target) > 0


def nextn_heads(target: nn.Module) -> "NextN":
    """The target's MTP heads, in the layout its family stores them."""
    return nextn_class(target)(target)


class NextN(nn.Module):
    """The target's `count(target)` heads; the target is held, not registered."""

    def __init__(self, target: nn.Module):
        super().__init__()
        if not has_nextn(target):
            raise ModelLoadError(f"{target.args.model_type}: this checkpoint has no MTP (nextn) layers")
        self.args = self.head_args(target.args, self.count(target))
        self._target = [target]
        self.build(target)
        self._load(self.weights_of(target))
        self.requires_grad_(False)

    # -- family hooks (this base: DeepSeek-V3 / GLM-4.5) ------------------------------------------------------------
    @staticmethod
    def count(target: nn.Module) -> int:
        return getattr(target.args, "num_nextn_predict_layers", 0)

    @staticmethod
    def weights_of(target: nn.Module) -> dict[str, torch.Tensor]:
        """The MTP weights the target's sanitize() set aside (hub names)."""
        return getattr(target, "nextn_weights", None) or {}

    def head_args(self, t, n: int):
        """The family's config seen by its heads: n layers, all MoE (as transformers' get_mtp_config)."""
        return dataclasses.replace(t, num_hidden_layers=n, first_k_dense_replace=0)

    def build(self, target: nn.Module) -> None:
        self.layers = nn.ModuleList(NextNLayer(target, self.args, j) for j in range(self.n_heads))

    def rename(self, key: str) -> str | None:
        """Checkpoint name -> module name; "" = not ours (shared with the target), None = not in this layout."""
        m, L = _LAYER.match(key), self.target.args.num_hidden_layers
        if m is None or not L <= int(m[1]) < L + self.n_heads:
            return None
        return "" if m[2] in _SHARED else f"layers.{int(m[1]) - L}.{m[2]}"

    def layout(self) -> str:
        L = self.target.args.num_hidden_layers
        return f"model.layers.{{{L}..{L + self.n_heads - 1}}}.*"

    def head(self, j: int, emb: torch.Tensor, prev: torch.Tensor, cos_sin, cache_pos: torch.Tensor, cache,
             slots: torch.Tensor) -> torch.Tensor:
        """Head j: emb, prev [B, T, D]; cache_pos [B, T] (-1 = padding) -> its output [B, T, D]."""
        return self.layers[j].head(emb, prev, cos_sin, cache_pos, cache, slots)

    def rope(self, j: int) -> tuple[torch.Tensor, float]:
        """Head j's RoPE (inverse frequencies, cos/sin scale): the target's (Step3.5: its layer type's)."""
        return self.target._inv_freq, self.target._rope_scale

    # -- common -------------------------------------------------------------------------------------------------
    @property
    def n_heads(self) -> int:
        return self.args.num_hidden_layers

    @property
    def target(self) -> nn.Module:
        return self._target[0]

    def _load(self, weights: dict[str, torch.Tensor]) -> None:
        sd, odd = {}, []
        for k, v in weights.items():
            name = self.rename(k)
            if name is None:
                odd.append(k)
            elif name:
                sd[name] = v.float()
        if odd:
            raise ModelLoadError(f"{self.args.model_type}: MTP weights {odd[:4]} are not in the hub layout "
                                 f"{self.layout()} this head reads")
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
        inv, scale = self.rope(j)
        cos_sin = rope_cos_sin(positions, inv, emb.dtype, scale)
        cache_pos = torch.where(positions >= 0, positions - offsets[:, None] - j, -1)
        return self.head(j, emb, prev, cos_sin, cache_pos, cache, slots)
