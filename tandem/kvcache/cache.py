"""Preallocated KV cache indexed by explicit positions (gpt-fast style), several slots, rollback by length.

Entry j of a slot holds the K/V of the token at position j. Readers only look at entries <= their own position,
so rolling back is just lowering `lengths[slot]`: stale entries are overwritten before anyone can read them.
Lengths are bookkeeping owned by the engine; models only write K/V and read through `attend()`.
"""

from __future__ import annotations

import torch

from tandem import kernels


class KVCache:
    """K/V buffers [S, Hkv, Tmax, D] for the layers that own KV (`specs`: layer -> (n_kv_heads, k_dim, v_dim))."""

    def __init__(self, specs: dict[int, tuple[int, int, int]], n_slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.specs = dict(specs)
        self.n_slots = n_slots
        self.max_len = max_len
        self.dtype = dtype
        self.device = torch.device(device)
        # zero-filled: a masked entry must contribute exactly 0, never NaN from uninitialised memory
        self.k = {i: torch.zeros(n_slots, h, max_len, dk, dtype=dtype, device=self.device)
                  for i, (h, dk, dv) in self.specs.items()}
        self.v = {i: torch.zeros(n_slots, h, max_len, dv, dtype=dtype, device=self.device)
                  for i, (h, dk, dv) in self.specs.items()}
        self.lengths = [0] * n_slots

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V stored per token per slot, over all owning layers."""
        el = torch.tensor([], dtype=self.dtype).element_size()
        return sum(h * (dk + dv) * el for h, dk, dv in self.specs.values())

    @property
    def total_bytes(self) -> int:
        return self.bytes_per_token * self.n_slots * self.max_len

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] at (slots [B], positions [B, T]); position -1 = padding."""
        kb, vb = self.k[layer], self.v[layer]
        if bool((positions < 0).any()):
            keep = positions >= 0
            s = slots[:, None].expand_as(positions)[keep]
            p = positions[keep]
            kb[s, :, p] = k[keep].to(kb.dtype)
            vb[s, :, p] = v[keep].to(vb.dtype)
        else:
            kb[slots[:, None], :, positions] = k.to(kb.dtype)
            vb[slots[:, None], :, positions] = v.to(vb.dtype)

    def attend(self, layer: int, q: torch.Tensor, slots: torch.Tensor, q_pos: torch.Tensor,
               window: int | None, scale: float, softcap: float | None = None) -> torch.Tensor:
        """Attention of q [B, T, Hq, D] against this layer's cache; the one place every reader goes through."""
        return kernels.attend(q, self.k[layer], self.v[layer], slots, q_pos, window, scale, softcap)

    def view(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Read-only views of the valid K, V of one slot: [Hkv, length, D] each (no copy)."""
        n = self.lengths[slot]
        return self.k[layer][slot, :, :n], self.v[layer][slot, :, :n]

    def rollback(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"rollback of slot {slot} to {length} outside [0, {self.lengths[slot]}]")
        self.lengths[slot] = length

    def set_length(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.max_len:
            raise ValueError(f"slot {slot}: length {length} outside [0, {self.max_len}]")
        self.lengths[slot] = length
