"""GGUF -> kernel formats one tensor at a time (tandem.loading.stream): the same model, bitwise, as loading the
whole fp32 state dict and calling kernels.prepare; no parameter left on the meta device; an untied embedding kept
as its blocks; a type the native kernels lack is one line naming the tensor and the type."""

import gguf
import pytest
import torch

from tandem import kernels
from tandem.errors import ModelLoadError
from tandem.kernels._ext import has_vnni
from tandem.loading import load
from tandem.loading import stream
from tandem.loading.stream import GGUFEmbedding
from tests.test_loading import write_tiny_gguf

Q = gguf.GGMLQuantizationType
QTYPES = {"token_embd.weight": Q.Q8_0, "output.weight": Q.Q5_0, "blk.0.attn_q.weight": Q.Q8_0,
          "blk.0.attn_k.weight": Q.Q5_0, "blk.1.ffn_up.weight": Q.F16, "blk.2.ffn_down.weight": Q.Q8_0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    p = tmp_path_factory.mktemp("stream") / "tiny.gguf"
    write_tiny_gguf(p, qtypes=QTYPES, with_lm_head=True)
    return p


def _logits(model, tokens):
    cache = model.make_cache(1, 32, k_type="f32", v_type="f32")
    with torch.no_grad():
        return model(tokens[None], torch.arange(len(tokens))[None], cache).logits


@pytest.mark.parametrize("fmt", ["native", "q8_0x8", "bf16", "fp32"])
def test_streamed_equals_fp32_then_prepare(tiny, fmt, monkeypatch):
    if fmt == "native" and not has_vnni():
        pytest.skip("native needs AVX-512 VNNI")
    monkeypatch.setattr(stream, "CHUNK", 64)  # the 300-row head packs in 5 chunks, the last a partial panel
    streamed = load(str(tiny), weight_format=fmt, tokenizer=False).model
    ref = kernels.prepare(load(str(tiny), tokenizer=False).model, fmt)
    assert not [n for n, p in streamed.named_parameters() if p.device.type == "meta"]
    assert streamed.kernel_format == fmt and kernels.formats_of(streamed) == kernels.formats_of(ref)
    if fmt != "fp32":
        assert isinstance(streamed.model.embed_tokens, GGUFEmbedding)  # untied: the Q8_0 blocks, not an fp32 table
    tokens = torch.tensor([2, 270, 271, 280, 5, 9, 100])
    assert torch.equal(_logits(streamed, tokens), _logits(ref, tokens))
    sb, rb = dict(streamed.named_buffers()), dict(ref.named_buffers())
    for name, b in rb.items():
        if name in sb:
            assert torch.equal(sb[name], b), name


def test_embedding_rows_are_the_reference_values(tiny):
    streamed = load(str(tiny), weight_format="q8_0x8", tokenizer=False).model
    ref = load(str(tiny), tokenizer=False).model
    ids = torch.tensor([[0, 5, 283], [7, 7, 1]])
    assert torch.equal(streamed.model.embed_tokens(ids), ref.model.embed_tokens(ids))
    with pytest.raises(IndexError, match="outside the embedding table"):
        streamed.model.embed_tokens(torch.tensor([10 ** 6]))


@pytest.mark.skipif(not has_vnni(), reason="native needs AVX-512 VNNI")
def test_type_the_native_kernels_lack_is_one_line(tmp_path, monkeypatch):
    p = tmp_path / "iq.gguf"
    write_tiny_gguf(p, qtypes={"blk.1.attn_v.weight": Q.Q4_1})
    from tandem.kernels import kquants
    monkeypatch.delitem(kquants.GGUF_TYPES, "Q4_1")  # every type gguf-py writes is native: take one away
    with pytest.raises(ModelLoadError) as ei:
        load(str(p), weight_format="native", tokenizer=False)
    msg = str(ei.value)
    assert "\n" not in msg and "'blk.1.attn_v.weight'" in msg and "Q4_1" in msg and "iq.gguf" in msg, msg
    m = load(str(p), weight_format="q8_0x8", tokenizer=False).model  # the way out the message names
    assert m.model.layers[1].self_attn.v_proj.fmt == "q8_0x8"
