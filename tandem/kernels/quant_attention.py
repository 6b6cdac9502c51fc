"""Quantized KV storage formats and chunked (streaming-softmax) attention over them. Plain torch, any device.

Formats (per head row of D values, blocks of QBLOCK = 32 along D, one fp16 scale per block):
  q8_0 / int8   int8 codes, scale = absmax / 127                                    D + 2 D/32 bytes (8.5 bit)
  turbo4        Walsh-Hadamard rotation (with a fixed random sign per dim), then    D/2 + 2 D/32     (4.5 bit)
  turbo3        4/3/2-bit uniform mid-rise codes per block, step chosen per block   3D/8 + 2 D/32    (3.5 bit)
  turbo2        to minimise the block's squared error (rotated values ~ Gaussian)   D/4 + 2 D/32     (2.5 bit)

Rotated formats store x @ M with M = diag(signs) . blockdiag(H_g / sqrt(g)) orthogonal (g = largest power of two
dividing D). Readers never see the rotation: `attend_chunked` rotates q for a rotated K ((qM).(kM) = q.k) and
un-rotates the output for a rotated V (P (V M) M^T = P V). KVCache.attend is the one caller, so every reader (the
target's layers, KV-shared layers, the assistant's KV-less layers) gets it.

attend_chunked walks the keys in fixed chunks of CHUNK positions aligned to multiples of CHUNK, dequantising only
the chunk, with an online softmax (fp32): the bytes read are the quantized ones. Row invariance: chunk shapes depend
only on the cache (whole 32-float steps: KVCache pads Tmax, a shorter last chunk is zero-padded), fully masked
chunks leave a row's state exactly unchanged, and for small T (decode / verify, T <= SMALL_T) each query position is
one fixed-shape [G, D] x [D, chunk] product, so a row's result does not depend on T or on the other rows. Larger T
(prefill) does all rows in one product (fast, not row-invariant).

attend_quant is the entry point: on CPU with the C++ extension it runs the fused kernel (csrc/quant_attention.cpp:
dequantise-while-attending in L1 tiles, row-invariant for every T including prefill), else attend_chunked. quantize
likewise runs csrc/kv_quantize.cpp (same codes) on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tandem.kernels._ext import ext

QBLOCK = 32
CHUNK = 256
SMALL_T = 17  # decode and verify: SpecConfig.n_max <= 16 drafts verify in up to 17 rows
_SIGN_SEED = 0x7A11


@dataclass(frozen=True)
class Format:
    name: str
    bits: int  # 0 = plain float storage
    rotated: bool
    dtype: torch.dtype | None = None  # float formats only


FORMATS = {
    "f32": Format("f32", 0, False, torch.float32),
    "bf16": Format("bf16", 0, False, torch.bfloat16),
    "f16": Format("f16", 0, False, torch.float16),
    "q8_0": Format("q8_0", 8, False),
    "turbo4": Format("turbo4", 4, True),
    "turbo3": Format("turbo3", 3, True),
    "turbo2": Format("turbo2", 2, True),
}
ALIASES = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16", "int8": "q8_0",
           "q8": "q8_0"}
_DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


def cache_type_names() -> list[str]:
    return sorted(FORMATS) + sorted(ALIASES)


def get_format(name: str | torch.dtype) -> Format:
    """Format for a cache type name (or a torch float dtype); unknown names raise ConfigError listing the valid."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPE_NAMES:
            from tandem.errors import ConfigError
            raise ConfigError(f"unsupported KV cache dtype {name}; expected one of {list(_DTYPE_NAMES)}")
        return FORMATS[_DTYPE_NAMES[name]]
    key = ALIASES.get(str(name).lower(), str(name).lower())
    if key not in FORMATS:
        from tandem.errors import ConfigError
        raise ConfigError(f"unknown KV cache type {name!r}; expected one of {', '.join(cache_type_names())}")
    return FORMATS[key]


# -- rotation ------------------------------------------------------------------------------------------------------
_ROT: dict[tuple[int, str], torch.Tensor] = {}
_SIGNS: dict[int, torch.Tensor] = {}


def rotation_signs(d: int) -> torch.Tensor:
    """The fixed random +-1 per dim of rotation(d): float32 [d] (CPU)."""
    if d not in _SIGNS:
        g = torch.Generator().manual_seed(_SIGN_SEED)
        _SIGNS[d] = (torch.randint(0, 2, (d,), generator=g) * 2 - 1).float()
    return _SIGNS[d]


def rotation(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthogonal [d, d] float64 M = diag(signs) . blockdiag(H_g / sqrt(g)); rotate x as x @ M, undo as y @ M.T."""
    key = (d, str(device))
    if key not in _ROT:
        g = d & -d  # largest power of two dividing d
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < g:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        blocks = torch.block_diag(*([h / g ** 0.5] * (d // g)))
        _ROT[key] = (rotation_signs(d).to(torch.float64)[:, None] * blocks).to(device)
    return _ROT[key]


# -- packing -------------------------------------------------------------------------------------------------------
def _planes(bits: int) -> list[int]:
    return {8: [8], 4: [4], 3: [2, 1], 2: [2]}[bits]


def qblock(d: int) -> int:
    """Scale block along D: 32, or the whole row for small head dims (must be a multiple of 8)."""
    if d % QBLOCK == 0:
        return QBLOCK
    if d % 8 == 0 and d < QBLOCK:
        return d
    from tandem.errors import ConfigError
    raise ConfigError(f"quantized KV cache needs a head dim divisible by {QBLOCK} (or a multiple of 8 below it), "
                      f"got {d}")


def row_bytes(bits: int, d: int) -> int:
    return d * bits // 8


def _pack(c: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [..., D] (< 2**bits) -> bytes [..., D * bits / 8]. Planes: value = sum plane_i << shift_i;
    a b-bit plane splits D into 8/b contiguous parts and stores part i at bit b*i of each byte."""
    out, shift = [], 0
    for b in _planes(bits):
        p = (c >> shift) & ((1 << b) - 1)
        n = 8 // b
        parts = p.reshape(*p.shape[:-1], n, p.shape[-1] // n)
        byte = torch.zeros_like(parts[..., 0, :])
        for i in range(n):
            byte |= parts[..., i, :] << (b * i)
        out.append(byte)
        shift += b
    return torch.cat(out, -1) if len(out) > 1 else out[0]


def _unpack(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """bytes [..., D * bits / 8] (uint8) -> codes [..., D] (uint8)."""
    res, off, shift = None, 0, 0
    for b in _planes(bits):
        nb = d * b // 8
        byte = packed[..., off:off + nb]
        n = 8 // b
        mask = (1 << b) - 1
        p = torch.cat([(byte >> (b * i)) & mask for i in range(n)], -1)
        res = p << shift if res is None else res | (p << shift)
        off += nb
        shift += b
    return res


# -- quantize / dequantize -----------------------------------------------------------------------------------------
_STEP_GRID = {4: (1.0, 0.85, 0.72, 0.6, 0.5), 3: (1.0, 0.85, 0.72, 0.6, 0.5), 2: (1.0, 0.85, 0.72, 0.6, 0.5, 0.42)}
_FP16_MAX, _FP16_TINY = 65504.0, 2.0 ** -24


_EMPTY = torch.empty(0)


def quantize(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (codes uint8/int8 [..., row_bytes], scales fp16 [..., D / qblock(D)])."""
    d = x.shape[-1]
    mod = ext() if x.device.type == "cpu" else None
    if mod is not None and qblock(d):
        signs = rotation_signs(d) if fmt.rotated else _EMPTY
        c, s = mod.kv_quantize(x.reshape(-1, d).float().contiguous(), fmt.bits, signs)
        return c.reshape(*x.shape[:-1], c.shape[-1]), s.reshape(*x.shape[:-1], s.shape[-1])
    return quantize_torch(x, fmt)


def quantize_torch(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize in plain torch (any device; the reference of csrc/kv_quantize.cpp)."""
    d = x.shape[-1]
    xf = x.float()
    if fmt.rotated:
        xf = (xf.double() @ rotation(d, x.device)).float()
    blk = xf.reshape(*xf.shape[:-1], d // qblock(d), qblock(d))
    amax = blk.abs().amax(-1, keepdim=True)
    if fmt.bits == 8:
        s = (amax / 127).clamp(_FP16_TINY, _FP16_MAX).half().float()
        codes = torch.round(blk / s).clamp(-127, 127).to(torch.int8).reshape(xf.shape)
        return codes, s.squeeze(-1).half()
    half = ((1 << fmt.bits) - 1) / 2  # mid-rise: value = (c - half) * step, c in [0, 2 half]
    best_err = best_s = None
    for f in _STEP_GRID[fmt.bits]:
        s = (amax * f / half).clamp(_FP16_TINY, _FP16_MAX).half().float()
        c = torch.round(blk / s + half).clamp(0, 2 * half)
        err = ((c - half) * s - blk).square().sum(-1, keepdim=True)
        if best_err is None:
            best_err, best_s = err, s
        else:
            better = err < best_err
            best_err, best_s = torch.where(better, err, best_err), torch.where(better, s, best_s)
    c = torch.round(blk / best_s + half).clamp(0, 2 * half).to(torch.uint8).reshape(xf.shape)
    return _pack(c, fmt.bits), best_s.squeeze(-1).half()


def dequantize(codes: torch.Tensor, scales: torch.Tensor, fmt: Format, d: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of quantize, still in the rotated basis for rotated formats: [..., D] in `dtype`."""
    if fmt.bits == 8:
        c = codes.to(dtype)
    else:
        c = _unpack(codes, fmt.bits, d).to(dtype) - ((1 << fmt.bits) - 1) / 2
    c = c.reshape(*c.shape[:-1], d // qblock(d), qblock(d)) * scales.to(dtype)[..., None]
    return c.reshape(*c.shape[:-2], d)


# -- storage -------------------------------------------------------------------------------------------------------
class QuantBuffer:
    """Quantized K or V of one layer: codes [S, H, Tmax, row_bytes], scales [S, H, Tmax, D / 32] fp16."""

    def __init__(self, fmt: Format, n_slots: int, heads: int, max_len: int, d: int, device: torch.device):
        max_len = -(-max_len // 32) * 32  # whole vectors per chunk row (see attend_chunked)
        self.fmt, self.d, self.max_len = fmt, d, max_len
        cdt = torch.int8 if fmt.bits == 8 else torch.uint8
        self.codes = torch.zeros(n_slots, heads, max_len, row_bytes(fmt.bits, d), dtype=cdt, device=device)
        self.scales = torch.zeros(n_slots, heads, max_len, d // qblock(d), dtype=torch.float16, device=device)

    @property
    def rotated(self) -> bool:
        return self.fmt.rotated

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.codes.shape[:3], self.d)

    @property
    def bytes_per_token_head(self) -> int:
        return self.codes.shape[-1] * self.codes.element_size() + self.scales.shape[-1] * 2

    def write(self, idx: tuple, x: torch.Tensor) -> None:
        c, s = quantize(x, self.fmt)
        self.codes[idx] = c
        self.scales[idx] = s

    def store(self, slots: torch.Tensor, positions: torch.Tensor, x: torch.Tensor) -> bool:
        """x [B, T, H, D] at (slots [B], positions [B, T], -1 = padding) in one C++ call; False: not done (no
        extension / not CPU), use write()."""
        mod = ext() if self.codes.device.type == "cpu" else None
        if mod is None:
            return False
        signs = rotation_signs(self.d) if self.rotated else _EMPTY
        mod.kv_store(x.float().contiguous(), self.fmt.bits, signs, self.codes, self.scales,
                     slots.to(torch.int64).contiguous(), positions.to(torch.int64).expand(x.shape[:2]).contiguous())
        return True

    def chunk(self, slots: torch.Tensor, j0: int, j1: int, dtype: torch.dtype) -> torch.Tensor:
        """Dequantised (still rotated) entries j0..j1 of the given slots: [B, H, j1 - j0, D]."""
        c = self.codes[:, :, j0:j1].index_select(0, slots)  # slice first: copy only the chunk
        s = self.scales[:, :, j0:j1].index_select(0, slots)
        return dequantize(c, s, self.fmt, self.d, dtype)

    def dequantized(self, slots: torch.Tensor, j0: int, j1: int, dtype=torch.float32) -> torch.Tensor:
        """Entries j0..j1 back in the original basis (rotation undone)."""
        x = self.chunk(slots, j0, j1, torch.float64 if self.rotated else dtype)
        if self.rotated:
            x = x @ rotation(self.d, x.device).T
        return x.to(dtype)


def _chunk_of(buf, slots: torch.Tensor, j0: int, j1: int, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(buf, QuantBuffer):
        return buf.chunk(slots, j0, j1, dtype)
    return buf[:, :, j0:j1].index_select(0, slots).to(dtype)


# -- attention -----------------------------------------------------------------------------------------------------
def attend_chunked(q: torch.Tensor, k_buf, v_buf, slots: torch.Tensor, q_pos: torch.Tensor, window: int | None,
                   scale: float, softcap: float | None = None, chunk: int = CHUNK) -> torch.Tensor:
    """attend_reference's contract over float tensors or QuantBuffers (K and V independently), streaming softmax.

    q [B, T, Hq, D]; k_buf/v_buf [S, Hkv, Tmax, D] tensor or QuantBuffer; returns [B, T, Hq, Dv] in q.dtype.
    """
    B, T, Hq, D = q.shape
    S, Hkv, Tmax, Dv = (v_buf.shape if isinstance(v_buf, QuantBuffer) else tuple(v_buf.shape))
    G = Hq // Hkv
    pos = q_pos.clamp(min=0)
    hi = int(pos.max().item()) + 1
    lo = 0 if window is None else max(0, int(pos.min().item()) - window + 1)
    # small T: one fixed-shape [G, D] x [D, chunk] product per query position (row-invariant); else all at once
    steps = T if T <= SMALL_T else 1
    R = G if T <= SMALL_T else T * G
    # rows ordered (t, g) inside each kv head: [B, Hkv, T * G, D]
    qf = q.float().reshape(B, T, Hkv, G, D).permute(0, 2, 1, 3, 4).reshape(B, Hkv, T * G, D)
    if isinstance(k_buf, QuantBuffer) and k_buf.rotated:
        qf = (qf.double() @ rotation(D, q.device)).float()
    qs = [qf[:, :, i * R:(i + 1) * R] for i in range(steps)]
    posr = pos[:, None, :, None].expand(B, 1, T, G).reshape(B, 1, T * G, 1)
    ps = [posr[:, :, i * R:(i + 1) * R] for i in range(steps)]
    m = [torch.full((B, Hkv, R, 1), float("-inf"), device=q.device) for _ in range(steps)]
    lsum = [torch.zeros(B, Hkv, R, 1, device=q.device) for _ in range(steps)]
    o = [torch.zeros(B, Hkv, R, Dv, device=q.device) for _ in range(steps)]
    for j0 in range((lo // chunk) * chunk, hi, chunk):
        j1 = min(j0 + chunk, Tmax)
        kt = _chunk_of(k_buf, slots, j0, j1, torch.float32).transpose(-1, -2)
        vc = _chunk_of(v_buf, slots, j0, j1, torch.float32)
        pad = -(j1 - j0) % 32  # an unpadded float cache: zero keys past Tmax keep every chunk whole 32-float steps
        if pad:
            kt, vc = torch.nn.functional.pad(kt, (0, pad)), torch.nn.functional.pad(vc, (0, 0, 0, pad))
        j = torch.arange(j0, j1 + pad, device=q.device)
        for i in range(steps):
            s = torch.matmul(qs[i], kt) * scale
            if softcap is not None:
                s = torch.tanh(s / softcap) * softcap
            allowed = j <= ps[i]
            if window is not None:
                allowed = allowed & (j > ps[i] - window)
            s = s.masked_fill(~allowed, float("-inf"))
            m_new = torch.maximum(m[i], s.amax(-1, keepdim=True))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe)
            alpha = torch.exp(m[i] - m_safe)
            lsum[i] = lsum[i] * alpha + p.sum(-1, keepdim=True)
            o[i] = o[i] * alpha + torch.matmul(p, vc)
            m[i] = m_new
    out = torch.cat([oi / li for oi, li in zip(o, lsum)], 2)
    if isinstance(v_buf, QuantBuffer) and v_buf.rotated:
        out = (out.double() @ rotation(Dv, q.device).T).float()
    return out.reshape(B, Hkv, T, G, Dv).permute(0, 2, 1, 3, 4).reshape(B, T, Hq, Dv).to(q.dtype)


_FLOAT_KINDS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 15}  # csrc/quant_attention.cpp


def _side(buf) -> tuple | None:
    """(data, scales, kind, signs) of K or V for the fused kernel; None when it cannot read this buffer."""
    if isinstance(buf, QuantBuffer):
        if buf.codes.device.type != "cpu":
            return None
        return buf.codes, buf.scales, buf.fmt.bits, (rotation_signs(buf.d) if buf.rotated else _EMPTY)
    if buf.device.type != "cpu" or buf.dtype not in _FLOAT_KINDS or not buf.is_contiguous():
        return None
    return buf, _EMPTY, _FLOAT_KINDS[buf.dtype], _EMPTY


def attend_quant(q: torch.Tensor, k_buf, v_buf, slots: torch.Tensor, q_pos: torch.Tensor, window: int | None,
                 scale: float, softcap: float | None = None) -> torch.Tensor:
    """attend_chunked's contract; the fused row-invariant C++ kernel on CPU when the extension is built."""
    mod = ext() if q.device.type == "cpu" else None
    ks = _side(k_buf) if mod is not None else None
    vs = _side(v_buf) if ks is not None else None
    if vs is None:
        return attend_chunked(q, k_buf, v_buf, slots, q_pos, window, scale, softcap)
    qf = q if (q.dtype == torch.float32 and q.is_contiguous()) else q.float().contiguous()
    out = mod.attend_quant(qf, *ks, *vs, int(v_buf.shape[-1]), slots.to(torch.int64), q_pos.to(torch.int64),
                           int(window) if window is not None else 0, float(scale),
                           float(softcap) if softcap is not None else 0.0)
    return out if q.dtype == torch.float32 else out.to(q.dtype)
