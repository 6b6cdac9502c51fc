"""`tandem export-assistant` (assistant_io.export_for_transformers) -> transformers' Gemma4AssistantForCausalLM.

Tiny random models, fp32. A tandem-trained-style drafter (assistant_config + build_assistant, weights perturbed away
from their structured init, a random token_ordering for the centroid head) is saved with assistant_io.save (bf16,
no embedding table, `tandem.shared_target_embeddings` in config.json), exported against a tiny target saved with
save_pretrained, and loaded with Gemma4AssistantForCausalLM.from_pretrained (no missing/unexpected keys). For a few
prefix lengths around the sliding window and 3 draft steps, HF's logits and last_hidden_state equal, within 1e-4,
those of the same drafter loaded by tandem's serving path (tandem.spec.load_drafter), both reading the same target
K/V (HF as `shared_kv_states`, ours from the KVCache); tied and centroid heads. Both sides read the same bf16
files; the target is saved in bf16 (as Gemma checkpoints ship), so the export's bf16 copy of the embedding is
exactly the table tandem's drafter shares with its target.

HF needs a patch to build any Gemma 4 assistant: transformers 5.23's Gemma4TextConfig.kv_sharing_modes raises when
EVERY layer is KV-shared, which an assistant always is (see `_hf_all_shared_patch`, as in test_gemma4_assistant.py).

Targets: Gemma 3 (the family of the shipped drafter) and Gemma 4 with its proportional partial RoPE on the full
layers (assistant_config copies the target's RoPE).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Gemma4TextConfig  # noqa: E402
from transformers.models.gemma4_assistant import Gemma4AssistantForCausalLM  # noqa: E402

from tandem import loading  # noqa: E402
from tandem.errors import ModelLoadError  # noqa: E402
from tandem.kvcache import KVCache  # noqa: E402
from tandem.spec import MTPAssistantDrafter, load_drafter  # noqa: E402
from tandem.train import assistant_io  # noqa: E402
from tandem.train.assistant_init import assistant_config, build_assistant  # noqa: E402

S, F = "sliding_attention", "full_attention"
V, W, TOL = 64, 4, 1e-4
GEMMA3 = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, sliding_window=W, query_pre_attn_scalar=16,
              max_position_embeddings=128, layer_types=[S, F, S, F])
GEMMA4 = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=W,
              layer_types=[S, S, F, S, S, F], num_kv_shared_layers=2, hidden_size_per_layer_input=0,
              vocab_size_per_layer_input=V, max_position_embeddings=128,
              rope_parameters={S: {"rope_type": "default", "rope_theta": 10_000.0},
                               F: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1_000_000.0}})


@pytest.fixture(autouse=True, scope="module")
def _hf_all_shared_patch():
    """transformers 5.23's Gemma4TextConfig.kv_sharing_modes raises when EVERY layer is KV-shared, which the
    assistant requires, so HF cannot build (or from_pretrained) any assistant; treat that case as all-"reuse"."""
    orig = Gemma4TextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers and self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return orig.fget(self)

    Gemma4TextConfig.kv_sharing_modes = property(modes)
    yield
    Gemma4TextConfig.kv_sharing_modes = orig


def _randomize(m: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if p.dim() == 1
                    else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return m


def save_target(tmp_path_factory, family: str, **change) -> str:
    """A random HF target saved in bf16 with save_pretrained; returns its directory."""
    if family == "gemma3":
        from transformers import Gemma3ForCausalLM, Gemma3TextConfig
        hf = Gemma3ForCausalLM(Gemma3TextConfig(**{**GEMMA3, **change}, attn_implementation="eager"))
    else:
        from transformers import Gemma4ForCausalLM
        hf = Gemma4ForCausalLM(Gemma4TextConfig(**{**GEMMA4, **change}, attn_implementation="eager"))
    d = tmp_path_factory.mktemp(f"target_{family}")
    _randomize(hf.eval(), 0).to(torch.bfloat16).save_pretrained(str(d))
    return str(d)


@pytest.fixture(scope="module")
def gemma3_target(tmp_path_factory):
    return save_target(tmp_path_factory, "gemma3")


def make_drafter(target_dir: str, out, centroids: bool, seed: int = 1):
    """What `tandem train-assistant` writes, with random instead of trained weights."""
    tgt = loading.load(target_dir, dtype=torch.float32, tokenizer=False).model
    cfg = assistant_config(tgt, layers=2, intermediate=64, centroids=8 if centroids else 0, top_k_clusters=3)
    a = build_assistant(cfg, tgt, tgt.model.embed_tokens.weight, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in a.named_parameters():
            if name.startswith(("model.embed_tokens.", "lm_head.")):  # the target's, not the drafter's
                continue
            p.add_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() == 1 else 0.5 * p.shape[-1] ** -0.5))
        for layer in a.model.layers:
            layer.layer_scalar.copy_(torch.rand(1, generator=g) + 0.5)
        if centroids:
            a.masked_embedding.token_ordering.copy_(torch.randperm(V, generator=g))
    assistant_io.save(a, cfg, out, report={})
    return a


def _export(target_dir, tmp_path, centroids):
    drafter, out = tmp_path / "drafter", tmp_path / "export"
    a = make_drafter(target_dir, drafter, centroids)
    assistant_io.export_for_transformers(str(drafter), target_dir, str(out))
    return a, drafter, out


def check_export_matches(target_dir: str, tmp_path, centroids: bool):
    a, drafter, out = _export(target_dir, tmp_path, centroids)
    # the drafter dir is tandem's format; the export is plain HF
    dcfg = json.loads((drafter / "config.json").read_text())
    assert dcfg["tandem"] == {"shared_target_embeddings": True}
    assert "model.embed_tokens.weight" not in load_file(str(drafter / "model.safetensors"))
    ecfg = json.loads((out / "config.json").read_text())
    assert "tandem" not in ecfg and ecfg["text_config"]["vocab_size_per_layer_input"] == 0
    sd = load_file(str(out / "model.safetensors"))
    tgt = loading.load(target_dir, dtype=torch.float32, tokenizer=False)
    ours_t = tgt.model
    assert torch.equal(sd["model.embed_tokens.weight"].float(), ours_t.model.embed_tokens.weight)
    if centroids:
        assert sd["masked_embedding.token_ordering"].dtype == torch.int64
        assert torch.equal(sd["masked_embedding.token_ordering"], a.masked_embedding.token_ordering)

    hf_a, info = Gemma4AssistantForCausalLM.from_pretrained(str(out), attn_implementation="eager",
                                                            dtype=torch.float32, output_loading_info=True)
    hf_a.eval()
    assert not any(info.values()), info
    assert (hf_a.masked_embedding is not None) == centroids
    d = load_drafter(str(drafter), target=ours_t, target_loaded=tgt, weight_format="fp32")
    assert isinstance(d, MTPAssistantDrafter)
    ours_a = d.assistant

    for n in (1, 3, 5, 9):  # tokens in the target cache; the assistant's window (3: 4 entries) cuts in from n = 5
        ids = torch.randint(0, V, (n + 1,), generator=torch.Generator().manual_seed(100 + n)).tolist()
        cache = KVCache(ours_t.kv_specs(), n_slots=1, max_len=32)
        with torch.no_grad():
            hidden = ours_t(torch.tensor([ids[:n]]), torch.arange(n)[None], cache).hidden
        cache.set_length(0, n)
        kv = {}
        for lt, layer in ours_a.target_layers.items():
            k, v = cache.view(layer, 0)
            kv[lt] = (k[None].clone(), v[None].clone())
        h_hf = h_ours = hidden[:, -1:]
        tok_hf = tok_ours = torch.tensor([[ids[n]]])
        for step in range(3):  # every step of a round uses the position of the last accepted token
            with torch.no_grad():
                o_hf = hf_a(inputs_embeds=torch.cat([ours_t.embed(tok_hf), h_hf], -1),
                            position_ids=torch.tensor([[n]]), attention_mask=torch.ones(1, n + 1, dtype=torch.long),
                            shared_kv_states=kv)
                x = torch.cat([ours_t.embed(tok_ours), h_ours], -1)
                o = ours_a(x, torch.tensor([[n]]), cache)
                greedy, _, _ = ours_a.greedy_step(x, torch.tensor([[n]]), cache, torch.tensor([0]),
                                                  torch.tensor([[n - 1]]))
            assert (o.logits - o_hf.logits.float()).abs().max() < TOL, (n, step)
            assert (o.hidden - o_hf.last_hidden_state).abs().max() < TOL, (n, step)
            tok_hf, tok_ours = o_hf.logits.argmax(-1), o.logits.argmax(-1)
            assert torch.equal(tok_hf, tok_ours) and torch.equal(greedy, tok_ours), (n, step)
            h_hf, h_ours = o_hf.last_hidden_state, o.hidden
        assert cache.lengths[0] == n


@pytest.mark.parametrize("centroids", [False, True], ids=["tied_head", "centroid_head"])
def test_export_matches_tandem(gemma3_target, tmp_path, centroids):
    check_export_matches(gemma3_target, tmp_path, centroids)


def test_export_with_gemma4_target(tmp_path_factory, tmp_path):
    check_export_matches(save_target(tmp_path_factory, "gemma4"), tmp_path, True)


def test_export_errors(gemma3_target, tmp_path, tmp_path_factory):
    _, drafter, _ = _export(gemma3_target, tmp_path, True)

    def fails(src, msg, target=gemma3_target):
        out = tmp_path / "bad_out"
        with pytest.raises(ModelLoadError) as e:
            assistant_io.export_for_transformers(str(src), target, str(out))
        assert msg in str(e.value), str(e.value)
        assert not (out / "model.safetensors").exists()
        return str(e.value)

    def variant(name, cfg=None, drop=()):
        d = tmp_path / name
        d.mkdir()
        c = json.loads((drafter / "config.json").read_text())
        (d / "config.json").write_text(json.dumps(cfg(c) if cfg else c))
        sd = load_file(str(drafter / "model.safetensors"))
        save_file({k: v for k, v in sd.items() if k not in drop}, str(d / "model.safetensors"))
        return d

    fails(tmp_path / "nowhere", "config.json missing")
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text((drafter / "config.json").read_text())
    fails(tmp_path / "no_weights", "model.safetensors missing")
    (tmp_path / "bad_json").mkdir()
    (tmp_path / "bad_json" / "config.json").write_text("{")
    (tmp_path / "bad_json" / "model.safetensors").write_bytes((drafter / "model.safetensors").read_bytes())
    fails(tmp_path / "bad_json", "invalid JSON")
    fails(variant("wrong_type", cfg=lambda c: {**c, "model_type": "gemma3_text"}), "expected 'gemma4_assistant'")
    # incomplete weights: transformers would silently initialise the missing ones at random
    fails(variant("missing", drop=("model.layers.1.mlp.up_proj.weight",)), "model.layers.1.mlp.up_proj.weight")

    # a drafter trained for another target: its vocab / attention layout does not fit
    t2 = save_target(tmp_path_factory, "gemma3", vocab_size=2 * V)
    assert str(drafter) in fails(drafter, "does not fit the target: drafter (vocab 64, hidden 48)", target=t2)
    t2 = save_target(tmp_path_factory, "gemma3", head_dim=8, query_pre_attn_scalar=8)
    err = fails(drafter, "assistant head_dim 16 != target layer", target=t2)
    assert str(drafter) in err and t2 in err, err
