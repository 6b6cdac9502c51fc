"""Gemma 4 assistant (MTP drafter) against transformers, fp32, tiny random target + assistant.

(a) one assistant step: logits and projected hidden state within 1e-4 of HF's Gemma4AssistantForCausalLM, both
    reading the same K/V (HF's `shared_kv_states`, written into our KVCache), with and without the centroid head,
    for prompt lengths around the sliding window;
(b) whole speculative runs with our Gemma 4 target: every round's draft equals what HF's
    SinglePositionMultiTokenCandidateGenerator drafts from HF's own target run over the same accepted prefix;
(c) the fit check names both models and the mismatch; (d) loading from an HF directory through tandem.loading.

Why (b) drives HF's candidate generator instead of comparing with HF's generate(assistant_model=...): after a
partially accepted round HF slices the target's shared K/V to `input_ids.shape[1]` entries, which includes the K/V
of the REJECTED draft at the new token's own position (checked: query position p sees p + 1 entries in every round
after the first); and on these tiny configs HF's assisted greedy output itself differs from HF's plain greedy output
for some prompts. We attend to exactly the accepted prefix (entries < p) and stay token-identical to plain decoding.
"""

from types import SimpleNamespace

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import Gemma4ForCausalLM, Gemma4TextConfig, GenerationConfig  # noqa: E402
from transformers.generation.candidate_generator import SinglePositionMultiTokenCandidateGenerator  # noqa: E402
from transformers.models.gemma4_assistant import (Gemma4AssistantConfig,  # noqa: E402
                                                  Gemma4AssistantForCausalLM)

from tandem.config import SamplingParams, SpecConfig  # noqa: E402
from tandem.engine import Engine  # noqa: E402
from tandem.errors import ModelLoadError  # noqa: E402
from tandem.kvcache import KVCache  # noqa: E402
from tandem.models import gemma4  # noqa: E402
from tandem.models import gemma4_assistant as ga  # noqa: E402
from tandem.spec import MTPAssistantDrafter, set_tracer  # noqa: E402

S, F = "sliding_attention", "full_attention"
V, W = 64, 4
TARGET = dict(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=W,
              layer_types=[S, S, F, S, S, F], num_kv_shared_layers=2, hidden_size_per_layer_input=0,
              vocab_size_per_layer_input=V, max_position_embeddings=128)
ASSIST = dict(model_type="gemma4_text", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, sliding_window=W,
              layer_types=[S, F, F], hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
              max_position_embeddings=128)
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _hf_all_shared_patch():
    """transformers 5.23's Gemma4TextConfig.kv_sharing_modes raises when EVERY layer is KV-shared, which the
    assistant requires, so HF cannot build the assistant at all; treat that case as all-"reuse" (as intended)."""
    orig = Gemma4TextConfig.kv_sharing_modes

    def modes(self):
        if self.num_kv_shared_layers and self.num_kv_shared_layers == self.num_hidden_layers:
            return ["reuse"] * self.num_hidden_layers
        return orig.fget(self)

    Gemma4TextConfig.kv_sharing_modes = property(modes)
    yield
    Gemma4TextConfig.kv_sharing_modes = orig


def _randomize(m: torch.nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in m.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in m.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return m


def make_target(seed=0):
    hf = _randomize(Gemma4ForCausalLM(Gemma4TextConfig(**TARGET, attn_implementation="eager")).eval(), seed)
    ours = gemma4.Model(gemma4.ModelArgs.from_dict(hf.config.to_dict())).eval()
    ours.load_state_dict(ours.sanitize(hf.state_dict()), strict=True)
    return hf, ours


def make_assistant(centroids: bool, seed=1, hidden_scale=1.0):
    extra = dict(use_ordered_embeddings=True, num_centroids=8, centroid_intermediate_top_k=3) if centroids else {}
    cfg = Gemma4AssistantConfig(text_config=dict(ASSIST), backbone_hidden_size=TARGET["hidden_size"], **extra)
    cfg.text_config._attn_implementation = "eager"
    hf = _randomize(Gemma4AssistantForCausalLM(cfg).eval(), seed)
    if centroids:
        hf.masked_embedding.token_ordering.copy_(torch.randperm(V, generator=torch.Generator().manual_seed(seed)))
    ours = ga.Model(ga.ModelArgs.from_dict(cfg.to_dict())).eval()
    ours.load_state_dict(ours.sanitize(hf.state_dict()), strict=True)
    return hf, ours


@pytest.fixture(scope="module")
def target():
    return make_target()


def _hf_prefix(hf_t, ids: list[int]):
    """HF target over a prefix: (final hidden [1, T, D], shared_kv_states {type: (k, v) [1, H, T, hd]})."""
    with torch.no_grad():
        o = hf_t(torch.tensor([ids]), output_hidden_states=True, return_shared_kv_states=True, use_cache=False)
    return o.hidden_states[-1], dict(o.shared_kv_states)


def _cache_from_hf(ours_t, kv: dict, n: int) -> KVCache:
    cache = KVCache(ours_t.kv_specs(), n_slots=1, max_len=64)
    for lt, (k, v) in kv.items():
        layer = ours_t.last_layer_of_type(lt)
        cache.k[layer][0, :, :n] = k[0, :, :n]
        cache.v[layer][0, :, :n] = v[0, :, :n]
    cache.set_length(0, n)
    return cache


@pytest.mark.parametrize("centroids", [False, True], ids=["tied_head", "centroid_head"])
@pytest.mark.parametrize("n", [1, 3, 5, 6, 11])
def test_assistant_step_matches_hf(target, centroids, n):
    """n = tokens in the target cache; the window (4, i.e. 5 entries seen) cuts in from n = 6."""
    hf_t, ours_t = target
    hf_a, ours_a = make_assistant(centroids)
    ours_a.bind(ours_t, "tiny-gemma4", "tiny-assistant")
    g = torch.Generator().manual_seed(100 + n)
    ids = torch.randint(0, V, (n + 1,), generator=g).tolist()  # ids[n] = last token, at position n
    hidden, kv = _hf_prefix(hf_t, ids[:n])
    cache = _cache_from_hf(ours_t, kv, n)
    h_hf = h_ours = hidden[:, -1:]
    tok_hf = tok_ours = torch.tensor([[ids[n]]])
    emb = hf_t.get_input_embeddings()
    for step in range(3):
        with torch.no_grad():
            o_hf = hf_a(inputs_embeds=torch.cat([emb(tok_hf), h_hf], -1), position_ids=torch.tensor([[n]]),
                        attention_mask=torch.ones(1, n + 1, dtype=torch.long),
                        shared_kv_states={k: (a[:, :, :n], b[:, :, :n]) for k, (a, b) in kv.items()})
            o = ours_a(torch.cat([ours_t.embed(tok_ours), h_ours], -1), torch.tensor([[n]]), cache)
        assert (o.logits - o_hf.logits.float()).abs().max() < TOL, step
        assert (o.hidden - o_hf.last_hidden_state).abs().max() < TOL, step
        tok_hf, tok_ours = o_hf.logits.argmax(-1), o.logits.argmax(-1)
        assert torch.equal(tok_hf, tok_ours)
        h_hf, h_ours = o_hf.last_hidden_state, o.hidden
    assert cache.lengths[0] == n  # the assistant never touches the cache


@pytest.mark.parametrize("centroids", [False, True], ids=["tied_head", "centroid_head"])
@pytest.mark.parametrize("n_max", [1, 3, 5])
def test_rounds_match_hf_candidate_generator(target, centroids, n_max):
    """Whole greedy speculative runs (our target + our assistant); each round's draft is compared with HF's
    SinglePositionMultiTokenCandidateGenerator fed by HF's target over the same accepted prefix."""
    hf_t, ours_t = target
    hf_a, ours_a = make_assistant(centroids)
    hf_a.generation_config.num_assistant_tokens = n_max
    drafter = MTPAssistantDrafter(ours_a, ours_t, "tiny-gemma4", "tiny-assistant")
    eng = Engine(ours_t, max_len=64, drafter=drafter, spec=SpecConfig(n_max=n_max))
    hf_gen = SinglePositionMultiTokenCandidateGenerator(hf_a, hf_t.get_input_embeddings(),
                                                        GenerationConfig(max_length=10_000))
    events = []
    set_tracer(events.append)
    try:
        rounds = 0
        for seed in range(4):
            g = torch.Generator().manual_seed(seed)
            prompt = torch.randint(0, V, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g).tolist()
            events.clear()
            toks, fin = eng.complete(prompt, SamplingParams(max_tokens=20, ignore_eos=True))
            seq = prompt + toks
            for ev in events:
                if ev["event"] != "draft":
                    continue
                p = ev["pos"]  # the round drafts from seq[p] with the target's state over seq[:p]
                hidden, kv = _hf_prefix(hf_t, seq[:p])
                hf_gen.is_main_model_prefill = True  # take hidden[:, -1:] (the row that produced seq[p])
                cand, _ = hf_gen.get_candidates(torch.tensor([seq[:p + 1]]), model_kwargs={},
                                                model_outputs=SimpleNamespace(hidden_states=(hidden,),
                                                                              shared_kv_states=kv),
                                                is_first_iteration=False, n_last_matches=0)
                hf_draft = cand[0, p + 1:].tolist()
                assert ev["tokens"] == hf_draft[:len(ev["tokens"])], (seed, p)
                rounds += 1
        assert rounds > 10
    finally:
        set_tracer(None)


def test_fit_check_names_both_sources(target):
    _, ours_t = target
    _, ours_a = make_assistant(False)
    assert ours_a.check_fit(ours_t) == {S: 3, F: 2}  # the last cache-owning layer of each type (3, 4 are shared)

    def bad(**kw):
        cfg = Gemma4AssistantConfig(text_config={**ASSIST, **kw.pop("text", {})},
                                    backbone_hidden_size=kw.pop("backbone", TARGET["hidden_size"]))
        return ga.Model(ga.ModelArgs.from_dict(cfg.to_dict()))

    cases = [(bad(backbone=40), "backbone_hidden_size 40 != target hidden_size 48"),
             (bad(text=dict(vocab_size=96)), "vocab_size 96 != target vocab_size 64"),
             (bad(text=dict(head_dim=8)), "sliding_attention: assistant head_dim 8 != target layer 3"),
             (bad(text=dict(num_attention_heads=3)), "not a multiple of target layer")]
    for m, msg in cases:
        with pytest.raises(ModelLoadError) as e:
            MTPAssistantDrafter(m, ours_t, "models/tiny-gemma4", "models/tiny-assistant")
        assert "models/tiny-gemma4" in str(e.value) and "models/tiny-assistant" in str(e.value)
        assert msg in str(e.value), str(e.value)


def test_fit_with_gemma3_target():
    """Any target exposing embed(), a final hidden state, kv_specs() and sliding/full layers works."""
    from tandem.models import gemma3
    t = gemma3.Model(gemma3.ModelArgs(vocab_size=V, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=W,
                                      sliding_window_pattern=2))
    a = ga.Model(ga.ModelArgs.from_dict(dict(backbone_hidden_size=48, text_config={**ASSIST, "global_head_dim": 16})))
    assert a.check_fit(t) == {S: 2, F: 3}


def test_load_drafter_from_hf_dir(target, tmp_path):
    """save_pretrained -> tandem.spec.load_drafter (through tandem.loading) -> same step as HF."""
    from tandem.spec import load_drafter
    hf_t, ours_t = target
    hf_a, _ = make_assistant(True)
    hf_a.save_pretrained(tmp_path)
    d = load_drafter(str(tmp_path), target=ours_t, weight_format="fp32")
    assert isinstance(d, MTPAssistantDrafter) and d.assistant.args.backbone_hidden_size == TARGET["hidden_size"]
    ids = list(range(1, 9))
    hidden, kv = _hf_prefix(hf_t, ids[:7])
    cache = _cache_from_hf(ours_t, kv, 7)
    with torch.no_grad():
        o_hf = hf_a(inputs_embeds=torch.cat([hf_t.get_input_embeddings()(torch.tensor([[8]])), hidden[:, -1:]], -1),
                    position_ids=torch.tensor([[7]]), shared_kv_states=kv)
        o = d.assistant(torch.cat([ours_t.embed(torch.tensor([[8]])), hidden[:, -1:]], -1), torch.tensor([[7]]), cache)
    assert (o.logits - o_hf.logits).abs().max() < TOL
