"""Rotary position embeddings, one place for every family: inverse frequencies per rope type, cos/sin, rotation.

A rope config is HF-style: transformers 5 `rope_parameters` ({"rope_type", "rope_theta", ...}) or the legacy
`rope_scaling` + `rope_theta` (see `rope_config`). Types: default, linear, llama3, yarn (DeepSeek-V3 mscale),
proportional (Gemma 4 partial rotary) and freq_factors (llama.cpp's `rope_freqs.weight` divisors, from GGUF).
"""

from __future__ import annotations

import math

import torch

from tandem.errors import ConfigError


def rope_config(rope_parameters: dict | None, rope_scaling: dict | None = None, rope_theta: float | None = None,
                partial_rotary_factor: float | None = None, max_position_embeddings: int | None = None) -> dict:
    """One flat rope config from a config's fields (as transformers' standardize_rope_params resolves them)."""
    rp = dict(rope_parameters or rope_scaling or {})
    rp.setdefault("rope_type", rp.pop("type", "default"))
    if rope_theta is not None:
        rp.setdefault("rope_theta", rope_theta)
    if partial_rotary_factor is not None:
        rp.setdefault("partial_rotary_factor", partial_rotary_factor)
    if rp["rope_type"] in ("llama3", "yarn") and max_position_embeddings is not None:
        rp.setdefault("original_max_position_embeddings", max_position_embeddings)
    if "rope_theta" not in rp:
        raise ConfigError(f"rope config {rp} has no rope_theta")
    return rp


def _base(dim: int, theta: float, device=None) -> torch.Tensor:
    """theta^(-2i/dim) for i < dim/2, computed as transformers does ([dim/2])."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)


def _llama3(inv: torch.Tensor, rp: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short kept, a smooth ramp in between."""
    factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
    old = rp["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
    return torch.where(medium, smoothed, out)


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def _yarn(dim: int, rp: dict, max_pos: int | None, device=None) -> tuple[torch.Tensor, float]:
    """YaRN (DeepSeek-V3 style): frequencies ramp between interpolated and extrapolated; cos/sin scaled."""
    theta, orig = rp["rope_theta"], rp["original_max_position_embeddings"]
    factor = rp.get("factor") or max_pos / orig
    att = rp.get("attention_factor")
    if att is None:
        m, m_all = rp.get("mscale"), rp.get("mscale_all_dim")
        att = _mscale(factor, m) / _mscale(factor, m_all) if (m and m_all) else _mscale(factor)
    fast, slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

    def corr(rot):  # the dimension whose wavelength makes `rot` rotations over the original context
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

    low, high = corr(fast), corr(slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low if high != low else 0.001)).clamp(0, 1)
    extra = (1 - ramp).to(device)
    pos = theta ** (torch.arange(0, dim, 2, device=device).float() / dim)
    return (1.0 / (factor * pos)) * (1 - extra) + (1.0 / pos) * extra, float(att)


def inv_freq(head_dim: int, rp: dict, max_position_embeddings: int | None = None,
             device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rot_dim/2], attention scaling of cos/sin) for a flat rope config (`rope_config`).

    rot_dim = head_dim * partial_rotary_factor, except "proportional" which always covers the head (zeros past the
    rotated part, i.e. identity there)."""
    kind, theta = rp.get("rope_type", "default"), float(rp["rope_theta"])
    dim = int(head_dim * rp.get("partial_rotary_factor", 1.0))
    if kind == "default":
        return _base(dim, theta, device), 1.0
    if kind == "linear":
        return _base(dim, theta, device) / rp["factor"], 1.0
    if kind == "llama3":
        return _llama3(_base(dim, theta, device), rp), 1.0
    if kind == "yarn":
        return _yarn(dim, rp, max_position_embeddings, device)
    if kind == "proportional":
        rot = int(rp.get("partial_rotary_factor", 1.0) * head_dim // 2)
        f = _base(head_dim, theta, device)[:rot]
        return torch.cat([f, f.new_zeros(head_dim // 2 - rot)]) / float(rp.get("factor", 1.0)), 1.0
    if kind == "freq_factors":  # llama.cpp rope_freqs: per-frequency divisors
        ff = torch.as_tensor(rp["freq_factors"], dtype=torch.float32, device=device).reshape(-1)
        if ff.numel() != dim // 2:
            raise ConfigError(f"rope freq_factors has {ff.numel()} entries, expected head_dim/2 = {dim // 2}")
        return _base(dim, theta, device) / ff, 1.0
    raise ConfigError(f"rope_type {kind!r} unsupported; supported: default, linear, llama3, yarn, proportional, "
                      "freq_factors")


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype,
                 scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, T, 1, 2*F] in `dtype` (halves duplicated, HF rotate_half layout)."""
    freqs = positions.clamp(min=0)[..., None].float() * inv_freq.to(positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scaling).to(dtype)[:, :, None], (emb.sin() * scaling).to(dtype)[:, :, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated with cos/sin [B, T, 1, R] (rotate_half convention) over its first R dims (partial
    rotary leaves the rest as is)."""
    r = cos.shape[-1]
    if r < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)
    half = r // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
