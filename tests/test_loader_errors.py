"""Malformed model files (issue #15 item 8): each is ONE line naming the file, the field or tensor, expected vs
got, raised before anything is built or allocated: wrong config types, absurd sizes, special-token ids beyond the
vocabulary, integer weights, truncated safetensors / GGUF, mismatched dims, drafter directories with bad JSON."""

import json
import shutil

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

import tandem.models
from tandem.errors import ModelLoadError
from tandem.loading import load
from tests.test_loading import _tiny_transformers_model, write_tiny_gguf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "tiny"
    _tiny_transformers_model().save_pretrained(str(d))
    return d


@pytest.fixture
def no_build(monkeypatch):
    """Building the model (the first allocation) must not be reached."""
    def refuse(cfg):
        raise AssertionError("the model was built from a config that should have been refused")
    monkeypatch.setattr(tandem.models, "build", refuse)


def variant(hf_dir, tmp_path, config=None, **files):
    d = tmp_path / "variant"
    shutil.copytree(hf_dir, d)
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps(cfg))
    for name, text in files.items():
        (d / name.replace("__", ".")).write_text(text)
    return d


def one_line_error(path, *needles):
    with pytest.raises(ModelLoadError) as ei:
        load(str(path), tokenizer_cache=False)
    msg = str(ei.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("field,value,needles", [
    ("hidden_size", "64", ("'hidden_size'", "integer", "str")),
    ("num_hidden_layers", 2.5, ("'num_hidden_layers'", "integer", "float")),
    ("vocab_size", 10 ** 12, ("'vocab_size'", "1000000000000", "outside")),
    ("hidden_size", 10 ** 9, ("'hidden_size'", "outside")),
    ("num_attention_heads", 0, ("'num_attention_heads'", "outside")),
    ("rms_norm_eps", "1e-6", ("'rms_norm_eps'", "number")),
    ("eos_token_id", 10 ** 6, ("'eos_token_id'", "vocabulary")),
    ("bos_token_id", [2, -3], ("'bos_token_id'", "-3", "vocabulary")),
])
def test_bad_config_refused_before_building(hf_dir, tmp_path, no_build, field, value, needles):
    d = variant(hf_dir, tmp_path, {field: value})
    one_line_error(d, "config.json", *needles)


def test_generation_config_eos_beyond_vocab(hf_dir, tmp_path):
    from tandem.loading import hf
    d = variant(hf_dir, tmp_path, generation_config__json=json.dumps({"eos_token_id": [1, 400]}))
    (d / "tokenizer.json").write_text("{}")  # read_tokenizer reads generation_config only beside a tokenizer
    with pytest.raises(ModelLoadError, match=r"generation_config.json: field 'eos_token_id' = 400 is outside"):
        hf.read_tokenizer(d, hf.read_config(d))


@pytest.mark.parametrize("name", ["tokenizer_config.json", "generation_config.json"])
def test_bad_json_side_files(hf_dir, tmp_path, name):
    d = variant(hf_dir, tmp_path, **{name.replace(".", "__"): "{oops"})
    (d / "tokenizer.json").write_text("{}")
    one_line_error(d, name, "invalid JSON")


def test_integer_weight_tensor(hf_dir, tmp_path):
    d = variant(hf_dir, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"].to(torch.int32)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    one_line_error(d, "model.layers.0.mlp.up_proj.weight", "torch.float32", "torch.int32")


def test_mismatched_dims_before_load_state_dict(hf_dir, tmp_path, monkeypatch):
    d = variant(hf_dir, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setattr(torch.nn.Module, "load_state_dict",
                        lambda *a, **k: pytest.fail("load_state_dict reached with a mismatched tensor"))
    one_line_error(d, "model.layers.1.self_attn.k_proj.weight", "expected (32, 64)", "got (16, 64)")


@pytest.mark.parametrize("frac", [0.001, 0.5, 0.99])
def test_truncated_safetensors(hf_dir, tmp_path, frac):
    d = variant(hf_dir, tmp_path)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:int(len(data) * frac)])
    one_line_error(d, "model.safetensors")


def _gguf_with(tmp_path, **meta):
    """The tiny GGUF with extra/overriding metadata written after the standard keys ((None, None): removed)."""
    p = tmp_path / "m.gguf"
    orig = gguf.GGUFWriter.write_header_to_file

    def patched(self, *a, **k):
        for key, (kind, v) in meta.items():
            self.kv_data[0].pop(key, None)
            if kind is not None:  # None: the key is left out
                getattr(self, f"add_{kind}")(key, v)
        return orig(self, *a, **k)

    gguf.GGUFWriter.write_header_to_file = patched
    try:
        write_tiny_gguf(p)
    finally:
        gguf.GGUFWriter.write_header_to_file = orig
    return p


@pytest.mark.parametrize("meta,needles", [
    ({"gemma3.embedding_length": ("string", "64")}, ("'hidden_size'", "integer", "str")),
    ({"gemma3.block_count": ("uint64", 10 ** 9)}, ("'num_hidden_layers'", "outside")),
    ({"tokenizer.ggml.eos_token_id": ("uint32", 100000)}, ("'eos_token_id'", "vocabulary")),
    # issue 24: a string / 2^40 block_count (2^40 once allocated 7.7 GB of layer names), no head-dim key
    ({"gemma3.block_count": ("string", "3")}, ("'gemma3.block_count'", "integer", "str")),
    ({"gemma3.block_count": ("uint64", 2 ** 40)}, ("'gemma3.block_count'", "1099511627776", "outside")),
    ({"gemma3.attention.key_length": (None, None)}, ("'gemma3.attention.key_length'", "lacks")),
    ({"gemma3.embedding_length": (None, None)}, ("'gemma3.embedding_length'", "lacks")),
    ({"gemma3.attention.sliding_window": ("string", "x")}, ("'gemma3.attention.sliding_window'", "integer")),
    ({"gemma3.rope.freq_base": ("string", "x")}, ("'gemma3.rope.freq_base'", "number")),
    ({"tokenizer.ggml.bos_token_id": ("string", "2")}, ("'bos_token_id'", "integer", "str")),
    ({"tokenizer.ggml.tokens": ("array", [1, 2, 3])}, ("'tokenizer.ggml.tokens'", "strings", "int")),
    ({"tokenizer.chat_template": ("uint32", 1)}, ("'tokenizer.chat_template'", "string", "int")),
    ({"split.count": ("uint16", 2), "split.no": ("uint16", 0)}, ("shard 1", "split", "merge")),
])
def test_bad_gguf_metadata(tmp_path, no_build, meta, needles):
    one_line_error(_gguf_with(tmp_path, **meta), "m.gguf", *needles)


def test_truncated_gguf_one_line(tmp_path):
    p = tmp_path / "t.gguf"
    write_tiny_gguf(p)
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    one_line_error(p, "t.gguf", "truncated")


@pytest.mark.parametrize("text,needles", [
    ("{broken", ("invalid JSON",)),
    (json.dumps({"tandem": "yes"}), ("'tandem'", "object", "str")),
])
def test_drafter_dir_bad_json(tmp_path, text, needles):
    from tandem.spec import load_drafter
    d = tmp_path / "drafter"
    d.mkdir()
    (d / "config.json").write_text(text)
    with pytest.raises(ModelLoadError) as ei:
        load_drafter(str(d), target=None)
    msg = str(ei.value)
    assert "config.json" in msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg
