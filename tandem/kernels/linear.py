"""Batch-invariant packed linears for small-M decode/verify on CPU.

PackedLinear computes y = x @ W^T with fp32 accumulation where every output element is one fp32 FMA chain over
k = 0..K-1 (see csrc/small_gemm.cpp): a row's result is bitwise the same whether it is computed alone or among
any number of rows, so speculative verification (T = k+1 rows) reproduces plain decode (T = 1) exactly. The same
kernel serves every M (prefill included), so prefill is invariant too; it is register-tiled (6x64) and
multithreaded over 64-column panels and 48-row blocks, never over K.

Formats (by name):
  fp32 : the original fp32 weight through stock BLAS, in fixed [ROW_BLOCK, K] calls (`fixed_rows`): every row
         meets the same call shape, so it is row-invariant on any backend whose GEMM is deterministic per shape.
  bf16 : weights rounded to bf16 (2 B/weight), activations stay fp32.
  q8_0 : GGUF Q8_0 blocks of 32 along K (int8 + fp16 scale, 1.0625 B/weight; bit-identical values to llama.cpp's
         Q8_0 quantiser / a Q8_0 GGUF tensor), dequantised exactly to fp32 in registers; activations stay fp32.
  q8_0x8 : the same Q8_0 weight values, stored for int8 x int8 dot products (AVX-512 VNNI, csrc/vnni_gemm.cpp):
         each activation row is quantized per 32-block as llama.cpp does for its Q8_0 dot products
         (quantize_act_q8), so a row's result still depends on that row only; ~6x fewer instructions per weight.
  q4_0x8, q4_1x8, q5_0x8, q5_1x8, q2_kx8 .. q6_kx8, iq4_nlx8, iq4_xsx8 : a GGUF tensor's own integers and
         scales, no requantisation (tandem/kernels/kquants.py), the same int8 activation rows and kernel: about the
         file's bytes per weight. A GGUF BF16 / F16 / F32 tensor is held as bf16 / f16 / fp32 (its values exactly;
         f16: fp16 weights in the bf16 kernel's fp32 FMA chains).
  native (prepare only): each GGUF-loaded linear in its file's type where a VNNI format holds it, else q8_0x8.
Without the compiled extension (or off CPU) the packed formats take the same fixed-shape torch path.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.kernels import kquants
from tandem.kernels.kquants import NB, panelize as _panelize, unpanelize as _unpanelize
from tandem.kernels._ext import ext, has_vnni

FORMATS = ("fp32", "bf16", "q8_0", "q8_0x8", "native")  # what prepare() and the CLI take
KQUANT_FORMATS = tuple(f for f in kquants.VNNI if f != "q8_0x8")  # a GGUF type's own blocks (kquants)
VNNI_FORMATS = ("q8_0x8",) + KQUANT_FORMATS
LINEAR_FORMATS = ("fp32", "bf16", "f16", "q8_0") + VNNI_FORMATS  # what a PackedLinear holds
QBLOCK = 32   # Q8_0 block along K
ROW_BLOCK = 8  # rows per torch call on the reference path (fixed_rows): decode pays ~3x a GEMV, not ~10x


def fixed_rows(x2: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """F.linear(x2 [M, K], w [N, K]) -> [M, N], computed in zero-padded [ROW_BLOCK, K] blocks, each a fresh
    buffer: every row meets the same GEMM shape and alignment, so its result never depends on M."""
    M, K = x2.shape
    outs = []
    for i in range(0, M, ROW_BLOCK):
        n = min(ROW_BLOCK, M - i)
        blk = x2.new_zeros(ROW_BLOCK, K)
        blk[:n] = x2[i:i + n]
        outs.append(F.linear(blk, w)[:n])
    return torch.cat(outs) if outs else x2.new_zeros(0, w.shape[0])


def check_format(fmt: str, valid: tuple[str, ...] = FORMATS) -> str:
    if fmt not in valid:
        raise ValueError(f"unknown weight format {fmt!r}; valid formats: {', '.join(valid)}")
    return fmt


def base_format(fmt: str) -> str:
    """The format a weight without GGUF blocks of its own gets under `fmt` (native: q8_0x8 where the CPU has VNNI,
    else q8_0)."""
    return ("q8_0x8" if has_vnni() else "q8_0") if fmt == "native" else fmt


def _q8_blocks(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 [..., 32] blocks -> (q as fp32 integers in [-127, 127], d fp32 [...]) as llama.cpp's
    quantize_row_q8_0_ref: d = amax/127, q = round(x / d) half away from zero (also csrc/q8_vnni.cpp's rows)."""
    d = b.abs().amax(-1) / 127.0
    idv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    x = b * idv[..., None]
    a = x.abs()
    t = torch.floor(a)  # roundf: a - t is exact, so ties are seen exactly (floor(a + 0.5) rounds 0.49999997 up)
    return (torch.sign(x) * (t + (a - t >= 0.5).float())).clamp(-127, 127), d


def quantize_q8_0(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, K] float -> (q int8 [N, K], d fp16 [N, K/32]), GGUF Q8_0 blocks (d stored as fp16)."""
    N, K = w.shape
    if K % QBLOCK:
        raise ValueError(f"q8_0 needs in_features % {QBLOCK} == 0, got {K}")
    out_q = torch.empty(N, K, dtype=torch.int8)
    out_d = torch.empty(N, K // QBLOCK, dtype=torch.float16)
    for n0 in range(0, N, 8192):  # chunked: no full fp32 temporaries of huge tables
        q, d = _q8_blocks(w[n0:n0 + 8192].float().reshape(-1, K // QBLOCK, QBLOCK))
        out_q[n0:n0 + 8192] = q.to(torch.int8).reshape(-1, K)
        out_d[n0:n0 + 8192] = d.to(torch.float16)
    return out_q, out_d


def quantize_act_q8(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Activation rows [M, K] -> (q int8 [M, K], d fp32 [M, K/32] holding fp16 values, 128 * sum(q) int32
    [M, K/32]). d is rounded to fp16 as llama.cpp stores it, which also makes d_w * d_x exact in fp32."""
    M, K = x2.shape
    q, d = _q8_blocks(x2.float().reshape(M, K // QBLOCK, QBLOCK))
    return q.to(torch.int8).reshape(M, K), d.half().float(), (128 * q.sum(-1)).to(torch.int32)


def _pack_q8x8(q: torch.Tensor) -> torch.Tensor:
    """int8 [N, K] -> uint8 [ceil(N/64), K/4, 64, 4]: q + 128 (the sign bit flipped; padded rows hold q = 0), 4
    consecutive k of one column per 32-bit lane (the dpbusd operand layout)."""
    P, K = (q.shape[0] + NB - 1) // NB, q.shape[1]
    wp = _panelize(q).view(P, K // 4, 4, NB).transpose(2, 3).contiguous()  # [P, K/4, 64, 4]
    return wp.view(torch.uint8) ^ 0x80


def _unpack_q8x8(w8: torch.Tensor, N: int) -> torch.Tensor:
    P, K4 = w8.shape[:2]
    return (w8 ^ 0x80).view(torch.int8).permute(0, 2, 1, 3).reshape(P * NB, K4 * 4)[:N]


class PackedLinear(nn.Module):
    """Drop-in for a bias-free or biased nn.Linear with weights held in a packed format (see module doc)."""

    def __init__(self, in_features: int, out_features: int, fmt: str, tensors: dict[str, torch.Tensor],
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.fmt = in_features, out_features, check_format(fmt, LINEAR_FORMATS)
        for k, v in tensors.items():
            if isinstance(v, nn.Parameter):  # fp32: the original Parameter itself (keeps weight tying intact)
                self.register_parameter(k, v)
            else:
                self.register_buffer(k, v, persistent=True)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str = "bf16") -> "PackedLinear":
        fmt = base_format(check_format(fmt))
        if fmt == "fp32" and lin.weight.dtype == torch.float32:
            return cls(lin.in_features, lin.out_features, "fp32", {"weight": lin.weight}, lin.bias)
        return cls.from_weight(lin.weight.detach(), fmt, lin.bias)

    @classmethod
    def from_weight(cls, w: torch.Tensor, fmt: str = "bf16", bias: torch.Tensor | None = None) -> "PackedLinear":
        fmt = base_format(check_format(fmt))
        N, K = w.shape
        w = w.detach().cpu()
        if fmt == "fp32":
            t = {"weight": w.float().contiguous()}
        elif fmt == "bf16":
            t = {"w_bf16": _panelize(w.to(torch.bfloat16))}
        else:
            q, d = quantize_q8_0(w)
            t = cls._q8_tensors(q, d, fmt)
        return cls(K, N, fmt, t, bias)

    @classmethod
    def from_q8_0(cls, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None,
                  fmt: str = "q8_0") -> "PackedLinear":
        """From Q8_0 values as stored in GGUF: q int8 [N, K], d fp16 [N, K/32] (no requantisation), held as
        fmt q8_0 or q8_0x8."""
        N, K = q.shape
        return cls(K, N, fmt, cls._q8_tensors(q.to(torch.int8), d.to(torch.float16), fmt), bias)

    @classmethod
    def from_gguf(cls, qtype: str, raw, K: int, expect: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> "PackedLinear | None":
        """A GGUF tensor's raw rows (uint8 [N, row bytes]) of type `qtype` (kquants.GGUF_TYPES) kept as stored;
        None when `expect` (the loaded fp32 weight) differs from the blocks' values (a fix-up changed them)."""
        fmt = kquants.GGUF_TYPES[qtype]
        f = kquants.parse_gguf(qtype, raw, K)
        if "w" in f:  # BF16 / F16 / F32: the values themselves, in the float GEMMs
            if expect is not None and not torch.equal(f["w"].float(), expect.detach().float().cpu()):
                return None
            t = {"weight": f["w"].clone()} if fmt == "fp32" else {f"w_{fmt}": _panelize(f["w"])}
            return cls(K, f["w"].shape[0], fmt, t, bias)
        for n0 in range(0, raw.shape[0], 16384):  # in row chunks: no full fp32 copy of a large table
            chunk = {k: v[n0:n0 + 16384] for k, v in f.items()}
            if expect is not None and not torch.equal(kquants.dequantize(fmt, chunk),
                                                      expect[n0:n0 + 16384].detach().float().cpu()):
                return None
        if fmt == "q8_0x8":
            return cls.from_q8_0((f["u"] ^ 0x80).view(torch.int8), f["d"], bias, fmt)
        return cls(K, f["u"].shape[0], fmt, {f"vnni{i}": t for i, t in enumerate(kquants.pack(fmt, f))}, bias)

    def _streams(self) -> list[torch.Tensor]:
        """The VNNI kernel's operands, cached (a per-call attribute walk costs ~4 us; _apply drops the cache)."""
        st = self.__dict__.get("_st")
        if st is None:
            st = [self.q8x8, self.d16] if self.fmt == "q8_0x8" else \
                [v for k, v in self._buffers.items() if k.startswith("vnni")]  # registration order
            self.__dict__["_st"] = st
        return st

    def _apply(self, fn, *args, **kwargs):
        self.__dict__.pop("_st", None)
        return super()._apply(fn, *args, **kwargs)

    def _fields(self) -> dict[str, torch.Tensor]:
        """Per-row integers and scales of a VNNI-format linear (tandem.kernels.kquants)."""
        if self.fmt == "q8_0x8":
            q, d = self._q8_values()
            return {"u": q.view(torch.uint8) ^ 0x80, "d": d}  # q + 128
        return kquants.unpack(self.fmt, self._streams(), self.out_features)

    @staticmethod
    def _q8_tensors(q, d, fmt):
        if fmt == "q8_0x8":
            return {"q8x8": _pack_q8x8(q), "d16": _panelize(d)}
        return {"q8": _panelize(q), "d16": _panelize(d)}

    def _q8_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q int8 [N, K], d fp16 [N, K/32]) of a q8_0 / q8_0x8 linear."""
        q = _unpack_q8x8(self.q8x8, self.out_features) if self.fmt == "q8_0x8" else \
            _unpanelize(self.q8, self.out_features)
        return q, _unpanelize(self.d16, self.out_features)

    # ---------------------------------------------------------------------------------------------------------
    @property
    def weight_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantized_weight(self) -> torch.Tensor:
        """The exact fp32 values the kernel multiplies by, [N, K] (tests, fallback)."""
        if self.fmt == "fp32":
            return self.weight
        if self.fmt in ("bf16", "f16"):
            return _unpanelize(getattr(self, f"w_{self.fmt}"), self.out_features).float()
        if self.fmt in KQUANT_FORMATS:
            return kquants.dequantize(self.fmt, self._fields())
        q, d = self._q8_values()
        return (q.float().reshape(self.out_features, -1, QBLOCK) * d.float()[..., None]).reshape(self.out_features, -1)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Rows `idx` (any shape, int) of the dequantised weight as fp32 [*idx.shape, K] (tied embedding lookup)."""
        flat = idx.reshape(-1).to(torch.int64).cpu().contiguous()
        if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < self.out_features):
            raise IndexError(f"row ids {flat.min().item()}..{flat.max().item()} outside the table "
                             f"[0, {self.out_features})")
        m = ext()
        if self.fmt == "fp32":
            out = self.weight.index_select(0, flat)
        elif self.fmt == "f16":
            out = self.w_f16[flat // NB, :, flat % NB].float()
        elif self.fmt in KQUANT_FORMATS:  # not an embedding format: the torch path is enough
            f = {k: v.index_select(0, flat) for k, v in self._fields().items()}
            out = kquants.dequantize(self.fmt, f)
        elif m is not None and self.fmt == "bf16":
            out = m.rows_bf16(self.w_bf16, flat, self.in_features)
        elif m is not None and self.fmt == "q8_0":
            out = m.rows_q8_0(self.q8, self.d16, flat, self.in_features)
        elif m is not None:
            out = m.rows_q8_0x8(self.q8x8, self.d16, flat, self.in_features)
        else:
            P = flat // NB
            C = flat % NB
            if self.fmt == "bf16":
                out = self.w_bf16[P, :, C].float()
            else:
                q = self.q8[P, :, C].float() if self.fmt == "q8_0" else \
                    (self.q8x8[P, :, C] ^ 0x80).view(torch.int8).reshape(len(flat), -1).float()
                d = self.d16[P, :, C].float()
                out = (q.reshape(len(flat), -1, QBLOCK) * d[..., None]).reshape(len(flat), -1)
        return out.reshape(*idx.shape, self.in_features)

    def reordered(self, order: torch.Tensor) -> "PackedLinear":
        """A copy whose output row i is this one's row order[i] (same packed values, no requantisation)."""
        order = order.to(torch.int64).cpu()
        if self.fmt == "fp32":
            return PackedLinear(self.in_features, len(order), "fp32", {"weight": self.weight.detach()[order]})
        if self.fmt in ("bf16", "f16"):
            w = getattr(self, f"w_{self.fmt}")
            return PackedLinear(self.in_features, len(order), self.fmt,
                                {f"w_{self.fmt}": _panelize(_unpanelize(w, self.out_features)[order])})
        if self.fmt in KQUANT_FORMATS:
            f = {k: v[order] for k, v in self._fields().items()}
            return PackedLinear(self.in_features, len(order), self.fmt,
                                {f"vnni{i}": t for i, t in enumerate(kquants.pack(self.fmt, f))})
        q, d = self._q8_values()
        return PackedLinear.from_q8_0(q[order], d[order], fmt=self.fmt)

    def panels(self, x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor | None:
        """x [M, K] -> y [M, S*64]: output rows of the 64-row panels `panels` [S] only, each value bitwise the
        full forward's (sparse heads). None when no kernel serves this format/device (caller falls back)."""
        m = ext()
        if m is None or self.fmt in ("fp32", "f16") or x.device.type != "cpu" or self.bias is not None:
            return None
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        idx = panels.reshape(-1).to(torch.int64).contiguous()
        if self.fmt == "bf16":
            return m.gemm_bf16_panels(x2, self.w_bf16, idx)
        if self.fmt in VNNI_FORMATS:
            P = (self.out_features + NB - 1) // NB
            return m.gemm_vnni_panels(x2, self.fmt, self._streams(), P, idx) if has_vnni() else None
        return m.gemm_q8_0_panels(x2, self.q8, self.d16, idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.float().contiguous()
        m = ext() if x2.device.type == "cpu" else None
        if m is not None and self.fmt in VNNI_FORMATS and has_vnni():  # the decode hot path, tested first
            y = m.gemm_vnni(x2, self.fmt, self._streams(), self.out_features)
        elif self.fmt == "fp32":
            y = fixed_rows(x2, self.weight.float())
        elif m is not None and self.fmt == "bf16":
            y = m.gemm_bf16(x2, self.w_bf16, self.out_features)
        elif m is not None and self.fmt == "f16":
            y = m.gemm_f16(x2, self.w_f16, self.out_features)
        elif m is not None and self.fmt == "q8_0":
            y = m.gemm_q8_0(x2, self.q8, self.d16, self.out_features)
        elif self.fmt in VNNI_FORMATS:
            y = self._reference_vnni(x2)
        else:
            y = self._fallback(x2)
        if self.bias is not None:
            y = y + self.bias
        y = y.reshape(*lead, self.out_features)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _fallback(self, x2: torch.Tensor) -> torch.Tensor:
        # fixed-shape row blocks (row-invariant); weights dequantised in chunks of panels to bound memory
        outs = []
        for p0 in range(0, self.out_features, 16384):
            p1 = min(self.out_features, p0 + 16384)
            outs.append(fixed_rows(x2, self._dequant_range(p0, p1).to(x2.device)))
        return torch.cat(outs, dim=1)

    def _dequant_range(self, n0: int, n1: int) -> torch.Tensor:
        return self.rows(torch.arange(n0, n1))

    def _reference_vnni(self, x2: torch.Tensor) -> torch.Tensor:
        """A VNNI format in torch, as csrc/vnni_gemm.cpp computes it (tandem.kernels.kquants.reference)."""
        xq, dx, _ = quantize_act_q8(x2.cpu())
        return kquants.reference(self.fmt, self._fields(), xq, dx).to(x2.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def linears(x: torch.Tensor, *lins: nn.Module) -> list[torch.Tensor]:
    """[lin(x) for lin in lins] (the same input: q/k/v, gate/up), in one kernel call when every lin is a VNNI-format
    PackedLinear on CPU: one row quantization and one parallel loop, each output bitwise its own forward's."""
    m = ext() if x.device.type == "cpu" and len(lins) > 1 else None
    if m is None or not has_vnni() or not all(isinstance(lin, PackedLinear) and lin.fmt in VNNI_FORMATS
                                              for lin in lins):
        return [lin(x) for lin in lins]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    ys = m.gemm_vnni_multi(x2, [lin.fmt for lin in lins], [lin._streams() for lin in lins],
                           [lin.out_features for lin in lins])
    out = []
    for lin, y in zip(lins, ys):
        y = (y if lin.bias is None else y + lin.bias).reshape(*lead, lin.out_features)
        out.append(y if x.dtype == torch.float32 else y.to(x.dtype))
    return out


class PackedEmbedding(nn.Module):
    """Embedding that reads its rows from a (tied) PackedLinear: no separate full-precision table in memory.

    `.weight` is a tiny descriptor with the dtype (fp32: rows come back dequantised to fp32) and device of the
    table, which is all Model.embed reads from it.
    """

    class _WeightInfo:
        def __init__(self, num, dim):
            self.dtype, self.device, self.shape = torch.float32, torch.device("cpu"), torch.Size([num, dim])

    def __init__(self, linear: PackedLinear):
        super().__init__()
        self.linear = linear  # registered submodule: shares buffers with the LM head (same object)
        self.num_embeddings, self.embedding_dim = linear.out_features, linear.in_features

    @property
    def weight(self):
        return PackedEmbedding._WeightInfo(self.num_embeddings, self.embedding_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear.rows(tokens)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to a {self.linear.fmt} PackedLinear"
