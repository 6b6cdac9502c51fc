"""The nextn drafter (the target's own MTP heads, tandem.spec.nextn) for deepseek_v3 and glm4_moe: drafts equal
transformers 5.23's MTP drafts (generate(use_mtp=True), MTPCandidateGenerator) round by round, with one head and
with two chained heads; speculative == plain at T=0 through Engine.generate and the batch scheduler (q8_0); the
heads' own cache holds exactly the accepted prefix after every round; a target without MTP layers has no model drafter."""

import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import save_file  # noqa: E402
from transformers.generation import candidate_generator as cg  # noqa: E402

from tandem.config import SamplingParams, SpecConfig  # noqa: E402
from tandem.engine import Engine, Token  # noqa: E402
from tandem.engine.batch import BatchScheduler  # noqa: E402
from tandem.kernels import prepare  # noqa: E402
from tandem.loading import load  # noqa: E402
from tandem.spec import DraftContext, PromptState  # noqa: E402
from tandem.spec.nextn import NextNDrafter, nextn_drafter, weight_format_of  # noqa: E402
from tests.test_glm_deepseek_parity import BASE, hub_layout, make_pair  # noqa: E402

FAMILIES = ["deepseek_v3_yarn", "glm4_moe"]
L, D = BASE["num_hidden_layers"], BASE["hidden_size"]


def mtp_layers(trunk: dict, n: int, seed: int) -> dict:
    """n hub-layout MTP layers at model.layers.{L..L+n-1}: the last trunk block perturbed, random norms, eh_proj,
    and a shared_head.head copy (unused: the target's LM head is the head, as in transformers)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for j in range(n):
        for k, v in trunk.items():
            if k.startswith(f"model.layers.{L - 1}."):
                noise = torch.randn(v.shape, generator=g) * (0.3 * float(v.std()) if v.numel() > 1 else 0.1)
                out[k.replace(f"model.layers.{L - 1}.", f"model.layers.{L + j}.")] = (v + noise).contiguous()
        for name in ("enorm", "hnorm", "shared_head.norm"):
            out[f"model.layers.{L + j}.{name}.weight"] = torch.rand(D, generator=g) + 0.5
        out[f"model.layers.{L + j}.eh_proj.weight"] = torch.randn(D, 2 * D, generator=g) * (2 * D) ** -0.5
        out[f"model.layers.{L + j}.shared_head.head.weight"] = trunk["lm_head.weight"].clone()
    return out


def write_checkpoint(path, name: str, n_heads: int):
    hf, _ = make_pair(name)
    trunk = hub_layout({k: v.detach().clone().contiguous() for k, v in hf.state_dict().items()})
    config = {**hf.config.to_dict(), "num_nextn_predict_layers": n_heads}
    (path / "config.json").write_text(json.dumps(config))
    save_file({**trunk, **mtp_layers(trunk, n_heads, 7)}, str(path / "model.safetensors"))
    return type(hf)


def hf_mtp_rounds(cls, path, prompt: list[int], new: int, monkeypatch) -> tuple[list[int], list[list[int]]]:
    """transformers' generate(use_mtp=True): the generated tokens and the drafts of every round."""
    n = json.loads((path / "config.json").read_text())["num_nextn_predict_layers"]
    # its MTP-key pattern names the real checkpoints' layer index; the tiny one's is L..L+n-1
    monkeypatch.setattr(cls, "_keys_to_ignore_on_load_unexpected", [rf"model\.layers\.{L + j}\..*" for j in range(n)])
    model = cls.from_pretrained(str(path), attn_implementation="eager", dtype=torch.float32).eval()
    return mtp_rounds(model, prompt, new, monkeypatch)


def mtp_rounds(model, prompt: list[int], new: int, monkeypatch) -> tuple[list[int], list[list[int]]]:
    """`model.generate(use_mtp=True)` greedy: the generated tokens and the drafts of every round."""
    rounds, orig = [], cg.MTPCandidateGenerator.get_candidates

    def spy(self, input_ids, **kw):
        out = orig(self, input_ids, **kw)
        if out[0].shape[1] > input_ids.shape[1]:
            rounds.append(out[0][0, input_ids.shape[1]:].tolist())
        return out

    monkeypatch.setattr(cg.MTPCandidateGenerator, "get_candidates", spy)
    out = model.generate(torch.tensor([prompt]), use_mtp=True, do_sample=False, max_new_tokens=new)
    return out[0, len(prompt):].tolist(), rounds


def tandem_rounds(target, drafter, prompt: list[int], new: int, k: int, check_cache=None):
    """The engine's round (draft, verify greedily, roll back, accept) driven by hand, with the prompt's hidden rows
    for begin() as transformers' MTP prefill has them. Returns the generated tokens and the drafts of each round."""
    cache = target.make_cache(1, 64, k_type="f32")
    drafter.make_cache(1, 64, k_type="f32", v_type="f32", device="cpu")
    slot = torch.tensor([0])
    with torch.no_grad():
        out = target(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, slot)
    cache.set_length(0, len(prompt))
    drafter.begin(0, PromptState(list(prompt), out.hidden[0], cache))
    x, gen, rounds = int(out.logits[0, -1].argmax()), [], []
    gen.append(x)
    while len(gen) < new:
        n = cache.lengths[0]
        ctx = DraftContext(0, x, n, cache, SamplingParams(temperature=0.0), k_max=min(k, new - len(gen)))
        d = drafter.propose([ctx])[0].tokens.tolist()
        rounds.append(d)
        rows = [x] + d
        with torch.no_grad():
            o = target(torch.tensor([rows]), torch.arange(n, n + len(rows))[None], cache, slot)
        cache.set_length(0, n + len(rows))
        y = o.logits[0].argmax(-1).tolist()
        a = 0
        while a < len(d) and d[a] == y[a]:
            a += 1
        cache.rollback(0, n + a + 1)
        emitted = d[:a] + [y[a]]
        drafter.accept(0, emitted, o.hidden[0, :a + 1])
        gen += emitted
        x = emitted[-1]
        if check_cache is not None:
            check_cache(drafter, gen)
    return gen[:new], rounds


@pytest.mark.parametrize("n_heads", [1, 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_drafts_equal_transformers_mtp(tmp_path, monkeypatch, name, n_heads):
    """Same prompt, greedy: every round's drafts (one per head) equal transformers' MTPCandidateGenerator's."""
    cls = write_checkpoint(tmp_path, name, n_heads)
    target = load(str(tmp_path), tokenizer=False).model.eval()
    drafter = nextn_drafter(target)
    assert isinstance(drafter, NextNDrafter) and drafter.heads.n_heads == n_heads
    for seed in (0, 1):
        prompt = torch.randint(0, 128, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
        ref_tokens, ref_rounds = hf_mtp_rounds(cls, tmp_path, prompt, 20, monkeypatch)
        tokens, rounds = tandem_rounds(target, drafter, prompt, 20, n_heads)
        assert tokens == ref_tokens
        m = len(ref_rounds) - 1  # transformers' last round may be cut by max_new_tokens
        assert rounds[:m] == ref_rounds[:m] and len(rounds) >= m
        assert any(r != [] and t for r, t in zip(rounds, ref_rounds))
        drafter.end(0)


def test_no_mtp_layers_runs_plain(caplog):
    _, ours = make_pair("glm4_moe")
    with caplog.at_level(logging.INFO, logger="tandem.spec"):
        assert nextn_drafter(ours) is None
    assert "no MTP layers; no model drafter" in caplog.text


def heads_from_scratch(target, heads, seq: list[int], off: int):
    """Every head's cache entries and last output, recomputed on a fresh cache over the accepted sequence `seq`
    (head 0's entries from position `off`): what the drafter's cache must hold after a round."""
    n = len(seq) - 1
    with torch.no_grad():
        hidden = target(torch.tensor([seq]), torch.arange(n + 1)[None], target.make_cache(1, 64, k_type="f32")).hidden
        cache, prev, outs = heads.make_cache(1, 64, k_type="f32"), hidden[:, off - 1:n], []
        for j in range(heads.n_heads):
            pos = torch.arange(off + j, n + 1)[None]
            o = heads(j, torch.tensor([seq[off + j:]]), prev, pos, cache, torch.tensor([0]), torch.tensor([off]))
            outs.append(o[0, -1])
            prev = o[:, :-1]
    cache.set_length(0, n + 1 - off)
    return cache, outs


def cache_rows(cache, j: int, n: int) -> torch.Tensor:
    return torch.cat([t[..., :n, :].reshape(-1) if t.dim() > 2 else t[:n].reshape(-1) for t in cache.view(j, 0)])


@pytest.mark.parametrize("name", FAMILIES)
def test_cache_holds_the_accepted_prefix(tmp_path, monkeypatch, name):
    """After every round (recursive drafts k = 3 with one head; chained heads), the heads' own cache holds exactly
    the accepted prefix: its length, every entry and the last outputs equal a from-scratch run over it."""
    for n_heads in (1, 2):
        write_checkpoint(tmp_path, name, n_heads)
        cache_tracks_rounds(load(str(tmp_path), tokenizer=False).model.eval())


def cache_tracks_rounds(target) -> None:
    """k = 3 rounds of the target's nextn drafter; after each, its cache (length, every entry, the last outputs)
    equals a from-scratch run of its heads over the accepted sequence."""
    drafter = nextn_drafter(target)
    prompt = torch.randint(0, 128, (6,), generator=torch.Generator().manual_seed(4)).tolist()

    def check(d, gen):
        seq = prompt + gen
        ref, outs = heads_from_scratch(target, d.heads, seq, 1)
        n = len(seq) - 1
        assert d.cache.lengths[0] == n  # entries at positions 1..n
        for j in range(d.heads.n_heads):
            assert torch.allclose(cache_rows(d.cache, j, n - j), cache_rows(ref, j, n - j), atol=1e-5)
            assert torch.allclose(d._out[0][j], outs[j], atol=1e-5)

    tandem_rounds(target, drafter, prompt, 14, 3, check_cache=check)


def spec_equals_plain_60(path, n_heads: int | None = None) -> None:
    """q8_0 target from `path` and its nextn heads (q8_0 by default): speculative T=0 (k up to 4: recursive or chained
    drafts, rejections) == plain decoding on 60 prompts, through Engine.generate and the batch scheduler (4 slots)."""
    target = prepare(load(str(path), tokenizer=False).model.eval(), "q8_0")
    drafter = nextn_drafter(target)
    assert weight_format_of(drafter.heads) == "q8_0" and n_heads in (None, drafter.heads.n_heads)
    eng = Engine(target, None, max_len=64, n_slots=4, drafter=drafter, spec=SpecConfig(method="auto"),
                 cache_type_k="bf16")
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 128, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()
               for _ in range(60)]
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    spec = SpecConfig(enabled=True, method="auto", n_max=4)
    plain = [eng.complete(p, sp, spec=SpecConfig(enabled=False))[0] for p in prompts]
    alone, stats = [], []
    for p in prompts:
        toks, fin = eng.complete(p, sp, spec=spec)
        alone.append(toks)
        stats.append(fin.stats.spec)
    assert alone == plain
    assert sum(s.drafted for s in stats) > sum(s.accepted for s in stats) > 0  # accepted and rejected rounds
    with BatchScheduler(eng) as sch:
        handles = [sch.submit(p, sp, spec) for p in prompts]
        together = [[e.id for e in h if isinstance(e, Token) and e.id >= 0] for h in handles]
    assert together == plain


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_spec_equals_plain_engine_and_batch(tmp_path, name):
    write_checkpoint(tmp_path, name, 1)
    spec_equals_plain_60(tmp_path)
