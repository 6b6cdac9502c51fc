"""Gated DeltaNet linear attention (Qwen3-Next, Qwen3.5): causal depthwise conv over q|k|v, l2-normalised q and k,
a per-head decayed delta-rule state, output RMSNorm gated by silu(z). Names copy the HF checkpoint (`linear_attn.*`).

Two forms of the same recurrence: the chunked (WY / UT-transform) form for long prefill and the per-row recurrent
form for decode and verify (T <= RECURRENT_MAX_ROWS), whose per-row arithmetic is what rollback replays.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.kvcache.hybrid import HybridCache
from tandem.kvcache.recurrent import LayerSpec, delta_rule_step, expand_heads
from tandem.models.layers import rowwise

RECURRENT_MAX_ROWS = 32
CHUNK = 64


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def recurrent_delta_rule(q, k, v, g, beta, state):
    """Row by row. q, k [B, T, H, Dk], v [B, T, H, Dv], g, beta [B, T, H], state [B, H, Dk, Dv] (fp32)
    -> (out [B, T, H, Dv], state after the last row)."""
    outs = []
    for t in range(q.shape[1]):
        state = delta_rule_step(state, k[:, t], v[:, t], g[:, t], beta[:, t])
        outs.append((state * q[:, t, :, :, None]).sum(-2))
    return torch.stack(outs, 1), state


def chunked_delta_rule(q, k, v, g, beta, state, chunk: int = CHUNK):
    """The same recurrence over chunks of `chunk` rows (shapes as `recurrent_delta_rule`): inside a chunk the
    delta-rule updates are solved at once with a unit-lower-triangular system; only chunk boundaries are serial."""
    B, T, H, _ = k.shape
    dt = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 when given (the agreement test)
    q, k, v, g, beta = (x.transpose(1, 2).to(dt) for x in (q, k, v, g, beta))  # [B, H, T, ...]
    pad = -T % chunk
    q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
    g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    cum = g.cumsum(-1)  # log of the decay from the chunk start to each row
    upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(upper, float("-inf")).exp()  # [B, H, n, C, C]
    system = (k_beta @ k.transpose(-1, -2)) * decay
    attn = (q @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
    w = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False, unitriangular=True)
    q = q * cum.exp()[..., None]
    k = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]
    out = torch.empty_like(u)
    for i in range(n):
        v_new = u[:, :, i] - w[:, :, i] @ state
        out[:, :, i] = q[:, :, i] @ state + attn[:, :, i] @ v_new
        state = state * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
    return out.reshape(B, H, n * chunk, -1)[:, :, :T].transpose(1, 2), state


class GatedRMSNorm(nn.Module):
    """RMSNorm (plain weight) of x, times silu(gate): the reference's RMSNormGated, in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return (out * rowwise(F.silu, gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """Layer `layer_idx`'s linear attention over the hybrid cache's recurrent state."""

    def __init__(self, layer_idx: int, hidden: int, n_k_heads: int, n_v_heads: int, k_dim: int, v_dim: int,
                 conv_width: int, act: Callable[[torch.Tensor], torch.Tensor], eps: float):
        super().__init__()
        self.layer_idx, self.act = layer_idx, act
        self.n_k, self.n_v, self.k_dim, self.v_dim = n_k_heads, n_v_heads, k_dim, v_dim
        self.conv_dim = 2 * n_k_heads * k_dim + n_v_heads * v_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, conv_width, groups=self.conv_dim, bias=False,
                                padding=conv_width - 1)
        self.dt_bias = nn.Parameter(torch.ones(n_v_heads))
        self.A_log = nn.Parameter(torch.zeros(n_v_heads))
        self.norm = GatedRMSNorm(v_dim, eps)
        self.out_proj = nn.Linear(n_v_heads * v_dim, hidden, bias=False)
        self.in_proj_qkv = nn.Linear(hidden, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(hidden, n_v_heads * v_dim, bias=False)
        self.in_proj_b = nn.Linear(hidden, n_v_heads, bias=False)
        self.in_proj_a = nn.Linear(hidden, n_v_heads, bias=False)

    def spec(self) -> LayerSpec:
        return LayerSpec(self.conv_dim, self.conv1d.kernel_size[0], self.n_v, self.k_dim, self.v_dim)

    def conv(self, x: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
        """Causal depthwise conv + activation: x [B, T, C] after the window [B, C, K-1] of earlier inputs."""
        full = torch.cat([window, x.transpose(1, 2).float()], dim=-1)  # [B, C, K-1+T]
        w = self.conv1d.weight[:, 0].float()  # [C, K]
        out = (full.unfold(-1, w.shape[-1], 1) * w[:, None]).sum(-1)  # [B, C, T]
        return self.act(out).transpose(1, 2).to(x.dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: HybridCache, slots: torch.Tensor,
                n_valid: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], positions [B, T] (-1 = padding, after the valid rows), n_valid [B] -> [B, T, D]."""
        B, T, _ = x.shape
        valid = (positions >= 0)[..., None]  # [B, T, 1]
        mixed = self.in_proj_qkv(x) * valid  # padded rows are zero inputs, as in the reference
        window, state = cache.recurrent.read(self.layer_idx, slots)
        qk = self.n_k * self.k_dim
        q, k, v = self.conv(mixed, window).float().split([qk, qk, self.n_v * self.v_dim], dim=-1)
        # contiguous: a reduction over a strided view may group its sums by the row count (not row-invariant)
        q = l2norm(q.reshape(B, T, self.n_k, self.k_dim).contiguous()) * self.k_dim ** -0.5
        k = l2norm(k.reshape(B, T, self.n_k, self.k_dim).contiguous()) * valid[..., None]
        v = v.reshape(B, T, self.n_v, self.v_dim)
        beta = rowwise(torch.sigmoid, self.in_proj_b(x).float()) * valid  # padding: beta = g = 0 leaves the state as is
        g = -self.A_log.float().exp() * rowwise(F.softplus, self.in_proj_a(x).float() + self.dt_bias.float()) * valid
        rule = recurrent_delta_rule if T <= RECURRENT_MAX_ROWS else chunked_delta_rule
        out, new_state = rule(expand_heads(q, self.n_v), expand_heads(k, self.n_v), v, g, beta, state)
        cache.recurrent.write(self.layer_idx, slots, n_valid, window, state, mixed, new_state, (k, v, g, beta))
        z = self.in_proj_z(x).reshape(B, T, self.n_v, self.v_dim)
        out = self.norm(out.to(x.dtype), z).reshape(B, T, -1)
        return self.out_proj(out)
