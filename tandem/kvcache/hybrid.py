"""The cache of hybrid models (Qwen3-Next / Qwen3.5): K/V for the full-attention layers (a KVCache) and conv +
delta-rule state for the linear-attention layers (`.recurrent`, a RecurrentState). `set_length` / `rollback` move
both, so every kind of state holds exactly the same tokens."""

from __future__ import annotations

import torch

from tandem.kvcache.cache import KVCache
from tandem.kvcache.recurrent import LayerSpec, RecurrentState


class HybridCache(KVCache):
    """KVCache over the attention layers in `kv_specs`, plus `recurrent` for the layers in `recurrent_specs`."""

    rolls_back_across_forwards = False

    def __init__(self, kv_specs: dict[int, tuple[int, int, int]], recurrent_specs: dict[int, LayerSpec],
                 n_slots: int, max_len: int, *, device: torch.device | str = "cpu", k_type: str = "bf16",
                 v_type: str | None = None):
        super().__init__(kv_specs, n_slots, max_len, device=device, k_type=k_type, v_type=v_type or k_type)
        self.recurrent = RecurrentState(recurrent_specs, n_slots, device)

    @property
    def total_bytes(self) -> int:
        """K/V buffers plus the recurrent state of every slot (which does not grow with the context)."""
        return super().total_bytes + self.recurrent.total_bytes

    def rollback(self, slot: int, length: int) -> None:
        self.recurrent.restore(slot, length)  # first: it refuses before anything moves
        super().rollback(slot, length)

    def set_length(self, slot: int, length: int) -> None:
        self.recurrent.restore(slot, length)
        super().set_length(slot, length)
