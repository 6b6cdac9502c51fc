"""GGUF quant blocks kept as stored for the VNNI kernels (csrc/vnni_gemm.cpp): parse, pack, unpack, reference.

A weight in one of these formats holds the GGUF type's own integers and scales (no requantisation), so it reads
as few bytes per token as the file: Q5_0 0.69, Q4_K 0.56, Q6_K 0.82 B/weight against q8_0's 1.06.
  fields  per-row values: u uint8 [N, K] (unsigned, see the kernel's table) and the type's scales
  streams the panel layouts the kernel reads (csrc/vnni_gemm.cpp's header), one tensor each
Values: w = a * (u - off) - b per scale group of SG k (a, b fp32 exactly as gguf-py dequantizes them).
"""

from __future__ import annotations

import numpy as np
import torch

NB = 64  # columns per panel (must match csrc/small_gemm.cpp, csrc/vnni_gemm.cpp)
GGUF_TYPES = {"Q8_0": "q8_0x8", "Q5_0": "q5_0x8", "Q4_K": "q4_kx8", "Q6_K": "q6_kx8"}
OFFSET = {"q8_0x8": 128, "q5_0x8": 16, "q4_kx8": 0, "q6_kx8": 32}
SCALE_GROUP = {"q8_0x8": 32, "q5_0x8": 32, "q4_kx8": 32, "q6_kx8": 16}
K_MULTIPLE = {"q8_0x8": 32, "q5_0x8": 32, "q4_kx8": 256, "q6_kx8": 256}
BLOCK_BYTES = {"Q8_0": (32, 34), "Q5_0": (32, 22), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 -> [...] fp16."""
    return b.contiguous().view(torch.float16)[..., 0]


def parse_gguf(qtype: str, raw: np.ndarray, K: int) -> dict[str, torch.Tensor]:
    """Raw GGUF rows (uint8 [N, row bytes]) of type `qtype` -> the fields of its VNNI format."""
    if qtype not in BLOCK_BYTES:
        raise ValueError(f"no VNNI format for GGUF type {qtype}; have {sorted(BLOCK_BYTES)}")
    qk, nbytes = BLOCK_BYTES[qtype]
    N = raw.shape[0]
    if K % qk or raw.shape[1] != K // qk * nbytes:
        raise ValueError(f"{qtype} rows of {K} values need {K // qk * nbytes} bytes, got {raw.shape[1]}")
    b = torch.from_numpy(np.ascontiguousarray(raw, dtype=np.uint8)).view(N, K // qk, nbytes)
    if qtype == "Q8_0":
        q = b[..., 2:].contiguous().view(torch.int8).reshape(N, K)
        return {"u": q.view(torch.uint8) ^ 0x80, "d": _f16(b[..., :2])}  # q + 128
    if qtype == "Q5_0":
        qh = b[..., 2:6].contiguous().view(torch.int32)[..., 0]  # [N, KB] little-endian
        hbit = ((qh[..., None] >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)
        qs = b[..., 6:]
        lo = torch.cat([qs & 0x0F, qs >> 4], -1)  # element j < 16: low nibble of byte j; j + 16: its high nibble
        return {"u": (lo | (hbit << 4)).reshape(N, K), "d": _f16(b[..., :2])}
    if qtype == "Q4_K":
        s = b[..., 4:16].to(torch.int32)  # [N, S, 12]
        sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], -1)
        m = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
        qs = b[..., 16:].reshape(N, -1, 4, 32)  # 4 chunks of 32 bytes: low nibbles then high nibbles, 64 values
        u = torch.stack([qs & 0x0F, qs >> 4], 3).reshape(N, K)
        return {"u": u, "sc": sc.to(torch.uint8).reshape(N, -1), "m": m.to(torch.uint8).reshape(N, -1),
                "d": _f16(b[..., 0:2]), "dmin": _f16(b[..., 2:4])}
    ql = b[..., :128].reshape(N, -1, 2, 64)  # Q6_K: two halves of 128 values
    qh = b[..., 128:192].reshape(N, -1, 2, 32)
    lo = torch.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], 3)
    hi = torch.stack([(qh >> (2 * t)) & 3 for t in range(4)], 3)  # [N, S, 2, 4, 32]
    return {"u": (lo | (hi << 4)).reshape(N, K), "sc": b[..., 192:208].contiguous().view(torch.int8).reshape(N, -1),
            "d": _f16(b[..., 208:210])}


def scales(fmt: str, f: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(a fp32 [N, K/SG], b fp32 [N, K/32] or None) of w = a * (u - off) - b, computed as gguf-py does."""
    if fmt in ("q8_0x8", "q5_0x8"):
        return f["d"].float(), None
    if fmt == "q4_kx8":
        rep = lambda t: t.float().repeat_interleave(8, 1)
        return rep(f["d"]) * f["sc"].float(), rep(f["dmin"]) * f["m"].float()
    return f["d"].float().repeat_interleave(16, 1) * f["sc"].float(), None


def dequantize(fmt: str, f: dict[str, torch.Tensor]) -> torch.Tensor:
    """The exact fp32 values the kernel multiplies by, [N, K] (bitwise gguf-py's dequantization)."""
    a, b = scales(fmt, f)
    N, K = f["u"].shape
    sg = SCALE_GROUP[fmt]
    q = (f["u"].float() - OFFSET[fmt]).view(N, K // sg, sg)
    w = q * a[..., None] if fmt != "q4_kx8" else a[..., None] * q - b[..., None]
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


def pack(fmt: str, f: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Fields -> the kernel's streams (csrc/vnni_gemm.cpp)."""
    N, K = f["u"].shape
    if K % K_MULTIPLE[fmt]:
        raise ValueError(f"{fmt} needs in_features % {K_MULTIPLE[fmt]} == 0, got {K}")
    v = _groups(f["u"])
    if fmt == "q8_0x8":
        return [v.contiguous(), panelize(f["d"])]
    vp = v.view(*v.shape[:2], 4, 2, 4, 64)  # groups in pairs (2gp, 2gp+1): one byte holds one value of each
    nib = (vp[:, :, :, 0] & 0x0F) | ((vp[:, :, :, 1] & 0x0F) << 4)
    if fmt == "q5_0x8":  # bit i of the u64 (little-endian bytes) is v[i] >> 4
        hb = ((v >> 4).view(*v.shape[:-1], 8, 8).to(torch.int32) << torch.arange(8, dtype=torch.int32)).sum(-1)
        return [nib, hb.to(torch.uint8), panelize(f["d"])]
    if fmt == "q4_kx8":
        return [nib, panelize(f["sc"]), panelize(f["m"]), torch.stack([panelize(f["d"]), panelize(f["dmin"])], 2)]
    ha, hb = vp[:, :, :, 0] >> 4, vp[:, :, :, 1] >> 4
    h2 = ha[..., :32] | (ha[..., 32:] << 2) | (hb[..., :32] << 4) | (hb[..., 32:] << 6)
    return [nib, h2, panelize(f["sc"]), panelize(f["d"])]


def unpack(fmt: str, st: list[torch.Tensor], N: int) -> dict[str, torch.Tensor]:
    """The kernel's streams -> fields (rows, reordering, the reference)."""
    if fmt == "q8_0x8":
        return {"u": _ungroup(st[0], N), "d": unpanelize(st[1], N)}
    P, KB = st[0].shape[:2]
    v = torch.stack([st[0] & 0x0F, st[0] >> 4], 3).view(P, KB, 8, 4, 64)
    if fmt == "q5_0x8":
        hb = (st[1][..., None].to(torch.int32) >> torch.arange(8, dtype=torch.int32)) & 1
        return {"u": _ungroup(v | (hb.reshape(v.shape) << 4).to(torch.uint8), N), "d": unpanelize(st[2], N)}
    if fmt == "q4_kx8":
        return {"u": _ungroup(v, N), "sc": unpanelize(st[1], N), "m": unpanelize(st[2], N),
                "d": unpanelize(st[3][:, :, 0], N), "dmin": unpanelize(st[3][:, :, 1], N)}
    h = st[1]
    hi = torch.stack([torch.cat([h & 3, (h >> 2) & 3], -1), torch.cat([(h >> 4) & 3, h >> 6], -1)], 3)
    return {"u": _ungroup(v | (hi.view(v.shape) << 4), N), "sc": unpanelize(st[2], N),
            "d": unpanelize(st[3], N)}


def reference(fmt: str, f: dict[str, torch.Tensor], xq: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """y [M, N] as the kernel computes it, in torch: exact integer group dots (|sum| < 2^24 in fp32), then per
    scale group acc = fma(isum, a*dx, acc) (q4_k: and fma(-sum xq, b*dx, acc)), the fma in fp64 (exact product;
    only a 53->24-bit double rounding can differ)."""
    a_all, b_all = scales(fmt, f)
    sg, off = SCALE_GROUP[fmt], OFFSET[fmt]
    M, K = xq.shape
    G = K // sg
    xg = xq.float().view(M, G, sg).transpose(0, 1)  # [G, M, sg]
    sx = xq.float().view(M, K // 32, 32).sum(-1)  # [M, KB]
    N = f["u"].shape[0]
    outs = []
    for n0 in range(0, N, 8192):
        n1 = min(N, n0 + 8192)
        q = (f["u"][n0:n1].float() - off).view(n1 - n0, G, sg).permute(1, 2, 0)  # [G, sg, n]
        isum = torch.bmm(xg, q)  # [G, M, n]
        acc = torch.zeros(M, n1 - n0)
        for g in range(G):
            d = dx[:, g * sg // 32, None]
            acc = (acc.double() + isum[g].double() * (a_all[None, n0:n1, g] * d).double()).float()
            if b_all is not None:
                acc = (acc.double() - sx[:, g, None].double() * (b_all[None, n0:n1, g] * d).double()).float()
        outs.append(acc)
    return torch.cat(outs, dim=1)
