"""The MLA cache (DeepSeek-V2/V3 multi-head latent attention): the compressed latent, stored once per token.

Per layer and token it holds [c_kv | k_pe]: the kv_a_layernorm output c_kv [kv_lora_rank] and the rotated shared
rope key k_pe [qk_rope_head_dim], in one buffer [S, 1, Tmax, R + Dr] -- never the expanded per-head K and V.
Weight-absorbed attention reads it as a one-head (MQA) cache: keys are the whole row, values its first R entries.
The same buffer is passed as K and V to the batch-invariant kernel (values come back as [c_kv | k_pe] and the
reader keeps the first R), so the latent is stored once and every read stays row-invariant.

Same bookkeeping as KVCache: entry j holds position j, readers see entries <= their own position, rollback lowers
`lengths[slot]`, position -1 marks a padding row (never written).
"""

from __future__ import annotations

import torch

from tandem import kernels
from tandem.errors import ConfigError
from tandem.kernels import quant_attention as qa
from tandem.kvcache.cache import SlotLengths


class MLACache(SlotLengths):
    """Latent buffers for `n_layers` MLA layers: [S, 1, Tmax, kv_lora_rank + rope_dim] each, float storage."""

    def __init__(self, n_layers: int, kv_lora_rank: int, rope_dim: int, n_slots: int, max_len: int, *,
                 k_type: str = "bf16", v_type: str | None = None, device: torch.device | str = "cpu"):
        fmt = qa.get_format(k_type)
        if v_type is not None and qa.get_format(v_type).name != fmt.name:
            raise ConfigError(f"MLA cache stores one latent per token: cache type K {fmt.name!r} and V "
                              f"{qa.get_format(v_type).name!r} must be the same")
        if fmt.dtype is None:
            raise ConfigError(f"MLA latent cache type {fmt.name!r} unsupported; expected one of f32, bf16, f16")
        self.k_type = self.v_type = fmt.name
        self.dtype, self.device = fmt.dtype, torch.device(device)
        self.n_slots, self.max_len = n_slots, max_len
        self.kv_lora_rank, self.rope_dim = kv_lora_rank, rope_dim
        # zero-filled: a masked entry must contribute exactly 0, never NaN from uninitialised memory
        self.latent = {i: torch.zeros(n_slots, 1, max_len, kv_lora_rank + rope_dim, dtype=fmt.dtype,
                                      device=self.device) for i in range(n_layers)}
        self.lengths = [0] * n_slots

    @property
    def bytes_per_token(self) -> int:
        """Bytes stored per token per slot over all layers: layers * (kv_lora_rank + rope_dim) * element size."""
        return sum(b.shape[-1] * b.element_size() for b in self.latent.values())

    @property
    def total_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.latent.values())

    def row_buffers(self) -> list[torch.Tensor]:
        return list(self.latent.values())

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, c_kv: torch.Tensor,
              k_pe: torch.Tensor) -> None:
        """Store c_kv [B, T, R] and rotated k_pe [B, T, Dr] at (slots [B], positions [B, T]); -1 = padding."""
        row = torch.cat((c_kv, k_pe), dim=-1).to(self.dtype)  # [B, T, R + Dr]
        keep = positions >= 0
        sl = slots[:, None].expand_as(positions)
        self.latent[layer][sl[keep], 0, positions[keep]] = row[keep]

    def attend(self, layer: int, q: torch.Tensor, slots: torch.Tensor, q_pos: torch.Tensor,
               scale: float) -> torch.Tensor:
        """Absorbed queries q [B, T, H, R + Dr] over the latent -> softmax-weighted c_kv [B, T, H, R]."""
        buf = self.latent[layer]
        return kernels.attend(q, buf, buf, slots, q_pos, None, scale)[..., :self.kv_lora_rank]

    def view(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid (c_kv [length, R], k_pe [length, Dr]) of one slot (views, no copy)."""
        buf = self.latent[layer][slot, 0, :self.lengths[slot]]
        return buf[:, :self.kv_lora_rank], buf[:, self.kv_lora_rank:]
