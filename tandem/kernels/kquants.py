"""GGUF weight blocks kept as stored for the VNNI kernels (csrc/vnni_gemm.cpp, vnni_formats.h): parse, pack, unpack,
reference.

A weight in one of these formats holds the GGUF type's own integers and scales (no requantisation), so it reads
about as few bytes per token as the file (Q4_0 0.56 B/weight, Q4_K 0.56, Q6_K 0.82 against q8_0's 1.06).
  fields  per-row values: u uint8 [N, K] (unsigned, see the kernel's table; iq4: the index into IQ4_VALUES) and
          the type's scales
  streams the panel layouts the kernel reads (STREAMS, csrc/vnni_gemm.cpp's header), one tensor each
Values: w = a * (u - off) - b per scale group of SG k (a, b fp32 exactly as gguf-py dequantizes them).
SUPPORTED_TYPES: every GGUF weight type a PackedLinear holds as stored (BF16 / F16 / F32 in the float formats).
"""

from __future__ import annotations

import numpy as np
import torch

NB = 64  # columns per panel (must match csrc/small_gemm.cpp, csrc/vnni_gemm.cpp)
# GGUF type -> PackedLinear format holding its own values (VNNI formats: int8 dots; bf16/fp32: float GEMMs)
GGUF_TYPES = {"Q8_0": "q8_0x8", "Q5_0": "q5_0x8", "Q4_K": "q4_kx8", "Q6_K": "q6_kx8", "Q4_0": "q4_0x8",
              "Q4_1": "q4_1x8", "Q5_1": "q5_1x8", "Q5_K": "q5_kx8", "IQ4_NL": "iq4_nlx8", "IQ4_XS": "iq4_xsx8",
              "Q3_K": "q3_kx8", "Q2_K": "q2_kx8", "BF16": "bf16", "F16": "f16", "F32": "fp32"}
SUPPORTED_TYPES = tuple(GGUF_TYPES)
FLOAT_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
VNNI = tuple(f for f in GGUF_TYPES.values() if f.endswith("x8"))
# per format: offset off and scale group SG of w = a * (u - off) - b; K multiple; b (a min) per group or not
OFFSET = {"q8_0x8": 128, "q5_0x8": 16, "q4_kx8": 0, "q6_kx8": 32, "q4_0x8": 8, "q4_1x8": 0, "q5_1x8": 0,
          "q5_kx8": 0, "iq4_nlx8": 128, "iq4_xsx8": 128, "q3_kx8": 4, "q2_kx8": 0}
SCALE_GROUP = {f: 16 if f in ("q6_kx8", "q3_kx8", "q2_kx8") else 32 for f in VNNI}
K_MULTIPLE = {f: 256 if f in ("q2_kx8", "q3_kx8", "q4_kx8", "q5_kx8", "q6_kx8", "iq4_xsx8") else 32 for f in VNNI}
HAS_MIN = ("q4_kx8", "q4_1x8", "q5_1x8", "q5_kx8", "q2_kx8")
BLOCK_BYTES = {"Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210), "Q4_0": (32, 18),
               "Q4_1": (32, 20), "Q5_1": (32, 24), "Q5_K": (256, 176), "IQ4_NL": (32, 18), "IQ4_XS": (256, 136),
               "Q3_K": (256, 110), "Q2_K": (256, 84), "BF16": (1, 2), "F16": (1, 2), "F32": (1, 4)}
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
LUT = {f: torch.tensor(IQ4_VALUES, dtype=torch.int32) + 128 for f in ("iq4_nlx8", "iq4_xsx8")}  # u index -> byte


def unsupported(tensor: str, qtype: str) -> str:
    """The one-line error for a weight whose GGUF type no kernel format holds."""
    return f"tensor {tensor!r} has type {qtype}; supported weight types: {', '.join(SUPPORTED_TYPES)}"


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] fp16."""
    return b.contiguous().view(torch.float16)[..., 0]


def _bits(b: torch.Tensor, n: int, width: int = 1) -> torch.Tensor:
    """uint8 [..., L] -> [..., n, L]: field t (t < n) of `width` bits of every byte."""
    return torch.stack([(b >> (width * t)) & ((1 << width) - 1) for t in range(n)], -2)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., L] packed bytes -> [..., 2L]: the L low nibbles, then the L high ones (GGUF's order in a 2L run)."""
    return torch.cat([qs & 0x0F, qs >> 4], -1)


def _scales_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K 12-byte scale blocks [N, S, 12] -> 6-bit (sc, m) uint8 [N, S*8]."""
    s = s.to(torch.int32)
    sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], -1)
    m = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return sc.to(torch.uint8).flatten(1), m.to(torch.uint8).flatten(1)


def parse_gguf(qtype: str, raw: np.ndarray, K: int) -> dict[str, torch.Tensor]:
    """Raw GGUF rows (uint8 [N, row bytes], or the float types' values [N, K]) of type `qtype` -> the fields of its format: u uint8 [N, K] (for
    iq4: the 4-bit index into IQ4_VALUES) and the type's scales, or {"w": the values} for the float types."""
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"no kernel format for GGUF type {qtype}; supported: {', '.join(SUPPORTED_TYPES)}")
    qk, nbytes = BLOCK_BYTES[qtype]
    N = raw.shape[0]
    if raw.dtype != np.uint8:  # gguf-py hands F16 / F32 tensors over as their values: the same bytes
        raw = np.ascontiguousarray(raw).view(np.uint8).reshape(N, -1)
    if K % qk:
        raise ValueError(f"{qtype} holds rows of whole {qk}-value blocks, got {K} values")
    if raw.shape[1] != K // qk * nbytes:
        raise ValueError(f"{qtype} rows of {K} values need {K // qk * nbytes} bytes, got {raw.shape[1]}")
    b = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.uint8)).view(N, K // qk, nbytes)
    if qk == 1:  # float types: the values themselves
        return {"w": b.view(N, K * nbytes).view(FLOAT_DTYPES[qtype])}
    f = _PARSE[qtype](b)
    f["u"] = f["u"].reshape(N, K)
    return f


def _q5(qh: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 blocks: 4 bytes of high bits (bit i: value i) and 32 low nibbles -> u [N, KB, 32]."""
    h = ((qh.contiguous().view(torch.int32)[..., :1] >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)
    return lo | (h << 4)


def _q3k(b):
    N, S = b.shape[:2]
    lo = _bits(b[..., 32:96].reshape(N, S, 2, 32), 4, 2)  # [N, S, 2, 4, 32]: value 128c + 32t + l
    hi = _bits(b[..., 0:32], 8)  # [N, S, 8, 32]: value 32t + l
    s = b[..., 96:108]
    sc = (_bits(s[..., :8], 2, 4).flatten(2) | (_bits(s[..., 8:12], 4, 2).flatten(2) << 4)).view(torch.int8) - 32
    return {"u": lo.reshape(N, S, 256) | (hi.reshape(N, S, 256) << 2), "sc": sc.flatten(1), "d": _f16(b[..., 108:110])}


def _q5k(b):
    N, S = b.shape[:2]
    sc, m = _scales_k4(b[..., 4:16])
    lo = _nibbles(b[..., 48:176].reshape(N, S, 4, 32)).reshape(N, S, 256)
    return {"u": lo | (_bits(b[..., 16:48], 8).reshape(N, S, 256) << 4), "sc": sc, "m": m,
            "d": _f16(b[..., 0:2]), "dmin": _f16(b[..., 2:4])}


def _q6k(b):
    N, S = b.shape[:2]
    ql = b[..., :128].reshape(N, S, 2, 64)  # two halves of 128 values
    lo = torch.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], 3)
    hi = _bits(b[..., 128:192].reshape(N, S, 2, 32), 4, 2)  # [N, S, 2, 4, 32]
    return {"u": lo | (hi << 4), "sc": b[..., 192:208].contiguous().view(torch.int8).flatten(1),
            "d": _f16(b[..., 208:210])}


def _iq4xs(b):
    N, S = b.shape[:2]
    sh = b[..., 2:4].contiguous().view(torch.int16).to(torch.int32)  # [N, S, 1]
    hi = torch.stack([(sh[..., 0] >> (2 * i)) & 3 for i in range(8)], -1).to(torch.uint8)
    sc = (_bits(b[..., 4:8], 2, 4).transpose(-1, -2).flatten(2) | (hi << 4)).view(torch.int8) - 32
    return {"u": _nibbles(b[..., 8:136].reshape(N, S, 8, 16)), "sc": sc.flatten(1), "d": _f16(b[..., 0:2])}


_PARSE = {
    "Q8_0": lambda b: {"u": b[..., 2:] ^ 0x80, "d": _f16(b[..., :2])},  # q + 128
    "Q5_0": lambda b: {"u": _q5(b[..., 2:6], _nibbles(b[..., 6:])), "d": _f16(b[..., :2])},
    "Q5_1": lambda b: {"u": _q5(b[..., 4:8], _nibbles(b[..., 8:])), "d": _f16(b[..., :2]), "m": _f16(b[..., 2:4])},
    "Q4_0": lambda b: {"u": _nibbles(b[..., 2:]), "d": _f16(b[..., :2])},
    "IQ4_NL": lambda b: {"u": _nibbles(b[..., 2:]), "d": _f16(b[..., :2])},
    "Q4_1": lambda b: {"u": _nibbles(b[..., 4:]), "d": _f16(b[..., :2]), "m": _f16(b[..., 2:4])},
    "Q4_K": lambda b: dict(zip(("sc", "m"), _scales_k4(b[..., 4:16])), d=_f16(b[..., 0:2]), dmin=_f16(b[..., 2:4]),
                           u=_nibbles(b[..., 16:].reshape(*b.shape[:2], 4, 32))),
    "Q5_K": _q5k, "Q6_K": _q6k, "Q3_K": _q3k, "IQ4_XS": _iq4xs,
    "Q2_K": lambda b: {"u": _bits(b[..., 16:80].reshape(*b.shape[:2], 2, 32), 4, 2), "sc": b[..., :16].flatten(1),
                       "d": _f16(b[..., 80:82]), "dmin": _f16(b[..., 82:84])},
}


def scales(fmt: str, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a, b) fp32 [N, K/SG] (b None without a min) of w = a * (u - off) - b, computed as gguf-py does."""
    rep = lambda t, n: t.float().repeat_interleave(n, 1)
    if fmt in ("q4_kx8", "q5_kx8"):
        return rep(f["d"], 8) * f["sc"].float(), rep(f["dmin"], 8) * f["m"].float()
    if fmt in ("q4_1x8", "q5_1x8"):
        return f["d"].float(), -f["m"].float()
    if fmt in ("q6_kx8", "q3_kx8"):
        return rep(f["d"], 16) * f["sc"].float(), None
    if fmt == "q2_kx8":
        return rep(f["d"], 16) * (f["sc"] & 0x0F).float(), rep(f["dmin"], 16) * (f["sc"] >> 4).float()
    if fmt == "iq4_xsx8":
        return rep(f["d"], 8) * f["sc"].float(), None
    return f["d"].float(), None


def _values(fmt: str, u: torch.Tensor) -> torch.Tensor:
    """u -> u - off as fp32 (the signed integers the scales multiply)."""
    v = LUT[fmt][u.long()] if fmt in LUT else u
    return v.float() - OFFSET[fmt]


def dequantize(fmt: str, f: dict[str, torch.Tensor]) -> torch.Tensor:
    """The exact fp32 values the kernel multiplies by, [N, K] (bitwise gguf-py's dequantization)."""
    a, b = scales(fmt, f)
    N, K = f["u"].shape
    q = _values(fmt, f["u"]).view(N, K // SCALE_GROUP[fmt], SCALE_GROUP[fmt])
    w = q * a[..., None] if b is None else a[..., None] * q - b[..., None]
    return w.reshape(N, K)


# -- panel layouts -------------------------------------------------------------------------------------------------

def panelize(w: torch.Tensor) -> torch.Tensor:
    """[N, C] -> [ceil(N/64), C, 64] contiguous, zero-padded rows (panel-major layout of the kernels)."""
    N, C = w.shape
    P = (N + NB - 1) // NB
    out = torch.zeros(P, C, NB, dtype=w.dtype)
    for p0 in range(0, P, 256):
        p1 = min(P, p0 + 256)
        blk = w[p0 * NB:p1 * NB]
        if blk.shape[0] < (p1 - p0) * NB:
            blk = torch.cat([blk, blk.new_zeros((p1 - p0) * NB - blk.shape[0], C)])
        out[p0:p1] = blk.reshape(p1 - p0, NB, C).transpose(1, 2)
    return out


def unpanelize(wp: torch.Tensor, N: int) -> torch.Tensor:
    P, C, _ = wp.shape
    return wp.transpose(1, 2).reshape(P * NB, C)[:N]


def _groups(u: torch.Tensor) -> torch.Tensor:
    """u uint8 [N, K] -> [P, KB, 8, 4, 64]: per (32-block, 4 k, 16 columns) the 64 values as byte 4c + k."""
    N, K = u.shape
    p = panelize(u)  # [P, K, 64]
    P = p.shape[0]
    return p.view(P, K // 32, 8, 4, 4, 16).permute(0, 1, 2, 4, 5, 3).reshape(P, K // 32, 8, 4, 64)


def _ungroup(v: torch.Tensor, N: int) -> torch.Tensor:
    P, KB = v.shape[:2]
    p = v.view(P, KB, 8, 4, 16, 4).permute(0, 1, 2, 5, 3, 4).reshape(P, KB * 32, NB)
    return unpanelize(p, N)


# the kernel's streams per format, in order (csrc/vnni_gemm.cpp's header): bit planes of u, then scale fields,
# each panelized [P, groups, 64] ("pair": two fields interleaved [P, groups, 2, 64])
STREAMS = {
    "q8_0x8": [("u8",), ("d",)], "q4_0x8": [("nib",), ("d",)], "iq4_nlx8": [("nib",), ("d",)],
    "q5_0x8": [("nib",), ("hbit", 4), ("d",)], "q4_1x8": [("nib",), ("pair", "d", "m")],
    "q5_1x8": [("nib",), ("hbit", 4), ("pair", "d", "m")],
    "q4_kx8": [("nib",), ("sc",), ("m",), ("pair", "d", "dmin")],
    "q5_kx8": [("nib",), ("hbit", 4), ("sc",), ("m",), ("pair", "d", "dmin")],
    "q6_kx8": [("nib",), ("crumbs", 4), ("sc",), ("d",)], "iq4_xsx8": [("nib",), ("sc",), ("d",)],
    "q3_kx8": [("crumbs", 0), ("hbit", 2), ("sc",), ("d",)], "q2_kx8": [("crumbs", 0), ("sc",), ("pair", "d", "dmin")],
}


def pack(fmt: str, f: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Fields -> the kernel's streams (csrc/vnni_gemm.cpp)."""
    N, K = f["u"].shape
    if K % K_MULTIPLE[fmt]:
        raise ValueError(f"{fmt} needs in_features % {K_MULTIPLE[fmt]} == 0, got {K}")
    v = _groups(f["u"])  # [P, KB, 8, 4, 64]
    vp = v.view(*v.shape[:2], 4, 2, 4, 64)  # groups in pairs (2gp, 2gp+1): one byte holds one value of each
    out = []
    for kind, *arg in STREAMS[fmt]:
        if kind == "u8":
            out.append(v.contiguous())
        elif kind == "nib":
            out.append((vp[:, :, :, 0] & 0x0F) | ((vp[:, :, :, 1] & 0x0F) << 4))
        elif kind == "hbit":  # bit i of the u64 (little-endian bytes) is bit `shift` of v[i]
            bit = ((v >> arg[0]) & 1).view(*v.shape[:-1], 8, 8).to(torch.int32)
            out.append((bit << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8))
        elif kind == "crumbs":  # byte i: A[i], A[i+32], B[i], B[i+32] (2 bits from `shift`) at bits 0, 2, 4, 6
            ha, hb = (vp[:, :, :, 0] >> arg[0]) & 3, (vp[:, :, :, 1] >> arg[0]) & 3
            out.append(ha[..., :32] | (ha[..., 32:] << 2) | (hb[..., :32] << 4) | (hb[..., 32:] << 6))
        elif kind == "pair":
            out.append(torch.stack([panelize(f[arg[0]]), panelize(f[arg[1]])], 2))
        else:
            out.append(panelize(f[kind]))
    return out


def unpack(fmt: str, st: list[torch.Tensor], N: int) -> dict[str, torch.Tensor]:
    """The kernel's streams -> fields (rows, reordering, the reference)."""
    P, KB = st[0].shape[:2]
    v = torch.zeros(P, KB, 8, 4, 64, dtype=torch.uint8)
    f = {}
    for t, (kind, *arg) in zip(st, STREAMS[fmt]):
        if kind == "u8":
            v = t
        elif kind == "nib":
            v = v | torch.stack([t & 0x0F, t >> 4], 3).view(v.shape)
        elif kind == "hbit":
            bit = (t[..., None].to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
            v = v | (bit.reshape(v.shape) << arg[0]).to(torch.uint8)
        elif kind == "crumbs":
            c = torch.stack([torch.cat([t & 3, (t >> 2) & 3], -1), torch.cat([(t >> 4) & 3, t >> 6], -1)], 3)
            v = v | (c.view(v.shape) << arg[0])
        elif kind == "pair":
            f[arg[0]], f[arg[1]] = unpanelize(t[:, :, 0], N), unpanelize(t[:, :, 1], N)
        else:
            f[kind] = unpanelize(t, N)
    return {"u": _ungroup(v, N), **f}


def reference(fmt: str, f: dict[str, torch.Tensor], xq: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """y [M, N] as the kernel computes it, in torch: exact integer group dots (|sum| < 2^24 in fp32), then per
    scale group acc = fma(isum, a*dx, acc) (with a min: and fma(-sum xq, b*dx, acc)), the fma in fp64 (exact
    product; only a 53->24-bit double rounding can differ)."""
    a_all, b_all = scales(fmt, f)
    sg = SCALE_GROUP[fmt]
    M, K = xq.shape
    G = K // sg
    xg = xq.float().view(M, G, sg).transpose(0, 1)  # [G, M, sg]
    sx = xq.float().view(M, G, sg).sum(-1)  # [M, G]
    N = f["u"].shape[0]
    outs = []
    for n0 in range(0, N, 8192):
        n1 = min(N, n0 + 8192)
        q = _values(fmt, f["u"][n0:n1]).view(n1 - n0, G, sg).permute(1, 2, 0)  # [G, sg, n]
        isum = torch.bmm(xg, q)  # [G, M, n]
        acc = torch.zeros(M, n1 - n0)
        for g in range(G):
            d = dx[:, g * sg // 32, None]
            acc = (acc.double() + isum[g].double() * (a_all[None, n0:n1, g] * d).double()).float()
            if b_all is not None:
                acc = (acc.double() - sx[:, g, None].double() * (b_all[None, n0:n1, g] * d).double()).float()
        outs.append(acc)
    return torch.cat(outs, dim=1)
