"""Compute kernels behind one small API. The reference paths are plain torch; fast paths may replace them.

attend(): every attention read goes through here (via the KV cache), so cache formats and kernels meet in one place.
  On CPU with fp32/bf16 caches it runs the batch-invariant C++ kernel (tandem/kernels/attention.py), elsewhere
  attend_quant. Set TANDEM_NO_EXT=1 to force the torch paths everywhere (row-invariant for decode/verify too).
attend_quant(): the same contract over quantized KV buffers (tandem/kernels/quant_attention.py): the fused
  dequantise-while-attending C++ kernel on CPU, else the chunked torch one.
prepare(model, weight_format): swaps every nn.Linear for a batch-invariant PackedLinear (tandem/kernels/linear.py),
  the tied input embedding for a PackedEmbedding that reads rows from the packed LM head, and lets modules that hold
  linear weights in another shape (MoE experts and routers) pack them through their `pack_weights(fmt)`.
exactness(model, device): whether the running configuration is row-invariant (spec == plain bitwise), and why.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tandem.kernels._ext import ext, has_vnni, unavailable_reason
from tandem.kernels.attention import attend_cpu
from tandem.kernels.hugepages import to_huge_pages
from tandem.kernels.linear import FORMATS, PackedEmbedding, PackedLinear, base_format, check_format
from tandem.kernels.quant_attention import attend_quant
from tandem.kernels.reference import attend_reference

attend = attend_cpu


def prepare(model: nn.Module, weight_format: str = "bf16") -> nn.Module:
    """Swap every nn.Linear of `model` for a PackedLinear in `weight_format` in place (module names kept).

    A tied input embedding (nn.Embedding sharing its weight with a Linear) becomes a PackedEmbedding reading
    dequantised rows from that packed Linear, so no full-precision copy of the table stays referenced.
    Modules with a `pack_weights(fmt)` method (MoE experts [E, 2I, D], routers) then pack their own weights.
    weight_format="fp32" keeps the original fp32 weights, run in fixed-shape row blocks (row-invariant too).
    weight_format="native": a linear whose weight came from GGUF blocks the VNNI kernels hold as stored
    (`model.gguf_blocks`, verified against the loaded values) keeps them; every other weight gets base_format.
    Sets `model.kernel_format` (what exactness() reads). Packed weights go to huge pages (kernels.hugepages).
    """
    check_format(weight_format)
    blocks = _native_blocks(model) if weight_format == "native" else {}
    packed: dict[int, PackedLinear] = {}  # id(weight Parameter) -> PackedLinear (tied weights packed once)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                key = id(child.weight)
                if key not in packed:
                    packed[key] = to_huge_pages(_pack(child, weight_format, blocks.get(key)))  # one at a time
                setattr(parent, name, packed[key])
    model.__dict__.pop("gguf_blocks", None)  # the raw rows are packed (or not wanted): let the file's pages go
    if weight_format != "fp32":
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Embedding) and id(child.weight) in packed:
                    setattr(parent, name, PackedEmbedding(packed[id(child.weight)]))
    for m in list(model.modules()):
        if callable(getattr(m, "pack_weights", None)):
            m.pack_weights(base_format(weight_format))
    model.kernel_format = weight_format
    return to_huge_pages(model)  # what pack_weights made


def _native_blocks(model: nn.Module) -> dict[int, tuple[str, object]]:
    """id(weight Parameter) -> (GGUF type, raw rows) for the weights loaded from blocks a VNNI format holds."""
    raw = getattr(model, "gguf_blocks", None) or {}
    if not (has_vnni() and raw):
        return {}
    return {id(p): raw[n] for n, p in model.named_parameters(remove_duplicate=False) if n in raw}


def _pack(lin: nn.Linear, fmt: str, block) -> PackedLinear:
    if block is not None and lin.weight.device.type == "cpu":
        pl = PackedLinear.from_gguf(block[0], block[1], lin.in_features, expect=lin.weight, bias=lin.bias)
        if pl is not None:
            return pl
    return PackedLinear.from_linear(lin, fmt)


def formats_of(model: nn.Module) -> dict[str, int]:
    """How many packed linears of `model` hold each format."""
    out: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            out[m.fmt] = out.get(m.fmt, 0) + 1
    return out


def argmax(x: torch.Tensor) -> torch.Tensor:
    """x.argmax(-1) (the first index of the maximum) for x [..., V]: the C++ row kernel for CPU fp32 (each row split
    over the threads), torch's elsewhere and for rows holding a NaN."""
    m = ext() if x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() else None
    if m is None:
        return x.argmax(-1)
    idx = m.argmax_rows(x.reshape(-1, x.shape[-1]).contiguous())
    return x.argmax(-1) if int(idx.min()) < 0 else idx.view(x.shape[:-1])


def exactness(model: nn.Module, device: torch.device | str) -> tuple[bool, str]:
    """(exact, why): whether every row of `model` is computed independently of the other rows on `device`, so
    speculative output equals plain decoding bitwise at T=0 (else the target's distribution only)."""
    device = torch.device(device)
    if device.type != "cpu":
        return False, (f"device {device.type}: row invariance is verified for the CPU kernels only "
                       f"(GPU GEMM/attention may pick kernels by batch shape); distribution-exact only")
    fmt = getattr(model, "kernel_format", None)
    if fmt is None:
        return False, "weights not prepared (kernels.prepare): plain torch linears vary with the row count"
    missing = unavailable_reason()
    path = (f"C++ kernels, {fmt} weights" if missing is None
            else f"torch fixed-shape reference paths ({fmt} weights; C++ kernels unavailable: {missing})")
    return True, f"row-invariant: {path}"


__all__ = ["argmax", "attend", "attend_quant", "attend_reference", "exactness", "prepare", "PackedLinear", "PackedEmbedding", "FORMATS"]
