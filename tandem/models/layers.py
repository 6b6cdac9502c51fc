"""Building blocks shared by the families: RMSNorm variants, activations, attention over the KV cache, GLU MLP,
the pre-norm decoder layer. Module names copy the HF checkpoints so their state dicts load directly."""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tandem.errors import ConfigError
from tandem.kernels._ext import ext
from tandem.kernels.linear import linears
from tandem.kvcache import KVCache
from tandem.models.base import gelu_tanh
from tandem.models.rope import apply_rope

ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "gelu": F.gelu, "silu": F.silu, "swish": F.silu}
_VEC_BYTES = 128  # one step of torch's CPU elementwise loop: 2 AVX-512 registers (whole AVX2 / NEON steps too)
_GRAIN = 32768  # at::internal::GRAIN_SIZE: above it an elementwise op splits over ceil(n / GRAIN) threads at most
_ONE_THREAD = 6144  # gelu splits over all threads above 6144 elements; below it every activation runs on one


def rowwise(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Elementwise `fn` of x, every element's bits independent of x's size, so a row's result does not depend on the
    rows beside it. Torch's CPU loops (silu, sigmoid, gelu, softplus) run vector steps over each thread's share
    (ceil(n / threads), OpenMP) of the flat tensor and its tail in scalar code (other last bits): the flat tensor is
    zero-padded to whole steps and, unless every thread's share is whole steps too, run in one-thread segments.
    A no-op in the usual case (contiguous, numel a multiple of 32 floats times the thread count)."""
    if x.device.type != "cpu":
        return fn(x)
    step, flat = _VEC_BYTES // x.element_size(), x.reshape(-1)
    n = flat.numel()
    if n % step:
        flat = F.pad(flat, (0, -n % step))
    total, threads = flat.numel(), torch.get_num_threads()
    steps, split = total // step, max(1, min(threads, -(-total // _GRAIN)))
    if total <= _ONE_THREAD or (steps % threads == 0 and steps % split == 0):
        out = fn(flat)
    else:
        out = torch.cat([fn(flat[i:i + _ONE_THREAD]) for i in range(0, total, _ONE_THREAD)])
    return out[:n].view(x.shape)


def glue(*ts: torch.Tensor | None):
    """The C++ glue kernels (csrc/glue.cpp) when every tensor given is fp32 on CPU and no gradient is wanted, else
    None. Never decided by shape: a row takes the same path alone or among others."""
    if torch.is_grad_enabled():
        return None
    for t in ts:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            return None
    return ext()


def activation(name: str, where: str = "model") -> Callable[[torch.Tensor], torch.Tensor]:
    """The named activation, row-invariant (`rowwise`)."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"{where}: hidden activation {name!r} not in {sorted(ACTIVATIONS)}")
    return functools.partial(rowwise, ACTIVATIONS[name])


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32. Scale (1 + weight) with `unit_offset` (Gemma 2/3), else weight (Llama, Qwen,
    Gemma 4); `with_scale=False` is the unscaled norm (Gemma 4's v_norm, router norm)."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = True, with_scale: bool = True):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim)) if with_scale else None
        self.fused = False  # the C++ glue kernel (after kernels.prepare); unprepared stays op for op HF's

    def pack_weights(self, fmt: str) -> None:
        """kernels.prepare's hook: run the fused row-invariant C++ norm from now on (CPU fp32 x, no grad)."""
        w = self.weight
        self.fused = w is None or (w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """norm(x) [.., D], or residual + norm(x) (one pass: the sandwich norms' residual add)."""
        m = glue(x, residual) if self.fused else None  # the weight was checked when packed (the hot path)
        if m is not None:
            res = None if residual is None else residual.contiguous()
            return m.rms_norm(x.contiguous(), self.weight, float(self.unit_offset), self.eps, res)
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            w = self.weight.float()
            out = out * (1.0 + w if self.unit_offset else w)
        out = out.type_as(x)
        return out if residual is None else residual + out

    def after_add(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, norm(h)) with h = x + y: the pre-norm block's residual add and the next norm in one C++ call."""
        m = glue(x, y) if self.fused else None
        if m is None:
            h = x + y
            return h, self(h)
        return tuple(m.add_rms_norm(x.contiguous(), y.contiguous(), self.weight, float(self.unit_offset), self.eps))


class Attention(nn.Module):
    """GQA attention of layer `layer_idx` over the KV cache: optional QKV / output bias, q/k RMSNorm (before RoPE),
    sliding window, logit softcap, any scale. Writes its K/V with cache.write and reads through cache.attend (the
    one reader path that keeps quantized and rotated caches right)."""

    def __init__(self, layer_idx: int, hidden: int, n_heads: int, n_kv: int, head_dim: int, *,
                 qkv_bias: bool = False, o_bias: bool = False, qk_norm: Callable[[int], nn.Module] | None = None,
                 scale: float | None = None, window: int | None = None, softcap: float | None = None):
        super().__init__()
        self.layer_idx, self.n_heads, self.n_kv, self.head_dim = layer_idx, n_heads, n_kv, head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        self.window, self.softcap = window, softcap
        self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=o_bias)
        if qk_norm is not None:
            self.q_norm, self.k_norm = qk_norm(head_dim), qk_norm(head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.fused = False  # q/k norm + RoPE in one C++ call per tensor (after kernels.prepare)

    def pack_weights(self, fmt: str) -> None:
        """kernels.prepare's hook: fuse q/k norm + RoPE from now on (CPU fp32, full rotary, no grad): per tensor
        the norm's (weight, offset, eps, normed) as the C++ call takes them, fixed once here."""
        norms = [n for n in (self.q_norm, self.k_norm) if n is not None]
        ok = all(n.weight is None or (n.weight.dtype == torch.float32 and n.weight.device.type == "cpu")
                 for n in norms)
        self.fused = ok
        self._nr = [(None if n is None or n.weight is None else n.weight.contiguous(),
                     float(n is not None and n.unit_offset), n.eps if n is not None else 0.0, n is not None)
                    for n in (self.q_norm, self.k_norm)] if ok else None

    def _norm_rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q [B, T, Hq, D], k [B, T, Hkv, D] -> q/k-normed (if any) and rotated."""
        m = glue(q, k, cos) if self.fused and cos.shape[-1] == self.head_dim else None
        if m is None:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        B, T = q.shape[:2]
        cos, sin = cos.reshape(B * T, -1).contiguous(), sin.reshape(B * T, -1).contiguous()
        q, k = q.contiguous(), k.contiguous()
        for x, (w, off, eps, normed) in zip((q, k), self._nr):
            m.norm_rope_(x.view(B * T, -1, self.head_dim), w, off, eps, normed, cos, sin)
        return q, k

    def forward(self, x: torch.Tensor, cos_sin, positions: torch.Tensor, cache: KVCache,
                slots: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], positions [B, T] (-1 = padding), slots [B] -> [B, T, D]."""
        B, T, _ = x.shape
        q, k, v = linears(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k, v = k.view(B, T, self.n_kv, self.head_dim), v.view(B, T, self.n_kv, self.head_dim)
        q, k = self._norm_rope(q, k, *cos_sin)
        if hasattr(cache, "write_attend"):  # KVCache: one C++ call on the hot path
            out = cache.write_attend(self.layer_idx, q, k, v, slots, positions, self.window, self.scale,
                                     self.softcap)
        else:  # the trainers' caches only write and attend
            cache.write(self.layer_idx, slots, positions, k, v)
            out = cache.attend(self.layer_idx, q, slots, positions, self.window, self.scale, self.softcap)
        return self.o_proj(out.reshape(B, T, -1))


class GLUMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (gelu_tanh)."""

    def __init__(self, hidden: int, inter: int, act: Callable[[torch.Tensor], torch.Tensor], bias: bool = False):
        super().__init__()
        self.act = act
        self.silu = getattr(act, "args", None) == (F.silu,)  # SwiGLU: silu(gate) * up in one C++ call
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = linears(x, self.gate_proj, self.up_proj)
        m = glue(gate, up) if self.silu else None
        return self.down_proj(self.act(gate) * up if m is None else m.silu_mul(gate.contiguous(), up.contiguous()))


class DecoderLayer(nn.Module):
    """Pre-norm block (Llama, Mistral, Qwen): x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, self_attn: Attention, mlp: nn.Module, hidden: int, eps: float):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm = RMSNorm(hidden, eps, unit_offset=False)
        self.post_attention_layernorm = RMSNorm(hidden, eps, unit_offset=False)

    def forward(self, x, cos_sin, positions, cache, slots):
        x, h = self.post_attention_layernorm.after_add(x, self.self_attn(self.input_layernorm(x), cos_sin, positions,
                                                                           cache, slots))
        return x + self.mlp(h)
