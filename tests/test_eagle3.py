"""Kind `eagle3`: EAGLE-3 heads in the public checkpoint layout (tiny random configs, fp32).

- The target's aux hidden states (Output.aux) are transformers' hidden_states[j] (the input of layer j: vLLM's
  numbering) for the default layers (2, L // 2, L - 3).
- A checkpoint written tensor by tensor in the layout vLLM's / SGLang's llama_eagle3 loaders read loads; every
  round's drafts through Engine.generate and the batch scheduler equal a reference EAGLE-3 forward written here
  from the paper and those loaders, its decoder layer made of transformers' Llama attention / MLP / RMSNorm.
- An exported head loads back bitwise and carries exactly the names and shapes vLLM's loader expects.
- T = 0: spec == plain (alone and chained after ngram); T > 0: the 2nd token's distribution is the target's.
- Trees (EAGLE-2 style, speculative.tree): T = 0 spec == plain (generate and the scheduler, tree and chain
  requests in the same steps); every node's probability is the reference's along its path, the first child its
  argmax, and chain rounds after tree rounds draft the reference's chain (the head's cache is the accepted text).
"""

import dataclasses
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers.models.llama import modeling_llama as hf  # noqa: E402

from tandem.config import SamplingParams, SpecConfig  # noqa: E402
from tandem.engine import Engine, Token  # noqa: E402
from tandem.engine.batch import BatchScheduler  # noqa: E402
from tandem.errors import ModelLoadError  # noqa: E402
from tandem.loading.eagle3 import load_eagle3, save_eagle3  # noqa: E402
from tandem.models import llama  # noqa: E402
from tandem.spec import ChainDrafter, NgramDrafter, load_drafter, set_tracer  # noqa: E402
from tandem.spec.eagle3 import Eagle3Drafter  # noqa: E402
from tests.test_spec_lossless import assert_matches_marginal, second_token_marginal  # noqa: E402

V, D, L, VD, I, H, KV, HD = 16, 32, 8, 10, 48, 4, 2, 8  # target vocab / hidden / layers; draft vocab; head dims
AUX = (2, L // 2, L - 3)
# what vLLM's Eagle3LlamaForCausalLM.load_weights and SGLang's LlamaForCausalLMEagle3.load_weights read (names as
# stored: vLLM prefixes "model." to all but lm_head and maps "midlayer." to "layers.0."; d2t -> draft_id_to_target_id;
# t2d skipped by both; embed_tokens optional: the target's is shared when absent)
EXPECTED = {
    "fc.weight": (D, 3 * D),  # ReplicatedLinear(target_hidden_size * 3, hidden_size)
    "midlayer.self_attn.q_proj.weight": (H * HD, 2 * D),  # QKVParallelLinear(2 * hidden_size, ...)
    "midlayer.self_attn.k_proj.weight": (KV * HD, 2 * D),
    "midlayer.self_attn.v_proj.weight": (KV * HD, 2 * D),
    "midlayer.self_attn.o_proj.weight": (D, H * HD),
    "midlayer.mlp.gate_proj.weight": (I, D),
    "midlayer.mlp.up_proj.weight": (I, D),
    "midlayer.mlp.down_proj.weight": (D, I),
    "midlayer.input_layernorm.weight": (D,),
    "midlayer.hidden_norm.weight": (D,),
    "midlayer.post_attention_layernorm.weight": (D,),
    "norm.weight": (D,),
    "lm_head.weight": (VD, D),  # ParallelLMHead(draft_vocab_size, hidden_size)
    "d2t": (VD,),  # int64 offsets: target id = draft id + d2t[draft id]
    "t2d": (V,),  # bool
}
CONFIG = {  # as yuhuili/EAGLE3-LLaMA3.1-Instruct-8B's config.json, scaled down
    "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_act": "silu", "hidden_size": D,
    "intermediate_size": I, "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": HD,
    "num_hidden_layers": 1, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 128,
    "vocab_size": V, "draft_vocab_size": VD, "tie_word_embeddings": False, "torch_dtype": "float32",
    "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 0, "use_cache": True,
}
HF_CFG = dict(vocab_size=V, hidden_size=D, intermediate_size=64, num_hidden_layers=L, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6, max_position_embeddings=128,
              tie_word_embeddings=False, attn_implementation="eager")


def _randomize(m: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.dim() == 1
                    else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5 * 1.5)
    return m


@pytest.fixture(scope="module")
def pair():
    """(transformers' tiny Llama, the same weights as tandem's llama Model)."""
    ref = _randomize(hf.LlamaForCausalLM(hf.LlamaConfig(**HF_CFG)), 0).eval()
    ours = llama.Model(llama.ModelArgs.from_dict({**HF_CFG, "model_type": "llama"}))
    missing, unexpected = ours.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and not unexpected
    return ref, ours.eval()


def head_tensors(seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {k: (1 + 0.2 * torch.randn(s, generator=g)) if len(s) == 1 else torch.randn(s, generator=g) * s[-1] ** -0.5
         for k, s in EXPECTED.items() if k not in ("d2t", "t2d")}
    vocab = torch.sort(torch.randperm(V, generator=g)[:VD]).values  # the draft vocabulary: VD target ids
    t["d2t"] = vocab - torch.arange(VD)
    t["t2d"] = torch.zeros(V, dtype=torch.bool)
    t["t2d"][vocab] = True
    return t


def write_head(d, tensors=None, **cfg) -> dict[str, torch.Tensor]:
    tensors = tensors or head_tensors()
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({**CONFIG, **cfg}))
    return tensors


# -- the reference: EAGLE-3 from the paper / vLLM / SGLang, its layer from transformers' Llama pieces --------------
class RefHead:
    def __init__(self, t: dict[str, torch.Tensor], target_embed: torch.Tensor):
        cfg = hf.LlamaConfig(**{**CONFIG, "hidden_size": 2 * D, "attn_implementation": "eager"})
        self.attn = hf.LlamaAttention(cfg, 0)  # q/k/v read [embed | hidden]: 2D wide
        self.attn.o_proj = nn.Linear(H * HD, D, bias=False)
        self.mlp = hf.LlamaMLP(hf.LlamaConfig(**CONFIG))
        self.rope = hf.LlamaRotaryEmbedding(cfg)
        self.norms = {n: hf.LlamaRMSNorm(D, eps=1e-5) for n in ("input_layernorm", "hidden_norm",
                                                                 "post_attention_layernorm", "norm")}
        with torch.no_grad():
            for name, mod in [("midlayer.self_attn", self.attn), ("midlayer.mlp", self.mlp)] + \
                    [(f"midlayer.{n}" if n != "norm" else n, m) for n, m in self.norms.items()]:
                for pn, p in mod.named_parameters():
                    p.copy_(t[f"{name}.{pn}"])
        self.t, self.embed = t, target_embed

    def layer(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """emb, h [n, D] at positions 0..n-1, causal -> pre-norm outputs [n, D]."""
        n = emb.shape[0]
        hn = self.norms["hidden_norm"](h)
        x = torch.cat([self.norms["input_layernorm"](emb), hn], -1)[None]
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        a, _ = self.attn(x, self.rope(x, torch.arange(n)[None]), mask)
        r = h + a[0]
        return r + self.mlp(self.norms["post_attention_layernorm"](r))

    @torch.no_grad()
    def drafts(self, tokens: list[int], aux: torch.Tensor, k: int) -> list[int]:
        """tokens t_1..t_p, aux [p, 3D] the target's rows 0..p-1 -> k greedy drafts (target ids)."""
        emb, h = self.embed[torch.tensor(tokens)], aux @ self.t["fc.weight"].T
        out = []
        for _ in range(k):
            last = self.layer(emb, h)[-1]
            d = int((self.norms["norm"](last) @ self.t["lm_head.weight"].T).argmax())
            out.append(d + int(self.t["d2t"][d]))
            emb, h = torch.cat([emb, self.embed[out[-1]][None]]), torch.cat([h, last[None]])
        return out

    @torch.no_grad()
    def dist(self, tokens: list[int], aux: torch.Tensor, path: list[int]) -> torch.Tensor:
        """The head's next-token distribution over target ids [V] after t_1..t_p (aux [p, 3D]) and the draft tokens
        `path` (target ids), each path row reading the previous row's output."""
        emb, h = self.embed[torch.tensor(tokens)], aux @ self.t["fc.weight"].T
        for t in path:
            last = self.layer(emb, h)[-1]
            emb, h = torch.cat([emb, self.embed[t][None]]), torch.cat([h, last[None]])
        q = torch.softmax(self.norms["norm"](self.layer(emb, h)[-1]) @ self.t["lm_head.weight"].T, -1)  # [VD]
        return torch.zeros(V).index_put_((torch.arange(VD) + self.t["d2t"],), q)


def hf_aux(ref, seq: list[int]) -> torch.Tensor:
    """transformers' hidden_states[j] (the input of layer j) for j in AUX, concatenated [T, 3D]."""
    with torch.no_grad():
        hs = ref(torch.tensor([seq]), output_hidden_states=True).hidden_states
    return torch.cat([hs[j][0] for j in AUX], -1)


def prompts(n, seed, lo=2, hi=12):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


# -- tests ---------------------------------------------------------------------------------------------------------
def test_aux_hidden_states_are_transformers_hidden_states(pair):
    ref, ours = pair
    seq = prompts(1, 0, 9, 10)[0]
    ours.aux_layers = AUX
    try:
        out = ours(torch.tensor([seq]), torch.arange(len(seq))[None], ours.make_cache(1, 32, k_type="f32"))
    finally:
        ours.aux_layers = ()
    assert out.aux.shape == (1, len(seq), 3 * D)
    torch.testing.assert_close(out.aux[0], hf_aux(ref, seq), atol=1e-4, rtol=1e-4)


def test_public_checkpoint_loads_and_errors(pair, tmp_path):
    _, ours = pair
    t = write_head(tmp_path / "head")
    d = load_drafter(str(tmp_path / "head"), target=ours, weight_format="fp32", mtp_weight_format="fp32")
    assert isinstance(d, Eagle3Drafter) and d.head.aux_layers == AUX and ours.aux_layers == AUX
    assert d.head.embed_tokens is None  # the target's embedding, shared
    sd = d.head.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in t.items())
    assert "eagle3" in d.describe()
    ours.aux_layers = ()
    # speculators' layout (layers.0.* for midlayer.*) and pytorch_model.bin load the same
    alt = tmp_path / "alt"
    alt.mkdir()
    torch.save({k.replace("midlayer.", "layers.0."): v for k, v in t.items()}, alt / "pytorch_model.bin")
    (alt / "config.json").write_text(json.dumps(CONFIG))
    assert torch.equal(load_eagle3(alt, L, D, V).lm_head.weight, t["lm_head.weight"])
    bad = dict(t, **{"fc.weight": torch.zeros(D, 2 * D)})
    write_head(tmp_path / "bad", bad)
    with pytest.raises(ModelLoadError, match=r"fc.weight: expected \(32, 96\), got \(32, 64\)"):
        load_eagle3(tmp_path / "bad", L, D, V)
    write_head(tmp_path / "vocab", t, vocab_size=V + 1)
    with pytest.raises(ModelLoadError, match="vocab_size 17, the target's vocabulary has 16"):
        load_eagle3(tmp_path / "vocab", L, D, V)


def test_layer_matches_transformers_llama_pieces(pair, tmp_path):
    """The head's layer over its KV cache, 7 rows at once then 3 more one by one == the reference layer."""
    _, ours = pair
    t = write_head(tmp_path / "head")
    head = load_eagle3(tmp_path / "head", L, D, V)
    ref = RefHead(t, ours.model.embed_tokens.weight.detach())
    g = torch.Generator().manual_seed(3)
    emb, h = torch.randn(10, D, generator=g), torch.randn(10, D, generator=g)
    cache = head.make_cache(1, 16)
    with torch.no_grad():
        a = head(emb[None, :7], h[None, :7], torch.arange(7)[None], cache, torch.tensor([0]))[0]
        b = [head(emb[None, i:i + 1], h[None, i:i + 1], torch.tensor([[i]]), cache, torch.tensor([0]))[0]
             for i in range(7, 10)]
        want = ref.layer(emb, h)
    torch.testing.assert_close(torch.cat([a, *b]), want, atol=1e-5, rtol=1e-5)


def _rounds(run) -> list[tuple[str, int, list[int]]]:
    events = []
    set_tracer(events.append)
    try:
        run()
    finally:
        set_tracer(None)
    return [(e["req"] or "", e["pos"], e["tokens"]) for e in events if e["event"] == "draft"]


def test_drafts_equal_reference_forward(pair, tmp_path):
    """Every round's drafts (Engine.generate, and the batch scheduler with 3 slots) == the reference drafts from
    the tokens so far and transformers' hidden states; the output == plain decoding."""
    ref, ours = pair
    t = write_head(tmp_path / "head")
    d = load_drafter(str(tmp_path / "head"), target=ours, mtp_weight_format="fp32")
    eng = Engine(ours, max_len=64, n_slots=3, drafter=d, spec=SpecConfig(n_max=4))
    rh = RefHead(t, ours.model.embed_tokens.weight.detach())
    sp = SamplingParams(max_tokens=14, ignore_eos=True)
    ps = prompts(3, 1)
    plain = [eng.complete(p, sp, spec=SpecConfig(enabled=False))[0] for p in ps]
    single = [_rounds(lambda: eng.complete(p, sp, request_id=f"r{i}")) for i, p in enumerate(ps)]
    with BatchScheduler(eng) as sch:
        outs = []
        batched = _rounds(lambda: outs.extend([e.id for e in h if isinstance(e, Token) and e.id >= 0]
                                              for h in [sch.submit(p, sp, request_id=f"b{i}")
                                                        for i, p in enumerate(ps)]))
    assert outs == plain
    checked = 0
    for i, p in enumerate(ps):
        seq = p + plain[i]
        aux = hf_aux(ref, seq)
        for req, pos, toks in single[i] + [r for r in batched if r[0] == f"b{i}"]:
            assert toks == rh.drafts(seq[1:pos + 1], aux[:pos], len(toks)), (req, pos)
            checked += len(toks) > 1
    assert checked >= 6
    ours.aux_layers = ()


@pytest.mark.parametrize("chain,fmt", [(False, "fp32"), (True, "fp32"), (False, "bf16")],
                         ids=["eagle3", "ngram_then_eagle3", "eagle3_packed_bf16"])
def test_greedy_spec_equals_plain(pair, tmp_path, chain, fmt):
    _, ours = pair
    write_head(tmp_path / "head")
    d = load_drafter(str(tmp_path / "head"), target=ours, mtp_weight_format=fmt)  # bf16: fc packed too
    drafter = ChainDrafter({"ngram": NgramDrafter.build(), "eagle3": d}) if chain else d
    plain = Engine(ours, max_len=64)
    eng = Engine(ours, max_len=64, drafter=drafter, spec=SpecConfig(n_max=3))
    sp = SamplingParams(max_tokens=16, ignore_eos=True)
    drafted = 0
    for p in prompts(6, 2):
        toks, fin = eng.complete(p, sp)
        assert toks == plain.complete(p, sp)[0]
        drafted += fin.stats.spec.drafted
    assert drafted > 0
    ours.aux_layers = ()


def _recording(d, calls: list, chain_on_odd_rounds: bool = False):
    """Wrap d.propose: record each call's contexts as (tree?, chain?) flags; optionally make every odd round of a
    request a chain (nodes 0), so chain rounds follow tree rounds."""
    orig = d.propose

    def propose(batch):
        if chain_on_odd_rounds:
            batch = [dataclasses.replace(c, nodes=0) if c.round % 2 else c for c in batch]
        calls.append([(c.nodes > c.k_max, 0 < c.k_max and c.nodes <= c.k_max) for c in batch])
        return orig(batch)
    d.propose = propose


def test_tree_greedy_equals_plain(pair, tmp_path):
    """Draft trees (speculative.tree): T = 0 spec == plain through Engine.generate and the batch scheduler, tree and
    chain requests (and a plain one) drafted in the same propose calls."""
    _, ours = pair
    write_head(tmp_path / "head")
    d = load_drafter(str(tmp_path / "head"), target=ours, mtp_weight_format="fp32")
    eng = Engine(ours, max_len=64, n_slots=3, drafter=d, spec=SpecConfig(n_max=3, tree=8))
    sp = SamplingParams(max_tokens=14, ignore_eos=True)
    ps = prompts(6, 5)
    plain = [eng.complete(p, sp, spec=SpecConfig(enabled=False))[0] for p in ps]
    trees = nodes = depth = 0
    for p, want in zip(ps, plain):
        toks, fin = eng.complete(p, sp)
        assert toks == want
        st = fin.stats.spec
        trees, nodes, depth = trees + st.trees, nodes + st.drafted, depth + sum(st.drafted_at)
    assert trees > 0 and nodes > depth, (trees, nodes, depth)  # more nodes verified than depths reached
    calls: list = []
    _recording(d, calls)
    specs = [SpecConfig(n_max=3, tree=8), SpecConfig(n_max=2), SpecConfig(enabled=False)]
    with BatchScheduler(eng) as sch:
        hs = [sch.submit(p, sp, specs[i % 3], loop=False) for i, p in enumerate(ps)]
        assert [[e.id for e in h if isinstance(e, Token) and e.id >= 0] for h in hs] == plain
    assert any(any(t for t, _ in c) and any(ch for _, ch in c) for c in calls), "no step mixed trees and chains"
    ours.aux_layers = ()


def test_tree_nodes_equal_reference(pair, tmp_path):
    """Every tree node's probability == the reference head's along the node's path (its parent's path: rows of the
    path's tokens, each reading its predecessor's output), each node's first child its argmax; chain rounds right
    after tree rounds draft the reference's chain for the accepted text (accept left the head's cache as a fresh
    run of it). Engine.generate and the batch scheduler (3 slots); the output == plain decoding."""
    ref, ours = pair
    t = write_head(tmp_path / "head")
    d = load_drafter(str(tmp_path / "head"), target=ours, mtp_weight_format="fp32")
    eng = Engine(ours, max_len=64, n_slots=3, drafter=d, spec=SpecConfig(n_max=3, tree=8))
    rh = RefHead(t, ours.model.embed_tokens.weight.detach())
    sp = SamplingParams(max_tokens=14, ignore_eos=True)
    ps = prompts(3, 6)
    plain = [eng.complete(p, sp, spec=SpecConfig(enabled=False))[0] for p in ps]
    _recording(d, [], chain_on_odd_rounds=True)
    events = []
    set_tracer(events.append)
    try:
        for i, p in enumerate(ps):
            assert eng.complete(p, sp, request_id=f"r{i}")[0] == plain[i]
        with BatchScheduler(eng) as sch:
            hs = [sch.submit(p, sp, request_id=f"b{i}", loop=False) for i, p in enumerate(ps)]
            assert [[e.id for e in h if isinstance(e, Token) and e.id >= 0] for h in hs] == plain
    finally:
        set_tracer(None)
    nodes = after_tree = 0
    for i, p in enumerate(ps):
        seq = p + plain[i]
        aux = hf_aux(ref, seq)
        prev = {}
        for e in (e for e in events if e["event"] == "draft" and e["req"][1:] == str(i)):
            pos, toks, parents = e["pos"], e["tokens"], e.get("parents")
            if parents is None:  # a chain
                assert toks == rh.drafts(seq[1:pos + 1], aux[:pos], len(toks)), (e["req"], pos)
                after_tree += bool(prev.get(e["req"])) and len(toks) > 1
            for j, (tok, par) in enumerate(zip(toks, parents or [])):
                path = []
                while par >= 0:
                    path, par = [toks[par]] + path, parents[par]
                q = rh.dist(seq[1:pos + 1], aux[:pos], path)
                assert abs(float(q[tok]) - e["probs"][j]) < 1e-4, (e["req"], pos, j)
                if parents.index(parents[j]) == j:  # the first child: the reference's argmax
                    assert tok == int(q.argmax()), (e["req"], pos, j)
                nodes += 1
            prev[e["req"]] = parents is not None
    assert nodes >= 30 and after_tree >= 4, (nodes, after_tree)
    ours.aux_layers = ()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eagle3", "eagle3_sample"])
def test_sampling_matches_target_distribution(pair, tmp_path, method):
    """The 2nd generated token (the first a verify round emits) of sampled runs ~ the target's exact marginal."""
    _, ours = pair
    write_head(tmp_path / "head")
    d = load_drafter(str(tmp_path / "head"), target=ours, mtp_weight_format="fp32")
    sp = dict(temperature=1.0, top_k=5, max_tokens=3, ignore_eos=True)
    prompt = prompts(1, 4)[0]
    marg = second_token_marginal(ours, prompt, SamplingParams(**sp))
    eng = Engine(ours, max_len=32, drafter=d, spec=SpecConfig(method=method, n_max=2))
    seconds = torch.tensor([eng.complete(prompt, SamplingParams(**sp, seed=s))[0][1] for s in range(400)])
    assert_matches_marginal(seconds, marg)
    ours.aux_layers = ()


def test_export_loads_back_bitwise_in_vllm_layout(pair, tmp_path):
    _, ours = pair
    write_head(tmp_path / "head")
    head = load_eagle3(tmp_path / "head", L, D, V)
    for dtype in (torch.float32, torch.bfloat16):
        out = save_eagle3(head, L, tmp_path / f"export-{dtype}", extra={"tandem": {"note": 1}}, dtype=dtype)
        sd = load_file(str(out / "model.safetensors"))
        assert {k: tuple(v.shape) for k, v in sd.items()} == EXPECTED
        assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["model_type"] == "llama"
        assert (cfg["draft_vocab_size"], cfg["vocab_size"], cfg["num_hidden_layers"]) == (VD, V, 1)
        assert "eagle_aux_hidden_state_layer_ids" not in cfg  # the default layers: vLLM and SGLang agree
        back = load_eagle3(out, L, D, V, dtype=dtype)
        for k, v in head.state_dict().items():
            assert torch.equal(back.state_dict()[k], v if k in ("d2t", "t2d") else v.to(dtype)), k
    head.aux_layers = (1, 3, 8)  # not the default: written for vLLM (inputs) and SGLang (outputs)
    cfg = json.loads((save_eagle3(head, L, tmp_path / "odd") / "config.json").read_text())
    assert cfg["eagle_aux_hidden_state_layer_ids"] == [1, 3, 8]
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 2, 7]
    assert load_eagle3(tmp_path / "odd", L, D, V).aux_layers == (1, 3, 8)
