"""Fast kernels: accuracy vs float64, bitwise batch invariance (linears, attention, whole model)."""

import copy

import pytest
import torch
import torch.nn as nn

from tandem import kernels
from tandem.kernels import PackedEmbedding, PackedLinear, attend_reference, prepare
from tandem.kernels._ext import ext, has_vnni
from tandem.kernels.linear import quantize_act_q8
from tandem.kvcache import KVCache
from tandem.models.gemma3 import Model, ModelArgs

PACKED = ["bf16", "q8_0", "q8_0x8"]
needs_ext = pytest.mark.skipif(ext() is None, reason="fast CPU kernels unavailable on this machine")
needs_vnni = pytest.mark.skipif(ext() is None or not has_vnni(), reason="no q8_0x8 kernels (AVX-512 VNNI) here")


@pytest.mark.parametrize("fmt", ["bf16", "q8_0"])
@pytest.mark.parametrize("N,K", [(640, 2048), (1000, 640), (70, 96)])
def test_packed_linear_accuracy(fmt, N, K):
    w = torch.randn(N, K) * 0.05
    pl = PackedLinear.from_weight(w, fmt)
    x = torch.randn(7, K)
    y = pl(x).double()
    # against the exact values the kernel holds: only fp32 accumulation error
    exact = x.double() @ pl.dequantized_weight().double().T
    assert (y - exact).abs().max() <= 1e-5 * K ** 0.5 * exact.abs().max()
    # against the original fp32 weights: the format's rounding error
    orig = x.double() @ w.double().T
    rel = ((y - orig).norm() / orig.norm()).item()
    assert rel < {"bf16": 5e-3, "q8_0": 1e-2}[fmt]


@pytest.mark.parametrize("fmt", PACKED)
def test_packed_linear_batch_invariant(fmt):
    K, N = 640, 200
    pl = PackedLinear.from_weight(torch.randn(N, K) * 0.05, fmt)
    x = torch.randn(16, K)
    alone = torch.cat([pl(x[i:i + 1]) for i in range(16)])
    for M in range(1, 17):
        assert torch.equal(pl(x[:M]), alone[:M]), M
    # leading dims and row position inside the batch do not matter either
    assert torch.equal(pl(x.view(2, 8, K)).view(16, N), alone)
    perm = torch.randperm(16)
    assert torch.equal(pl(x[perm]), alone[perm])
    # prefill-sized M uses the same per-element arithmetic
    xb = torch.cat([x, torch.randn(90, K)])
    assert torch.equal(pl(xb)[:16], alone)


def test_q8_0x8_activation_rows_are_ggml_q8_0():
    """The activation quantizer is bit-exact to ggml's quantize_row_q8_0_ref (gguf-py's Q8_0, ties included)."""
    gq = pytest.importorskip("gguf.quants")
    x = torch.randn(5, 256) * 3
    x[0, :32] = 0.0
    below_half = torch.nextafter(torch.tensor(0.5), torch.tensor(0.0)).item()
    x[1, :4] = torch.tensor([127.0, -2.5, below_half, 0.5])  # d = 1: ties go away from 0, 0.49999997 down
    q, d, c = quantize_act_q8(x)
    raw = gq.quantize(x.numpy(), gq.GGMLQuantizationType.Q8_0).reshape(5, 8, 34)
    assert torch.equal(q.view(5, 8, 32), torch.from_numpy(raw[..., 2:].copy().view("int8")))
    assert torch.equal(d, torch.from_numpy(raw[..., :2].copy().view("float16")[..., 0]).float())
    assert torch.equal(c, 128 * q.view(5, 8, 32).int().sum(-1))


@needs_vnni
@pytest.mark.parametrize("N,K", [(640, 2048), (1000, 640), (70, 96), (64, 32)])
def test_q8_0x8_kernel_equals_reference(N, K):
    """The VNNI kernel == the torch reference (same quantization, exact integer dots, one fma chain) bitwise; the
    weight values are q8_0's; the error against fp32 is the activation quantization's (~0.5 %)."""
    w = torch.randn(N, K) * 0.05
    pl, q8 = PackedLinear.from_weight(w, "q8_0x8"), PackedLinear.from_weight(w, "q8_0")
    assert torch.equal(pl.dequantized_weight(), q8.dequantized_weight())
    idx = torch.tensor([[N - 1, 0], [3, 5]])
    assert torch.equal(pl.rows(idx), q8.rows(idx))
    x = torch.randn(13, K)
    y = pl(x)
    assert torch.equal(y, pl._reference_vnni(x))
    orig = x.double() @ w.double().T
    assert ((y.double() - orig).norm() / orig.norm()).item() < 1.5e-2
    panels = torch.tensor([(N - 1) // 64, 0])
    sel = pl.panels(x, panels)
    full = torch.nn.functional.pad(y, (0, 64 * ((N + 63) // 64) - N))
    assert torch.equal(sel, torch.cat([full[:, p * 64:(p + 1) * 64] for p in panels.tolist()], 1))


def test_q8_0_matches_reference_quantiser():
    w = torch.randn(8, 64)
    w[0, :32] = 0.0
    pl = PackedLinear.from_weight(w, "q8_0")
    b = w.reshape(8, 2, 32)
    d = b.abs().amax(-1) / 127
    q = torch.round(b / torch.where(d > 0, d, 1)[..., None]).clamp(-127, 127)  # ties do not occur for randn
    deq = (q * d.half().float()[..., None]).reshape(8, 64)
    assert torch.equal(pl.dequantized_weight(), deq)
    assert torch.equal(pl.rows(torch.tensor([[3, 0]])), deq[[3, 0]][None])


def test_formats_validated():
    with pytest.raises(ValueError, match="bf16"):
        PackedLinear.from_weight(torch.randn(4, 32), "int3")
    with pytest.raises(ValueError, match="q8_0"):
        prepare(nn.Sequential(nn.Linear(32, 4)), "fp16")


def _cache_case(dtype, S=3, Hkv=2, Tmax=40, D=64):
    k = torch.randn(S, Hkv, Tmax, D).to(dtype)
    v = torch.randn(S, Hkv, Tmax, D).to(dtype)
    return k, v


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cap", [None, 30.0])
def test_attention_matches_reference(dtype, window, cap):
    k, v = _cache_case(dtype)
    q = torch.randn(2, 6, 4, 64)
    slots = torch.tensor([2, 0])
    pos = torch.tensor([[20, 21, 22, 23, 24, -1], [0, 1, 2, 3, 4, 5]])
    out = kernels.attend(q, k, v, slots, pos, window, 0.125, cap)
    ref = attend_reference(q, k, v, slots, pos, window, 0.125, cap)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert (out - ref).abs().max() < 1e-5


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_batch_invariant(dtype):
    k, v = _cache_case(dtype)
    for T in range(1, 10):
        q = torch.randn(2, T, 4, 64)
        slots = torch.tensor([1, 2])
        pos = torch.stack([torch.arange(10, 10 + T), torch.arange(30 - T, 30)])
        for window in (None, 7):
            out = kernels.attend(q, k, v, slots, pos, window, 0.125)
            for b in range(2):
                for t in range(T):
                    one = kernels.attend(q[b:b + 1, t:t + 1], k, v, slots[b:b + 1], pos[b:b + 1, t:t + 1],
                                         window, 0.125)
                    assert torch.equal(out[b, t], one[0, 0]), (T, b, t, window)


def _tiny_args():
    return ModelArgs(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                     num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                     sliding_window=4, sliding_window_pattern=3)


@pytest.mark.parametrize("fmt", ["fp32"] + PACKED)
def test_prepare_swaps_modules(fmt):
    model = Model(_tiny_args())
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    prepare(model, fmt)
    for n in names:
        assert isinstance(model.get_submodule(n), PackedLinear), n
    if fmt == "fp32":
        assert model.model.embed_tokens.weight is model.lm_head.weight
    else:
        emb = model.model.embed_tokens
        assert isinstance(emb, PackedEmbedding) and emb.linear is model.lm_head
        assert not any(p.numel() == 384 * 64 for p in model.parameters())  # no full-precision table left
        tok = torch.tensor([[5, 7]])
        assert torch.equal(emb(tok)[0], model.lm_head.dequantized_weight()[[5, 7]])


@needs_ext
@pytest.mark.parametrize("fmt", PACKED)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_model_verify_equals_decode_bitwise(fmt, cache_dtype):
    args = _tiny_args()
    model = prepare(Model(args).eval(), fmt)
    prompt = torch.randint(0, args.vocab_size, (1, 7))
    new = torch.randint(0, args.vocab_size, (1, 4))
    slots = torch.tensor([0])
    with torch.no_grad():
        def prefilled():
            c = KVCache(model.kv_specs(), n_slots=1, max_len=32, dtype=cache_dtype)
            model(prompt, torch.arange(7)[None], c, slots)
            return c
        c1 = prefilled()
        many = model(new, torch.arange(7, 11)[None], c1, slots).logits
        c2 = prefilled()
        single = torch.cat([model(new[:, i:i + 1], torch.tensor([[7 + i]]), c2, slots).logits for i in range(4)],
                           dim=1)
    assert torch.equal(many, single)
    for layer in c1.k:
        assert torch.equal(c1.k[layer][:, :, :11], c2.k[layer][:, :, :11])


@pytest.mark.parametrize("fmt", ["fp32"] + PACKED)
def test_prepared_model_close_to_fp32(fmt):
    args = _tiny_args()
    ref = Model(args).eval()
    model = copy.deepcopy(ref)
    prepare(model, fmt)
    tok = torch.randint(0, args.vocab_size, (2, 6))
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        a = ref(tok, pos, KVCache(ref.kv_specs(), 2, 16)).logits
        b = model(tok, pos, KVCache(model.kv_specs(), 2, 16)).logits
    tol = {"fp32": 1e-6, "bf16": 3e-2, "q8_0": 5e-2, "q8_0x8": 5e-2}[fmt]
    assert ((a - b).norm() / a.norm()).item() < tol
