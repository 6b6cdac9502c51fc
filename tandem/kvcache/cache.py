"""Preallocated KV cache indexed by explicit positions (gpt-fast style), several slots, rollback by length.

Entry j of a slot holds the K/V of the token at position j. Readers only look at entries <= their own position,
so rolling back is just lowering `lengths[slot]`: stale entries are overwritten before anyone can read them.
Lengths are bookkeeping owned by the engine; models only write K/V and read through `attend()`.

K and V have separate storage types (`k_type`, `v_type`): f32 / bf16 / f16 (plain tensors, `.k[layer]` and
`.v[layer]` are [S, Hkv, Tmax, D] tensors), q8_0 (alias int8) and the Hadamard-rotated turbo4 / turbo3 / turbo2
(`.k[layer]` is then a tandem.kernels.quant_attention.QuantBuffer). See tandem/kernels/quant_attention.py.
`attend()` is the one place readers go through: it rotates the reader's q for a rotated K and un-rotates the output
for a rotated V, so model code (target layers, KV-shared layers, the assistant reading the target's cache) never
deals with the storage format.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from tandem import kernels
from tandem.kernels import quant_attention as qa
from tandem.kernels._ext import ext
from tandem.kernels.attention import fast_attend_supported


@dataclass
class TreeRows:
    """A forward whose rows are draft trees: row t of batch row b is stored at cache entry index[b, t] (-1:
    padding), not at its position; entries base[b] + u (u < M) form the slot's tree region, pos [B, M] their
    positions, and row t sees region entry u iff mask[b, t, u] (its ancestors and itself) besides every entry
    before the region. A chain is the tree whose mask is lower-triangular."""

    index: torch.Tensor  # [B, T] long
    base: torch.Tensor  # [B] long
    pos: torch.Tensor  # [B, M] long
    mask: torch.Tensor  # [B, T, M] bool

    def to(self, device) -> "TreeRows":
        return TreeRows(*(t.to(device) for t in (self.index, self.base, self.pos, self.mask)))


class SlotLengths:
    """The per-slot length bookkeeping every position-indexed cache shares; only the engine moves lengths."""

    max_len: int
    lengths: list[int]
    rolls_back_across_forwards = True  # False: only to a row of the last forward (recurrent state)

    def rollback(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.lengths[slot]:
            raise ValueError(f"rollback of slot {slot} to {length} outside [0, {self.lengths[slot]}]")
        self.lengths[slot] = length

    def set_length(self, slot: int, length: int) -> None:
        if not 0 <= length <= self.max_len:
            raise ValueError(f"slot {slot}: length {length} outside [0, {self.max_len}]")
        self.lengths[slot] = length

    # -- prefix reuse (tandem.kvcache.prefix): a position range of a slot, saved and restored verbatim ----------
    def row_buffers(self) -> list[torch.Tensor]:
        """Every tensor that holds per-position entries, laid out [S, H, Tmax, ...]."""
        raise NotImplementedError

    def export_rows(self, slot: int, a: int, b: int) -> list[torch.Tensor]:
        """Copies of entries a..b-1 of `slot` in every buffer, as stored (codes and scales for quantized K/V)."""
        return [t[slot, :, a:b].clone() for t in self.row_buffers()]

    def import_rows(self, slot: int, a: int, rows: list[torch.Tensor]) -> None:
        """Write what export_rows gave back at entries a.. of `slot` (the engine sets the length)."""
        for t, r in zip(self.row_buffers(), rows, strict=True):
            t[slot, :, a:a + r.shape[1]] = r


class KVCache(SlotLengths):
    """K/V buffers [S, Hkv, Tmax, D] for the layers that own KV (`specs`: layer -> (n_kv_heads, k_dim, v_dim)).

    `dtype` is the storage of both K and V unless `k_type` / `v_type` (names, e.g. "bf16", "q8_0", "turbo3")
    override it.
    """

    def __init__(self, specs: dict[int, tuple[int, int, int]], n_slots: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", *,
                 k_type: str | None = None, v_type: str | None = None):
        self.specs = dict(specs)
        self.n_slots = n_slots
        self.max_len = max_len
        self.device = torch.device(device)
        self.k_format = qa.get_format(k_type if k_type is not None else dtype)
        self.v_format = qa.get_format(v_type if v_type is not None else dtype)
        self.k_type, self.v_type = self.k_format.name, self.v_format.name
        # `dtype`: the float storage dtype when K and V are both plain float (else None)
        fk, fv = self.k_format.dtype, self.v_format.dtype
        self.dtype = fk if fk is not None and fk == fv else None
        # zero-filled: a masked entry must contribute exactly 0, never NaN from uninitialised memory
        self.k = {i: self._alloc(self.k_format, h, dk) for i, (h, dk, dv) in self.specs.items()}
        self.v = {i: self._alloc(self.v_format, h, dv) for i, (h, dk, dv) in self.specs.items()}
        self.lengths = [0] * n_slots
        self.tree: TreeRows | None = None  # set for the duration of a tree forward (tree_rows)

    @property
    def supports_tree(self) -> bool:
        """Tree forwards need the row-invariant C++ kernel: plain fp32/bf16 K and V on CPU."""
        return (self.dtype in (torch.float32, torch.bfloat16) and self.device.type == "cpu"
                and ext() is not None)

    @contextmanager
    def tree_rows(self, tree: TreeRows | None):
        """Writes and reads of the forward inside go by `tree` (None: the usual position-indexed rows)."""
        if tree is not None and not self.supports_tree:
            raise RuntimeError(f"a {self.k_type}/{self.v_type} cache on {self.device} cannot run draft trees")
        self.tree = tree
        try:
            yield
        finally:
            self.tree = None

    def compact(self, slot: int, dst: int, src: list[int]) -> None:
        """After a tree verify: entries src (ascending, each >= its destination) move to dst, dst+1, ..: the
        accepted path becomes the contiguous prefix it stands for."""
        if not src or src == list(range(dst, dst + len(src))):
            return
        s = torch.tensor(src, device=self.device)
        for d in (self.k, self.v):
            for buf in d.values():
                buf[slot, :, dst:dst + len(src)] = buf[slot, :, s]

    def _alloc(self, fmt: qa.Format, heads: int, d: int):
        if fmt.dtype is not None:
            # beside a quantized side the float one is read by attend_chunked: pad it like QuantBuffer
            n = self.max_len if self.dtype is not None else -(-self.max_len // 32) * 32
            return torch.zeros(self.n_slots, heads, n, d, dtype=fmt.dtype, device=self.device)
        return qa.QuantBuffer(fmt, self.n_slots, heads, self.max_len, d, self.device)

    def row_buffers(self) -> list[torch.Tensor]:
        out = []
        for d in (self.k, self.v):
            for i in self.specs:
                b = d[i]
                out += [b.codes, b.scales] if isinstance(b, qa.QuantBuffer) else [b]
        return out

    @staticmethod
    def _row_bytes(buf) -> int:
        if isinstance(buf, qa.QuantBuffer):
            return buf.bytes_per_token_head
        return buf.shape[-1] * buf.element_size()

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K and V stored per token per slot, over all owning layers (codes and scales)."""
        return sum(self.k[i].shape[1] * (self._row_bytes(self.k[i]) + self._row_bytes(self.v[i]))
                   for i in self.specs)

    @property
    def total_bytes(self) -> int:
        """Allocated bytes (codes, scales, padding of max_len to a multiple of 32 for quantized caches)."""
        return sum(self._buf_bytes(b) for d in (self.k, self.v) for b in d.values())

    @staticmethod
    def _buf_bytes(buf) -> int:
        if isinstance(buf, qa.QuantBuffer):
            return buf.codes.numel() * buf.codes.element_size() + buf.scales.numel() * 2
        return buf.numel() * buf.element_size()

    @staticmethod
    def _store(buf, idx: tuple, x: torch.Tensor) -> None:
        if isinstance(buf, qa.QuantBuffer):
            buf.write(idx, x)
        else:
            buf[idx] = x.to(buf.dtype)

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor) -> None:
        """Store k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] at (slots [B], positions [B, T]); position -1 = padding.
        In a tree forward the rows go to the tree's entries instead."""
        if self.tree is not None:
            positions = self.tree.index
        todo = [(buf, x) for buf, x in ((self.k[layer], k), (self.v[layer], v))
                if not (isinstance(buf, qa.QuantBuffer) and buf.store(slots, positions, x))]
        if not todo:
            return
        m = ext() if self.device.type == "cpu" else None
        if m is not None and all(isinstance(buf, torch.Tensor) for buf, _ in todo):
            for buf, x in todo:  # one C++ copy per tensor: no index tensors, no padding check round trip
                m.kv_write(buf, x.to(buf.dtype).contiguous(), slots, positions)
            return
        if bool((positions < 0).any()):
            keep = positions >= 0
            idx = (slots[:, None].expand_as(positions)[keep], slice(None), positions[keep])
            todo = [(buf, x[keep]) for buf, x in todo]
        else:
            idx = (slots[:, None], slice(None), positions)
        for buf, x in todo:
            self._store(buf, idx, x)

    def write_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor,
                     positions: torch.Tensor, window: int | None, scale: float,
                     softcap: float | None = None) -> torch.Tensor:
        """write(layer, slots, positions, k, v), then attend(layer, q, slots, positions, ...): one C++ call for
        plain float caches on CPU (the decode hot path), else the two."""
        kb, vb = self.k[layer], self.v[layer]
        m = ext() if self.dtype is not None and self.device.type == "cpu" and q.dtype == torch.float32 else None
        if m is not None and fast_attend_supported(q, kb, vb):
            t = self.tree
            tree = (t.index, t.base, t.pos, t.mask) if t is not None else (None, None, None, None)
            return m.write_attend(q, k, v, kb, vb, slots, positions, int(window) if window is not None else 0,
                                  float(scale), float(softcap) if softcap is not None else 0.0, *tree)
        self.write(layer, slots, positions, k, v)
        return self.attend(layer, q, slots, positions, window, scale, softcap)

    def attend(self, layer: int, q: torch.Tensor, slots: torch.Tensor, q_pos: torch.Tensor,
               window: int | None, scale: float, softcap: float | None = None) -> torch.Tensor:
        """Attention of q [B, T, Hq, D] against this layer's cache; the one place every reader goes through.

        Plain float K and V of one dtype: the batch-invariant kernel (kernels.attend). Any quantized side:
        quant_attention.attend_quant (fused dequantise-while-attending C++ kernel, else the chunked torch one),
        which handles the Hadamard rotation (q rotated for a rotated K, output un-rotated for a rotated V) here,
        for every reader."""
        kb, vb = self.k[layer], self.v[layer]
        if self.dtype is not None:
            return kernels.attend(q, kb, vb, slots, q_pos, window, scale, softcap, self.tree)
        if self.tree is not None:
            raise RuntimeError("tree attention over a quantized cache")
        return qa.attend_quant(q, kb, vb, slots, q_pos, window, scale, softcap)

    def view(self, layer: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid K, V of one slot: [Hkv, length, D] each. Views (no copy) for float storage; dequantised
        copies in the original (un-rotated) basis for quantized storage."""
        n = self.lengths[slot]
        out = []
        for buf in (self.k[layer], self.v[layer]):
            if isinstance(buf, qa.QuantBuffer):
                out.append(buf.dequantized(torch.tensor([slot], device=self.device), 0, n)[0])
            else:
                out.append(buf[slot, :, :n])
        return out[0], out[1]
