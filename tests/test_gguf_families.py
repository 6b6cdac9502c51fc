"""GGUF archs llama / qwen2 / qwen3 / qwen3moe from files written the way llama.cpp's converter writes them.

`convert()` follows ggml-org/llama.cpp conversion/base.py (TextModel.set_gguf_parameters), conversion/llama.py
(LlamaModel: vocab_size + rope.dimension_count, q/k rows permuted with n_head / n_head_kv, llama3 RoPE only as the
generated `rope_freqs.weight`) and conversion/qwen.py (no permutation; qwen3moe experts stacked into
`ffn_{gate,up,down}_exps`), with gguf-py's tensor names. The oracle is transformers 5.23 on the same random weights.
"""

import math

import gguf
import numpy as np
import pytest
import torch
from tokenizers import pre_tokenizers

from tandem.errors import ModelLoadError
from tandem.loading import load
from tandem.loading.gguf import GGUFFile

transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType

# a tiny byte-level BPE vocabulary: the 256 byte symbols, a few merges, three control tokens
_MERGES = ["h e", "l l", "Ġ w", "o r", "Ġw or", "he ll", "hell o", "Ġ t", "Ġt he"]
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + \
    [m.replace(" ", "") for m in _MERGES]
V = len(TOKENS)

BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, attn_implementation="eager")
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CASES = {  # name -> (GGUF arch, transformers config class, config overrides)
    "llama3": ("llama", "LlamaConfig", dict(rope_parameters=LLAMA3, tie_word_embeddings=True)),
    "llama_linear": ("llama", "LlamaConfig", dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0,
                                                                   "factor": 2.0}, tie_word_embeddings=False)),
    "qwen2": ("qwen2", "Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                           tie_word_embeddings=True)),
    "qwen3": ("qwen3", "Qwen3Config", dict(head_dim=24, tie_word_embeddings=False)),
    "qwen3moe": ("qwen3moe", "Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                    moe_intermediate_size=32, norm_topk_prob=True,
                                                    tie_word_embeddings=False)),
}

_LAYER = {  # HF leaf inside model.layers.N -> GGUF leaf (gguf-py tensor_mapping.py)
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight", "mlp.experts.gate_proj": "ffn_gate_exps.weight",
    "mlp.experts.up_proj": "ffn_up_exps.weight", "mlp.experts.down_proj": "ffn_down_exps.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}


def permute(w: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """conversion/llama.py LlamaModel.permute, verbatim in behaviour."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_freqs(rp: dict, dim: int) -> torch.Tensor:
    """conversion/llama.py LlamaModel.generate_extra_tensors (old_context_len from the top-level hparams: 8192)."""
    freqs = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi, old = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"], 8192
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / hi:
            out.append(1)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(out, dtype=torch.float32)


def make_hf(case: str, seed: int = 0, **over):
    arch, cls, kw = CASES[case]
    cfg = getattr(transformers, cls)(**{**BASE, **kw, **over})
    model = getattr(transformers, cls.replace("Config", "ForCausalLM"))(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "norm" in n else 0.1) + (1.0 if "norm" in n else 0))
    return model.eval()


def _checkpoint_tensors(model) -> dict[str, torch.Tensor]:
    """The HF checkpoint's tensors as the converter sees them (experts per projection, stacked: [E, I, D])."""
    sd = dict(model.state_dict())
    for k in [k for k in sd if k.endswith("mlp.experts.gate_up_proj")]:
        gate, up = sd.pop(k).chunk(2, dim=1)
        sd[k.replace("gate_up_proj", "gate_proj")], sd[k.replace("gate_up_proj", "up_proj")] = gate, up
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


def _write(w: gguf.GGUFWriter, name: str, t: np.ndarray, qtype) -> None:
    if qtype in (None, Q.F32):
        w.add_tensor(name, t.astype(np.float32))
    else:
        w.add_tensor(name, gguf.quants.quantize(t.astype(np.float32), qtype), raw_dtype=qtype)


def convert(model, case: str, path, qtypes=None, pre="qwen2", drop=(), meta=None):
    """The GGUF convert_hf_to_gguf.py writes for `model` (see the module docstring); returns the GGUF tensors."""
    arch, c = CASES[case][0], model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    hd = getattr(c, "head_dim", None)
    if hd is not None:  # TextModel writes key/value_length only when config.json has head_dim
        w.add_key_length(hd)
        w.add_value_length(hd)
    hd = hd or c.hidden_size // c.num_attention_heads
    if arch == "qwen3moe":
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if arch == "llama":
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(hd)
    if c.rope_parameters["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_parameters["factor"])
    for k, v in (meta or {}).items():
        w.add_uint32(f"{arch}.{k}", v)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (V - 3))
    w.add_token_merges(_MERGES)
    w.add_bos_token_id(0)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    out = {}
    if c.rope_parameters["rope_type"] == "llama3":
        out["rope_freqs.weight"] = llama3_rope_freqs(c.rope_parameters, hd)
    for name, t in _checkpoint_tensors(model).items():
        if arch == "llama" and ".q_proj." in name:
            t = permute(t, c.num_attention_heads, c.num_attention_heads)
        if arch == "llama" and ".k_proj." in name:
            t = permute(t, c.num_attention_heads, c.num_key_value_heads)
        if name in _GLOBAL:
            g = _GLOBAL[name]
        else:
            _, _, i, leaf = name.split(".", 3)
            g = f"blk.{i}.{_LAYER[leaf]}"
        out[g] = t
    for g, t in out.items():
        if g not in drop:
            _write(w, g, t.detach().numpy(), (qtypes or {}).get(g))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _our_logits(model, ids):
    cache = model.make_cache(1, len(ids), k_type="fp32")
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None], cache).logits[0]


IDS = [5, 17, 99, 3, 250, 7, 7, 31, 120, 64, 200, 260, 11]


@pytest.mark.parametrize("case", sorted(CASES))
def test_gguf_matches_transformers(tmp_path, case):
    ref = make_hf(case)
    p = tmp_path / f"{case}.gguf"
    convert(ref, case, p)
    m = load(str(p), tokenizer_cache=False)
    assert m.config["model_type"] == ref.config.model_type
    assert m.config["tie_word_embeddings"] == ref.config.tie_word_embeddings
    mine, theirs = m.model.state_dict(), ref.state_dict()
    assert set(mine) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(mine[k], v), k
    with torch.no_grad():
        want = ref(torch.tensor([IDS])).logits[0]
    got = _our_logits(m.model, IDS)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_llama3_rope_comes_back_as_freq_factors(tmp_path):
    ref = make_hf("llama3")
    p = tmp_path / "l3.gguf"
    written = convert(ref, "llama3", p)
    rp = load(str(p), tokenizer=False).config["rope_parameters"]
    assert rp["rope_type"] == "freq_factors" and rp["rope_theta"] == 500000.0
    assert torch.equal(torch.tensor(rp["freq_factors"]), written["rope_freqs.weight"])
    assert len(set(rp["freq_factors"])) > 2  # factor 1, factor 8 and smoothed ones: the test covers all three


def test_quantized_types_load_as_gguf_dequantizes(tmp_path):
    """Row-quantized weights of a tiny llama: what loads equals gguf.quants.dequantize (q/k after un-permuting)."""
    ref = make_hf("llama_linear")
    kinds = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.F16, Q.BF16]
    leaves = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    qtypes = {f"blk.{i}.{leaf}.weight": kinds[(i + j) % len(kinds)] for i in range(2) for j, leaf in enumerate(leaves)}
    qtypes["token_embd.weight"] = Q.Q8_0
    p = tmp_path / "quant.gguf"
    convert(ref, "llama_linear", p, qtypes=qtypes)
    m = load(str(p), tokenizer=False)
    sd = m.model.state_dict()
    reader = gguf.GGUFReader(str(p))
    c = ref.config
    for t in reader.tensors:
        want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
        want = want.reshape(tuple(int(x) for x in reversed(t.shape)))
        hf = m.config and GGUFFile(p).arch().hf_name(t.name)
        got = sd[hf]
        if t.name.endswith("attn_q.weight"):
            got = permute(got, c.num_attention_heads, c.num_attention_heads)
        if t.name.endswith("attn_k.weight"):
            got = permute(got, c.num_attention_heads, c.num_key_value_heads)
        assert torch.equal(got, want), (t.name, t.tensor_type.name)


# K-quant block layouts (ggml-common.h): byte offsets of the fp16 scales in each 256-value block
_K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}


def _raw_k_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid raw blocks (gguf-py cannot quantize K types): random quants and sub-scales, finite fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    for off in _K_SCALES[qtype]:
        raw[..., off:off + 2] = rng.uniform(1e-3, 2e-2, size=raw.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return raw.reshape(rows, -1)


def test_k_quants_read_as_gguf_dequantizes(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "kq.gguf"
    w = gguf.GGUFWriter(str(p), "llama")
    raws = {}
    for qt in _K_SCALES:
        raws[qt] = _raw_k_blocks(qt, 3, 512, rng)
        w.add_tensor(f"t.{qt.name}", raws[qt], raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = GGUFFile(p)
    for qt, raw in raws.items():
        got = f.read(f"t.{qt.name}")
        want = torch.from_numpy(gguf.quants.dequantize(raw, qt).astype(np.float32))
        assert got.shape == (3, 512) and torch.isfinite(got).all() and got.abs().sum() > 0, qt.name
        assert torch.equal(got, want), qt.name


def test_tokenizer_and_template_from_gguf(tmp_path):
    from transformers import AutoTokenizer
    ref = make_hf("qwen2")
    for pre in ("qwen2", "llama-bpe", "smollm", "gpt2"):
        p = tmp_path / pre / "m.gguf"
        p.parent.mkdir()
        convert(ref, "qwen2", p, pre=pre)
        m = load(str(p), tokenizer_cache=False)
        theirs = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        for text in ["hello world", "the  hello\n\nworld 123 4567", "<|im_start|>user\nhello<|im_end|>", "héllo ✓ 😀",
                     "   "]:
            ids = m.tokenizer.encode(text)
            assert ids == theirs.encode(text), (pre, text)
            assert m.tokenizer.decode(ids) == theirs.decode(ids)
        assert m.tokenizer.eos_ids == [2] and m.tokenizer.bos_id == 0 and not m.tokenizer.add_bos
    from tandem.chat import template_for
    out = template_for(m, m.tokenizer).render([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_unknown_pre_tokenizer_is_a_clear_error(tmp_path):
    p = tmp_path / "pre.gguf"
    convert(make_hf("qwen2"), "qwen2", p, pre="no-such-pre")
    with pytest.raises(ModelLoadError, match=r"pre.gguf: unsupported tokenizer.ggml.pre 'no-such-pre'"):
        load(str(p), tokenizer_cache=False)


@pytest.mark.parametrize("what", ["missing", "shape", "experts_in_llama", "partial_rope"])
def test_errors_name_file_and_tensor(tmp_path, what):
    p = tmp_path / f"{what}.gguf"
    if what == "missing":
        convert(make_hf("qwen3"), "qwen3", p, drop={"blk.1.attn_k_norm.weight"})
        needles = ["missing tensor", "blk.1.attn_k_norm.weight", "'qwen3'"]
    elif what == "shape":  # the file says 3 KV heads, the tensors hold 2
        convert(make_hf("qwen2", num_key_value_heads=2), "qwen2", p, meta={"attention.head_count_kv": 4})
        needles = ["blk.0.attn_k.weight", "expected (64, 64), got (32, 64)"]
    elif what == "experts_in_llama":
        convert(make_hf("llama3"), "llama3", p, meta={"expert_count": 8})
        needles = ["'llama' with experts"]
    else:
        convert(make_hf("llama3"), "llama3", p, meta={"rope.dimension_count": 8})
        needles = ["llama.rope.dimension_count = 8 but the head dim is 16"]
    with pytest.raises(ModelLoadError) as ei:
        load(str(p), tokenizer_cache=False)
    for n in [p.name, *needles]:
        assert n in str(ei.value), str(ei.value)
