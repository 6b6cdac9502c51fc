"""Batch-invariant CPU attention over the position-indexed KV cache (csrc/attention.cpp).

Same semantics as attend_reference (query at position p sees entries p - window < j <= p; position -1 = padding
row, which sees entry 0 only), but each query row is computed independently with a fixed instruction sequence:
its output depends only on its own q, its position and the cache entries it may see, never on T, B or the
other rows. K/V are read in place from the cache buffers by slot. fp32 and bf16 caches; fp32 softmax.
Anything else (f16 caches, no extension, other devices) goes to quant_attention.attend_quant, whose fused kernel
reads f16 as well and whose torch path (attend_chunked) is row-invariant for decode and verify (T <= SMALL_T):
never to attend_reference, whose key length follows the batch.
"""

from __future__ import annotations

import torch

from tandem.kernels._ext import ext
from tandem.kernels.quant_attention import attend_quant

_FAST_DTYPES = (torch.float32, torch.bfloat16)


def fast_attend_supported(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and k_buf.device.type == "cpu" and k_buf.dtype in _FAST_DTYPES
            and v_buf.dtype == k_buf.dtype and q.dtype in _FAST_DTYPES and k_buf.is_contiguous()
            and v_buf.is_contiguous() and ext() is not None)


def attend_cpu(q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, slots: torch.Tensor,
               q_pos: torch.Tensor, window: int | None, scale: float,
               softcap: float | None = None, tree=None) -> torch.Tensor:
    """attend_reference's contract, row-invariant: the fp32/bf16 kernel on CPU, attend_quant otherwise. tree: the
    forward's tandem.kvcache.cache.TreeRows (each row sees the entries before the tree region and its ancestors in
    it; only the C++ kernel takes it)."""
    if not fast_attend_supported(q, k_buf, v_buf):
        if tree is not None:
            raise RuntimeError("tree attention needs the C++ kernel over an fp32/bf16 cache")
        return attend_quant(q, k_buf, v_buf, slots, q_pos, window, scale, softcap)
    qf = q if (q.dtype == torch.float32 and q.is_contiguous()) else q.float().contiguous()
    t = (tree.base, tree.pos, tree.mask) if tree is not None else (None, None, None)
    out = ext().attend_fast(qf, k_buf, v_buf, slots.to(torch.int64), q_pos.to(torch.int64),
                            int(window) if window is not None else 0, float(scale),
                            float(softcap) if softcap is not None else 0.0, *t)
    return out if q.dtype == torch.float32 else out.to(q.dtype)
