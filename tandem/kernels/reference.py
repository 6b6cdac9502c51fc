"""Reference attention over a position-indexed cache (plain torch, any device)."""

from __future__ import annotations

import torch


def attend_reference(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor,
                     q_pos: torch.Tensor, window: int | None, scale: float,
                     softcap: float | None = None) -> torch.Tensor:
    """Causal (optionally sliding-window) attention of new queries against cached keys.

    q [B, T, Hq, D]; k_buf, v_buf [S, Hkv, Tmax, D]; slots [B]; q_pos [B, T] (-1 = padding row).
    Query at position p sees cache entries j with p - window < j <= p. Returns [B, T, Hq, Dv].
    """
    B, T, Hq, D = q.shape
    L = int(q_pos.max().item()) + 1
    k = k_buf.index_select(0, slots)[:, :, :L]  # [B, Hkv, L, D]
    v = v_buf.index_select(0, slots)[:, :, :L]
    group = Hq // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q.transpose(1, 2).float(), k.transpose(-1, -2).float()) * scale  # [B, Hq, T, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    j = torch.arange(L, device=q.device)
    pos = q_pos.clamp(min=0)[:, None, :, None]  # padding rows attend to entry 0 only (output ignored)
    allowed = j <= pos
    if window is not None:
        allowed = allowed & (j > pos - window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, v.float())  # [B, Hq, T, Dv]
    return out.transpose(1, 2).to(q.dtype)
