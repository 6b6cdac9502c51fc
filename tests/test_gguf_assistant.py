"""Gemma 4 assistant from a GGUF written the way llama.cpp's converter writes it (`gemma4-assistant`).

`convert()` below follows ggml-org/llama.cpp conversion/gemma.py (Gemma4AssistantModel -> Gemma4Model ->
Gemma3Model -> TextModel) on a transformers `save_pretrained` directory: the metadata keys and value types those
classes write, gguf-py's tensor names for MODEL_ARCH.GEMMA4_ASSISTANT, no norm offset (Gemma4 norm_shift 0),
`layer_scalar` -> `blk.N.layer_output_scale.weight`, the generated `rope_freqs.weight`, and the centroid head
(`masked_embedding.*`) skipped. `keep_masked=True` writes the centroid head under the names llama.cpp's loader
accepts (`masked_embd_centroids.weight`, `masked_embd_ordering`), as other tools' files carry it.
"""

import json
from types import SimpleNamespace

import gguf
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from test_gemma4_assistant import (ASSIST, TARGET, TOL, F, S, V, _cache_from_hf,  # noqa: E402,F401
                                   _hf_all_shared_patch, _hf_prefix, _randomize, make_target)
from transformers.models.gemma4_assistant import (Gemma4AssistantConfig,  # noqa: E402
                                                  Gemma4AssistantForCausalLM)

from tandem.config import SamplingParams, SpecConfig  # noqa: E402
from tandem.engine import Engine  # noqa: E402
from tandem.errors import ModelLoadError  # noqa: E402
from tandem.loading import load  # noqa: E402
from tandem.models import gemma4  # noqa: E402
from tandem.spec import MTPAssistantDrafter, load_drafter, set_tracer  # noqa: E402

ARCH = "gemma4-assistant"
# gguf-py tensor_mapping.py / constants.py (MODEL_ARCH.GEMMA4_ASSISTANT): HF name -> GGUF name
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "pre_projection.weight": "nextn.pre_projection.weight",
           "post_projection.weight": "nextn.post_projection.weight",
           "masked_embedding.centroids.weight": "masked_embd_centroids.weight",
           "masked_embedding.token_ordering": "masked_embd_ordering"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
          "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "post_attention_layernorm.weight": "post_attention_norm.weight",
          "pre_feedforward_layernorm.weight": "ffn_norm.weight",
          "post_feedforward_layernorm.weight": "post_ffw_norm.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
          "layer_scalar.weight": "layer_output_scale.weight"}


def _gguf_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, i, leaf = hf.split(".", 3)
    return f"blk.{i}.{_LAYER[leaf]}"


def convert(hf_dir, out, outtype="f32", keep_masked=False, drop=(), meta=None):
    """The GGUF llama.cpp's convert_hf_to_gguf.py writes for an assistant directory (see the module docstring)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    hp = {**cfg, **cfg["text_config"]}  # ModelBase moves text_config to the root level
    n, types = hp["num_hidden_layers"], hp["layer_types"]
    swa = [t == S for t in types]
    plc = {int(i): c for i, c in (hp.get("per_layer_config") or {}).items()}
    hd_full = hp.get("global_head_dim") or next(c["head_dim"] for i, c in plc.items() if types[i] == F)
    hd_swa, rp = hp["head_dim"], hp["rope_parameters"]
    kv_full = hp.get("num_global_key_value_heads") or next(
        (c["num_key_value_heads"] for i, c in plc.items() if types[i] == F and "num_key_value_heads" in c), None)
    u32, f32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    kvs = {  # final values after TextModel, Gemma3Model, Gemma4Model, Gemma4AssistantModel.set_gguf_parameters
        "block_count": (n, u32), "context_length": (hp["max_position_embeddings"], u32),
        "embedding_length": (hp["hidden_size"], u32), "feed_forward_length": (hp["intermediate_size"], u32),
        "attention.head_count": (hp["num_attention_heads"], u32),
        "attention.head_count_kv": ([hp["num_key_value_heads"] if s else kv_full for s in swa] if kv_full
                                    else hp["num_key_value_heads"], u32),
        "rope.freq_base": (rp[F]["rope_theta"], f32), "rope.freq_base_swa": (rp[S]["rope_theta"], f32),
        "attention.layer_norm_rms_epsilon": (hp["rms_norm_eps"], f32),
        "attention.key_length": (hd_full, u32), "attention.value_length": (hd_full, u32),
        "attention.sliding_window": (hp["sliding_window"], u32),
        "attention.shared_kv_layers": (hp["num_kv_shared_layers"], u32),
        "embedding_length_per_layer_input": (hp.get("hidden_size_per_layer_input") or 0, u32),
        "attention.sliding_window_pattern": (swa, None),
        "attention.key_length_swa": (hd_swa, u32), "attention.value_length_swa": (hd_swa, u32),
        "rope.dimension_count": (hd_full, u32), "rope.dimension_count_swa": (hd_swa, u32),
        "embedding_length_out": (hp["backbone_hidden_size"], u32), "nextn_predict_layers": (n, u32),
    }
    if hp.get("final_logit_softcapping"):
        kvs["final_logit_softcapping"] = (hp["final_logit_softcapping"], f32)
    kvs.update(meta or {})
    w = gguf.GGUFWriter(str(out), ARCH)
    for k, (v, vt) in kvs.items():
        if v is None:
            continue
        if isinstance(v, list):
            w.add_array(f"{ARCH}.{k}", v)
        else:
            w.add_key_value(f"{ARCH}.{k}", v, vt)
    w.add_file_type(1 if outtype == "f16" else 0)
    w.add_tokenizer_model("gemma4")
    w.add_token_list([f"<t{i}>" for i in range(hp["vocab_size"])])
    w.add_token_scores([0.0] * hp["vocab_size"])
    w.add_token_types([1] * hp["vocab_size"])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.add_add_bos_token(True)
    # Gemma4Model.generate_extra_tensors: freq factors of the full layers' proportional RoPE
    rot = int(hd_full * rp[F]["partial_rotary_factor"] / 2)
    tensors = {"rope_freqs.weight": np.array([1.0] * rot + [1e30] * (hd_full // 2 - rot), dtype=np.float32)}
    for name, t in load_file(str(hf_dir / "model.safetensors")).items():
        if "masked_embedding" in name and not keep_masked:
            continue  # Gemma4AssistantModel.filter_tensors
        if name.endswith("layer_scalar"):
            name += ".weight"  # Gemma4Model.filter_tensors
        arr = t.numpy()
        if arr.dtype != np.int64:
            arr = arr.astype(np.float16 if outtype == "f16" and arr.ndim == 2 else np.float32)
        tensors[_gguf_name(name)] = arr
    for name, arr in tensors.items():
        if name not in drop:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def hf_assistant(centroids=False, seed=1, backbone=TARGET["hidden_size"], **text):
    """A tiny random HF assistant; the centroid head uses top-k 32 (HF's default, which a GGUF cannot store)."""
    extra = dict(use_ordered_embeddings=True, num_centroids=64, centroid_intermediate_top_k=32) if centroids else {}
    cfg = Gemma4AssistantConfig(text_config={**ASSIST, **text}, backbone_hidden_size=backbone, **extra)
    cfg.text_config._attn_implementation = "eager"
    hf = _randomize(Gemma4AssistantForCausalLM(cfg).eval(), seed)
    if centroids:
        hf.masked_embedding.token_ordering.copy_(torch.randperm(V, generator=torch.Generator().manual_seed(seed)))
    return hf


def write(tmp_path, hf, name="assistant.gguf", **kw):
    d = tmp_path / (name + ".hf")
    hf.save_pretrained(d)
    return d, convert(d, tmp_path / name, **kw)


@pytest.fixture(scope="module")
def target():
    return make_target()


def _steps(hf_t, ours_t, hf_a, ours_a, n=7, steps=3):
    """`steps` chained assistant steps from a prefix of n tokens: max |logits diff|, max |hidden diff|, tokens."""
    ids = torch.randint(0, V, (n + 1,), generator=torch.Generator().manual_seed(n)).tolist()
    hidden, kv = _hf_prefix(hf_t, ids[:n])
    cache = _cache_from_hf(ours_t, kv, n)
    h_hf = h_ours = hidden[:, -1:]
    tok_hf = tok_ours = torch.tensor([[ids[n]]])
    emb, dl, dh, toks = hf_t.get_input_embeddings(), 0.0, 0.0, []
    for _ in range(steps):
        with torch.no_grad():
            o_hf = hf_a(inputs_embeds=torch.cat([emb(tok_hf), h_hf], -1), position_ids=torch.tensor([[n]]),
                        shared_kv_states={k: (a[:, :, :n], b[:, :, :n]) for k, (a, b) in kv.items()})
            o = ours_a(torch.cat([ours_t.embed(tok_ours), h_ours], -1), torch.tensor([[n]]), cache)
        dl = max(dl, float((o.logits - o_hf.logits.float()).abs().max()))
        dh = max(dh, float((o.hidden - o_hf.last_hidden_state).abs().max()))
        tok_hf, tok_ours = o_hf.logits.argmax(-1), o.logits.argmax(-1)
        assert torch.equal(tok_hf, tok_ours)
        toks.append(int(tok_ours))
        h_hf, h_ours = o_hf.last_hidden_state, o.hidden
    return dl, dh, toks


def _drafts(ours_t, assistant, n_max=3):
    """Every round's (position, draft) of greedy speculative runs with `assistant` drafting for our target."""
    eng = Engine(ours_t, max_len=64, drafter=MTPAssistantDrafter(assistant, ours_t), spec=SpecConfig(n_max=n_max))
    events = []
    set_tracer(events.append)
    try:
        for seed in range(3):
            g = torch.Generator().manual_seed(seed)
            prompt = torch.randint(0, V, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            eng.complete(prompt, SamplingParams(max_tokens=16, ignore_eos=True))
    finally:
        set_tracer(None)
    return [(e["pos"], e["tokens"]) for e in events if e["event"] == "draft"]


@pytest.mark.parametrize("centroids", [False, True], ids=["tied_head", "centroid_head"])
def test_gguf_assistant_matches_hf_and_hf_dir(target, tmp_path, centroids):
    hf_t, ours_t = target
    hf_a = hf_assistant(centroids)
    d, path = write(tmp_path, hf_a, keep_masked=centroids)
    got = load(path)
    assert got.kind == "gguf" and got.tokenizer is None  # the drafter reads the target's tokens
    want, have = hf_a.config.to_dict(), Gemma4AssistantConfig.from_dict(got.config).to_dict()
    for c in (want, have):
        c.pop("dtype", None)
    assert have == want  # the GGUF metadata gives back the HF config
    a = got.model.bind(ours_t, "tiny-gemma4", str(path))
    assert a.args.use_ordered_embeddings == centroids and a.args.backbone_hidden_size == TARGET["hidden_size"]
    assert a.args.layer_types == ASSIST["layer_types"] and a.args.sliding_window == ASSIST["sliding_window"]
    assert [a.args.attn_dims(i) for i in range(3)] == [(2, 16), (2, 32), (2, 32)]
    assert a.args.rope_parameters[F]["partial_rotary_factor"] == 0.25
    for n in (3, 7):
        dl, dh, _ = _steps(hf_t, ours_t, hf_a, a, n=n)
        assert dl < TOL and dh < TOL, (n, dl, dh)
    ref = load(d).model  # the same assistant from its HF directory
    ref_sd = ref.state_dict()
    for k, v in a.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k
    drafts = _drafts(ours_t, a)
    assert len(drafts) > 5 and drafts == _drafts(ours_t, ref)


def test_converter_output_drops_centroid_head(target, tmp_path):
    """The stock converter skips masked_embedding.*: the file is the dense-head assistant llama.cpp runs."""
    hf_t, ours_t = target
    hf_a = hf_assistant(centroids=True)
    _, path = write(tmp_path, hf_a)
    a = load(path).model.bind(ours_t)
    assert a.masked_embedding is None
    dense = hf_assistant(centroids=False)
    missing, unexpected = dense.load_state_dict(hf_a.state_dict(), strict=False)
    assert not missing and all(k.startswith("masked_embedding.") for k in unexpected)
    dl, dh, _ = _steps(hf_t, ours_t, dense, a)
    assert dl < TOL and dh < TOL


def test_f16_gguf_holds_f16_rounded_weights(tmp_path):
    hf_a = hf_assistant()
    _, path = write(tmp_path, hf_a, outtype="f16")
    sd = load(path).model.state_dict()
    for k, v in hf_a.state_dict().items():
        if "rotary_emb" in k:
            continue
        want = v.half().float() if v.dim() == 2 else v
        assert torch.equal(sd[k], want), k


def test_load_drafter_from_gguf(target, tmp_path):
    hf_t, ours_t = target
    hf_a = hf_assistant(centroids=True)
    _, path = write(tmp_path, hf_a, keep_masked=True)
    d = load_drafter(str(path), target=ours_t, target_loaded=SimpleNamespace(path="models/tiny-gemma4"),
                     weight_format="fp32")
    assert isinstance(d, MTPAssistantDrafter)
    dl, dh, _ = _steps(hf_t, ours_t, hf_a, d.assistant)
    assert dl < TOL and dh < TOL


@pytest.mark.parametrize("kw,msg", [
    (dict(backbone=40), "backbone_hidden_size 40 != target hidden_size 48"),
    (dict(vocab_size=96), "vocab_size 96 != target vocab_size 64"),
    (dict(head_dim=8), "sliding_attention: assistant head_dim 8 != target layer 3"),
    (dict(num_attention_heads=3), "not a multiple of target layer"),
])
def test_mismatched_target_names_both_files(target, tmp_path, kw, msg):
    _, ours_t = target
    _, path = write(tmp_path, hf_assistant(**kw))
    with pytest.raises(ModelLoadError) as e:
        load_drafter(str(path), target=ours_t, target_loaded=SimpleNamespace(path="models/tiny-gemma4.gguf"),
                     weight_format="fp32")
    assert str(path) in str(e.value) and "models/tiny-gemma4.gguf" in str(e.value), str(e.value)
    assert msg in str(e.value), str(e.value)


def test_target_without_sliding_layers(tmp_path):
    t = gemma4.Model(gemma4.ModelArgs.from_dict({**TARGET, "layer_types": [F] * 6, "num_kv_shared_layers": 0}))
    _, path = write(tmp_path, hf_assistant())
    with pytest.raises(ModelLoadError) as e:
        load_drafter(str(path), target=t, target_loaded=SimpleNamespace(path="all-full.gguf"), weight_format="fp32")
    assert str(path) in str(e.value) and "all-full.gguf" in str(e.value)
    assert "no cache-owning sliding_attention layer" in str(e.value), str(e.value)


@pytest.mark.parametrize("kw,needle", [
    (dict(drop={"blk.1.attn_q.weight"}), "blk.1.attn_q.weight"),
    (dict(drop={"token_embd.weight"}), "token_embd.weight"),
    (dict(drop={"nextn.pre_projection.weight"}), "nextn.pre_projection.weight"),
    (dict(drop={"rope_freqs.weight"}), "rope_freqs.weight"),
    (dict(keep_masked=True, drop={"masked_embd_ordering"}), "masked_embd_ordering"),
    (dict(meta={"embedding_length_out": (None, None)}), "gemma4-assistant.embedding_length_out"),
    (dict(meta={"attention.key_length_swa": (None, None)}), "gemma4-assistant.attention.key_length_swa"),
    (dict(meta={"nextn_predict_layers": (2, gguf.GGUFValueType.UINT32)}), "nextn_predict_layers 2 != block_count 3"),
])
def test_broken_gguf_names_file_and_what_is_missing(tmp_path, kw, needle):
    centroids = kw.get("keep_masked", False)
    _, path = write(tmp_path, hf_assistant(centroids=centroids), **kw)
    with pytest.raises(ModelLoadError) as e:
        load(path)
    assert str(path) in str(e.value) and needle in str(e.value), str(e.value)
