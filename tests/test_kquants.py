"""GGUF weights of every supported type (kquants.SUPPORTED_TYPES) kept as stored (weight format `native`,
csrc/vnni_gemm.cpp): the parsed values are gguf-py's dequantization bitwise, the VNNI kernel equals its torch reference bitwise and is row-invariant,
and prepare(model, "native") packs exactly the GGUF-loaded linears whose values it can hold."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn as nn

from tandem.kernels import formats_of, kquants, prepare
from tandem.kernels._ext import ext, has_vnni
from tandem.kernels.linear import PackedLinear
from tandem.models.gemma3 import Model
from tests.test_kernels import _tiny_args
from tests.test_row_invariance import assert_rows_invariant

gq = pytest.importorskip("gguf.quants")
needs_vnni = pytest.mark.skipif(ext() is None or not has_vnni(), reason="no VNNI kernels (AVX-512 VNNI) here")
# fp16 scale fields (byte offset in a block, magnitude) of the types gguf-py cannot quantize: random valid blocks
SCALE_AT = {"Q4_K": [(0, 0.002), (2, 0.002)], "Q5_K": [(0, 0.002), (2, 0.002)], "Q6_K": [(208, 0.001)],
            "Q3_K": [(108, 0.002)], "Q2_K": [(80, 0.004), (82, 0.002)], "IQ4_NL": [(0, 0.0002)],
            "IQ4_XS": [(0, 0.0001)]}
QUANTIZED = ("Q8_0", "Q5_0", "Q4_0", "Q4_1", "Q5_1", "BF16", "F16")  # gguf.quants.quantize of random values
SHAPES = {"Q8_0": (100, 96), "Q5_0": (200, 640), "Q4_K": (130, 1024), "Q6_K": (70, 512), "Q4_0": (80, 160),
          "Q4_1": (130, 256), "Q5_1": (70, 96), "Q5_K": (90, 512), "IQ4_NL": (70, 128), "IQ4_XS": (66, 512),
          "Q3_K": (100, 256), "Q2_K": (64, 512), "BF16": (70, 64), "F16": (100, 96), "F32": (40, 32)}
VNNI_TYPES = sorted(t for t in SHAPES if kquants.GGUF_TYPES[t] in kquants.VNNI)


def random_blocks(qtype: str, N: int, K: int, seed: int = 0) -> np.ndarray:
    """Valid raw GGUF rows uint8 [N, row bytes]: gguf-py's quantization of random values where it has one, else
    random bits with finite fp16 scales of either sign."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZED or qtype == "F32":
        x = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
        return x.view(np.uint8) if qtype == "F32" else gq.quantize(x, gq.GGMLQuantizationType[qtype])
    qk, nbytes = kquants.BLOCK_BYTES[qtype]
    r = rng.integers(0, 256, size=(N, K // qk, nbytes), dtype=np.uint8)
    for off, scale in SCALE_AT[qtype]:
        r[..., off:off + 2] = ((rng.random((N, K // qk)) * 2 - 1) * scale).astype(np.float16).view(np.uint8).reshape(
            N, K // qk, 2)
    return r.reshape(N, -1)


def gguf_values(qtype: str, raw: np.ndarray) -> torch.Tensor:
    if qtype == "F32":
        return torch.from_numpy(raw.view(np.float32).copy())
    return torch.from_numpy(gq.dequantize(raw, gq.GGMLQuantizationType[qtype]).astype(np.float32)).reshape(
        raw.shape[0], -1)


@pytest.mark.parametrize("qtype", VNNI_TYPES)
def test_parse_is_gguf_py_dequantization(qtype):
    N, K = SHAPES[qtype]
    raw = random_blocks(qtype, N, K)
    fmt = kquants.GGUF_TYPES[qtype]
    f = kquants.parse_gguf(qtype, raw, K)
    assert torch.equal(kquants.dequantize(fmt, f), gguf_values(qtype, raw))
    assert kquants.dequantize(fmt, f).abs().max() > 0
    back = kquants.unpack(fmt, kquants.pack(fmt, f), N)  # the panel layout loses nothing
    assert all(torch.equal(f[k], back[k]) for k in f)


@needs_vnni
@pytest.mark.parametrize("qtype", VNNI_TYPES + ["Q5_0-small"])
def test_kernel_is_reference_and_row_invariant(qtype):
    qtype, (N, K) = (qtype, SHAPES[qtype]) if qtype in SHAPES else ("Q5_0", (64, 32))
    raw = random_blocks(qtype, N, K, seed=1)
    w = gguf_values(qtype, raw)
    pl = PackedLinear.from_gguf(qtype, raw, K, expect=w)
    assert pl is not None and pl.fmt == kquants.GGUF_TYPES[qtype]
    assert torch.equal(pl.dequantized_weight(), w)
    x = torch.randn(16, K)
    y = pl(x)
    assert torch.equal(y, pl._reference_vnni(x))  # the same quantized rows, integer dots and fma chain
    orig = x.double() @ w.double().T
    assert ((y.double() - orig).norm() / orig.norm()).item() < 1.5e-2  # the activation rows' int8 rounding
    alone = torch.cat([pl(x[i:i + 1]) for i in range(16)])
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            for M in range(1, 17):
                assert torch.equal(pl(x[:M]), alone[:M]), (t, M)
    finally:
        torch.set_num_threads(threads)
    panels = torch.tensor([(N - 1) // 64, 0])
    full = nn.functional.pad(y, (0, 64 * ((N + 63) // 64) - N))
    assert torch.equal(pl.panels(x, panels), torch.cat([full[:, p * 64:(p + 1) * 64] for p in panels.tolist()], 1))
    idx = torch.tensor([N - 1, 0, 5])
    assert torch.equal(pl.rows(idx), w[idx])
    assert torch.equal(pl.reordered(idx).dequantized_weight(), w[idx])


def test_from_gguf_refuses_values_a_fixup_changed():
    raw = random_blocks("Q5_0", 64, 64)
    w = gguf_values("Q5_0", raw)
    assert PackedLinear.from_gguf("Q5_0", raw, 64, expect=w) is not None
    assert PackedLinear.from_gguf("Q5_0", raw, 64, expect=w.flip(0)) is None
    with pytest.raises(ValueError, match="Q4_K holds rows of whole 256-value blocks, got 64 values"):
        kquants.parse_gguf("Q4_K", raw, 64)


def _gguf_tiny_model():
    """The tiny Gemma 3 with every linear's weight the values of random GGUF blocks (Q4_K / Q6_K where K allows),
    and `gguf_blocks` as the loader leaves them; the MLP width 256 gives down_proj K = 256."""
    torch.manual_seed(0)
    model = Model(replace(_tiny_args(), intermediate_size=256))
    blocks, kinds = {}, {}
    for i, (name, p) in enumerate(model.named_parameters()):
        lin = model.get_submodule(name.rsplit(".", 1)[0])
        if not (isinstance(lin, nn.Linear) and name.endswith("weight")) or name == "lm_head.weight":
            continue
        N, K = p.shape
        qtype = ("Q4_K", "Q6_K")[i % 2] if K % 256 == 0 else ("Q5_0", "Q8_0")[i % 2]
        blocks[name] = (qtype, random_blocks(qtype, N, K, seed=i))
        with torch.no_grad():
            p.copy_(gguf_values(qtype, blocks[name][1]) * (4.0 if qtype == "Q4_K" else 1.0))
        kinds[name] = qtype
    blocks["model.layers.0.mlp.up_proj.weight"] = ("Q5_0", random_blocks("Q5_0", 256, 64, seed=99))  # not its values
    model.gguf_blocks = blocks
    return model, kinds


@needs_vnni
def test_prepare_native_packs_the_gguf_linears_and_stays_row_invariant():
    model, kinds = _gguf_tiny_model()
    prepare(model, "native")
    got = {n: model.get_submodule(n[:-len(".weight")]).fmt for n in kinds}
    for n, qtype in kinds.items():
        # a fix-up's change (the Q4_K x4 here, the substituted up_proj blocks) is caught: that weight is q8_0x8
        changed = qtype == "Q4_K" or n == "model.layers.0.mlp.up_proj.weight"
        assert got[n] == ("q8_0x8" if changed else kquants.GGUF_TYPES[qtype]), n
    assert {"q5_0x8", "q6_kx8"} <= set(formats_of(model)) and model.kernel_format == "native"
    assert not hasattr(model, "gguf_blocks")  # released once packed
    assert_rows_invariant(model, name="gemma3 native")


@needs_vnni
def test_linears_in_one_call_equal_each_forward():
    """kernels.linear.linears (q/k/v, gate/up in one kernel call) == each linear's own forward, bitwise, for mixed
    formats and a bias; non-VNNI linears take their own forwards."""
    from tandem.kernels.linear import linears
    K = 1024
    lins = [PackedLinear.from_gguf(q, random_blocks(q, n, K, seed=n), K) for q, n in
            (("Q5_0", 200), ("Q4_K", 130), ("Q6_K", 70))]
    lins.append(PackedLinear.from_weight(torch.randn(64, K) * 0.05, "q8_0x8", bias=torch.randn(64)))
    x = torch.randn(2, 5, K)
    for group in (lins, lins[1:3], [lins[0], PackedLinear.from_weight(torch.randn(40, K), "bf16")]):
        got = linears(x, *group)
        assert all(torch.equal(g, lin(x)) for g, lin in zip(got, group))


@pytest.mark.skipif(ext() is None, reason="fast CPU kernels unavailable on this machine")
def test_argmax_is_torch_argmax():
    """kernels.argmax: torch.argmax's answer (the first maximum, ties across the thread chunks, NaN rows)."""
    from tandem import kernels
    x = torch.randn(5, 262147)
    x[1, 7] = x[1, 200000] = 100.0  # a tie across chunks: the first wins
    x[2, 131073] = x[2, 131074] = 50.0
    x[3, :] = -torch.inf
    x[4, 9] = torch.nan
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    assert torch.equal(kernels.argmax(x[:4].view(2, 2, -1)), x[:4].argmax(-1).view(2, 2))
    assert torch.equal(kernels.argmax(torch.tensor([[3.0]])), torch.tensor([0]))


@pytest.mark.parametrize("qtype", ["BF16", "F16", "F32"])
def test_float_types_keep_their_values(qtype):
    """A GGUF BF16 / F16 / F32 weight is held as bf16 / f16 / fp32: its values exactly, in a row-invariant float GEMM."""
    N, K = SHAPES[qtype]
    raw = random_blocks(qtype, N, K)
    w = gguf_values(qtype, raw)
    pl = PackedLinear.from_gguf(qtype, raw, K, expect=w)
    assert pl.fmt == kquants.GGUF_TYPES[qtype] and torch.equal(pl.dequantized_weight(), w)
    assert PackedLinear.from_gguf(qtype, raw, K, expect=w + 1) is None
    x = torch.randn(9, K)
    assert torch.equal(pl(x), torch.cat([pl(x[i:i + 1]) for i in range(9)]))
    assert torch.allclose(pl(x), x @ w.T, rtol=1e-4, atol=1e-5)
    idx = torch.tensor([N - 1, 0, 5])
    assert torch.equal(pl.rows(idx), w[idx]) and torch.equal(pl.reordered(idx).dequantized_weight(), w[idx])


def test_unsupported_type_is_one_line():
    msg = kquants.unsupported("blk.0.attn_q.weight", "IQ2_XXS")
    assert "\n" not in msg and "blk.0.attn_q.weight" in msg and "IQ2_XXS" in msg and "Q4_1" in msg
    with pytest.raises(ValueError, match="no kernel format for GGUF type IQ2_XXS; supported: Q8_0"):
        kquants.parse_gguf("IQ2_XXS", np.zeros((1, 66), np.uint8), 256)
