"""The nextn drafter wired through the engine: prefill hands it every prompt row's hidden state (Engine.generate and
the batch scheduler's chunked prefill), so its drafts through the engine equal the reference rounds that feed the
heads all prompt rows directly (tests/test_nextn.py's tandem_rounds, itself == transformers' MTP drafts);
load_drafter(None) builds it from a target that carries MTP layers and says so when one does not; `tandem generate`
names the drafter in its stats line; --mtp-weight-format sets the heads' format."""

import json
import logging

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

pytest.importorskip("transformers")

import tandem.engine.batch as batch_mod  # noqa: E402
import tandem.engine.core as core_mod  # noqa: E402
import tandem.spec.nextn as nextn_mod  # noqa: E402
from tandem.config import SamplingParams, SpecConfig  # noqa: E402
from tandem.engine import Engine, Token  # noqa: E402
from tandem.spec.chain import member  # noqa: E402
from tandem.engine.batch import BatchScheduler  # noqa: E402
from tandem.engine.factory import load_engine  # noqa: E402
from tandem.loading import load  # noqa: E402
from tandem.spec import load_drafter, set_tracer  # noqa: E402
from tandem.spec.nextn import NextNDrafter, weight_format_of  # noqa: E402
from tests.test_glm_deepseek_parity import make_pair  # noqa: E402
from tests.test_nextn import FAMILIES, tandem_rounds, write_checkpoint  # noqa: E402

NEW = 16


def prompts(n: int, seed: int, lo: int = 2, hi: int = 14) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 128, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def engine_rounds(run) -> list[tuple[int, list[int]]]:
    """(position, draft tokens) of every round `run()` makes, from the speculation trace."""
    events = []
    set_tracer(events.append)
    try:
        run()
    finally:
        set_tracer(None)
    return sorted((e["req"] or "", e["round"], e["pos"], e["tokens"]) for e in events if e["event"] == "draft")


def check_rounds(got: list[tuple[int, list[int]]], ref: list[list[int]], P: int) -> None:
    """Each engine round (pos, drafts) drafts the reference round's tokens, up to the engine's k_max: the
    reference allows k = budget left, the engine's policy budget left - 1 (the round's own target token)."""
    assert len(got) == len(ref) and any(t for _, t in got), (got, ref)
    for (pos, g), r in zip(got, ref):
        assert g == r[:min(3, NEW - (pos - P + 1) - 1)], (got, ref)


@pytest.mark.parametrize("n_heads", [1, 2])
@pytest.mark.parametrize("name", FAMILIES)
def test_engine_drafts_equal_reference(tmp_path, monkeypatch, name, n_heads):
    """fp32: the drafts of every round through Engine.generate and through the batch scheduler (4 slots, prefill
    in chunks of 5 tokens, heads' begin in chunks of 3) == the reference rounds fed every prompt row directly;
    tokens == plain decoding."""
    write_checkpoint(tmp_path, name, n_heads)
    target = load(str(tmp_path), tokenizer=False).model.eval()
    drafter = load_drafter(None, target=target, weight_format="fp32")
    assert isinstance(drafter, NextNDrafter) and drafter.needs_prompt_hidden
    eng = Engine(target, None, max_len=64, n_slots=4, drafter=drafter, spec=SpecConfig(n_max=3),
                 cache_type_k="f32")
    ps = prompts(4, 3)
    sp = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    plain = [eng.complete(p, sp, spec=SpecConfig(enabled=False))[0] for p in ps]
    ref_drafter = load_drafter(None, target=target, weight_format="fp32")  # the same heads, on a 1-slot cache
    for chunk in (core_mod.PREFILL_CHUNK, 5):
        monkeypatch.setattr(core_mod, "PREFILL_CHUNK", chunk)
        monkeypatch.setattr(batch_mod, "PREFILL_CHUNK", chunk)
        monkeypatch.setattr(nextn_mod, "BEGIN_CHUNK", 3 if chunk == 5 else nextn_mod.BEGIN_CHUNK)
        refs = []
        for p in ps:
            toks, rounds = tandem_rounds(target, ref_drafter, p, NEW, 3)
            ref_drafter.end(0)
            refs.append(rounds)
            assert toks == plain[len(refs) - 1]
        for i, p in enumerate(ps):
            got = engine_rounds(lambda: eng.complete(p, sp, request_id=f"r{i:02d}"))
            check_rounds([(pos, t) for *_, pos, t in got], refs[i], len(p))
        with BatchScheduler(eng) as sch:
            handles = []
            got = engine_rounds(lambda: handles.extend(
                (h, [e.id for e in h if isinstance(e, Token) and e.id >= 0])
                for h in [sch.submit(p, sp, request_id=f"b{i:02d}") for i, p in enumerate(ps)]))
        assert [t for _, t in handles] == plain
        for i in range(len(ps)):
            check_rounds([(pos, t) for req, _, pos, t in got if req == f"b{i:02d}"], refs[i], len(ps[i]))


def test_prompt_rows_change_the_drafts(tmp_path):
    """The check above can fail: heads fed only the last prompt row (the old engine path) draft differently."""
    write_checkpoint(tmp_path, "glm4_moe", 1)
    target = load(str(tmp_path), tokenizer=False).model.eval()
    drafter = load_drafter(None, target=target, weight_format="fp32")
    differ = 0
    for p in prompts(6, 3, lo=8):
        full = tandem_rounds(target, drafter, p, NEW, 3)[1]
        drafter.end(0)
        last_only = tandem_rounds(target, LastRowOnly(drafter), p, NEW, 3)[1]
        drafter.end(0)
        differ += full != last_only
    assert differ > 0


class LastRowOnly:
    """The nextn drafter given only the last prompt row in begin() (everything else passes through)."""

    def __init__(self, d):
        self.d = d

    def __getattr__(self, k):
        return getattr(self.d, k)

    def begin(self, slot, ps):
        self.d.begin(slot, type(ps)(ps.ids, ps.hidden[-1:], ps.cache))


def test_spec_equals_plain_q8(tmp_path):
    """q8_0 target and heads, bf16 caches: spec == plain at T=0 through the engine and the batch scheduler."""
    write_checkpoint(tmp_path, "deepseek_v3_yarn", 1)
    eng = load_engine(str(tmp_path), max_len=64, n_slots=3, weight_format="q8_0", cache_type_k="bf16",
                      spec=SpecConfig(n_max=4))
    heads = member(eng.drafter, "nextn")  # the default chain: ngram, then the target's own heads
    assert isinstance(heads, NextNDrafter) and weight_format_of(heads.heads) == "q8_0"
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ps = prompts(8, 5, lo=1, hi=20)
    plain = [eng.complete(p, sp, spec=SpecConfig(enabled=False))[0] for p in ps]
    fins = [eng.complete(p, sp) for p in ps]
    assert [t for t, _ in fins] == plain
    assert sum(f.stats.spec.accepted for _, f in fins) > 0
    with BatchScheduler(eng) as sch:
        handles = [sch.submit(p, sp) for p in ps]
        assert [[e.id for e in h if isinstance(e, Token) and e.id >= 0] for h in handles] == plain


def test_load_drafter_none(tmp_path, caplog):
    """A target with MTP layers: load_drafter(None) is its nextn drafter (--mtp-weight-format sets the heads'
    format, default the target's); without: None, and the log says it has no model drafter."""
    write_checkpoint(tmp_path, "glm4_moe", 2)
    loaded = load(str(tmp_path), tokenizer=False)
    d = load_drafter(None, target=loaded.model, target_loaded=loaded, mtp_weight_format="bf16")
    assert isinstance(d, NextNDrafter) and weight_format_of(d.heads) == "bf16"
    assert d.describe() == "nextn (2 MTP heads, in-target, bf16)"
    assert weight_format_of(load_drafter(None, target=loaded.model).heads) == "fp32"  # the target's
    _, plain = make_pair("glm4_moe")
    with caplog.at_level(logging.INFO, logger="tandem.spec"):
        assert load_drafter(None, target=plain) is None
    assert "carries none (no MTP layers); no model drafter" in caplog.text


def save_tokenizer(d) -> None:
    words = [f"w{i}" for i in range(128)]
    tok = HFTokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="w3"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w2", "eos_token": "w1"}))


def test_generate_names_the_drafter(tmp_path, capsys, caplog):
    from tandem.cli import main

    with_mtp, without = tmp_path / "mtp", tmp_path / "plain"
    for d, n in ((with_mtp, 1), (without, 0)):
        d.mkdir()
        write_checkpoint(d, "glm4_moe", n)
        save_tokenizer(d)
    args = ["generate", "-p", "w5 w9 w17 w4", "-n", "8", "--ignore-eos", "-c", "64", "-ctk", "f32"]
    assert main(args + ["-m", str(with_mtp), "--mtp-weight-format", "fp32"]) == 0
    err = capsys.readouterr().err  # the default chain names both drafters
    assert "drafter: chain ngram" in err and "-> nextn (1 MTP head, in-target, fp32) | draft acceptance" in err
    assert main(args + ["-m", str(with_mtp), "--no-spec"]) == 0
    assert "drafter: none (plain)\n" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="tandem.spec"):
        assert main(args + ["-m", str(without)]) == 0
    assert "drafter: ngram n=2..4, suffix cache 65536 n-grams" in capsys.readouterr().err
    assert "no model drafter (the default chain drafts with n-gram lookup alone)" in caplog.text
    assert main(args + ["-m", str(with_mtp), "--mtp-weight-format", "q4"]) == 2
    assert "--mtp-weight-format 'q4' unknown" in capsys.readouterr().err
