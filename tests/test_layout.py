"""The package's shape: imports point one way (cli/server/bench -> engine -> spec -> models -> kvcache/kernels),
model files stay small, and every command line answers --help. Static checks (ast), plus in-process --help."""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "tandem"

# Lowest first: a subpackage (or top-level module) may import only from tiers strictly below its own, so server,
# bench and train do not import each other, and nothing imports cli.
TIERS = [
    {"errors"},
    {"config", "tokenizer", "chat", "drafters", "sharegpt"},
    {"sampling"},
    {"kernels"},
    {"kvcache"},
    {"models"},
    {"loading"},
    {"spec"},
    {"engine"},
    {"server", "bench", "train"},
    {"cli"},
    {"__main__"},
]
RANK = {name: i for i, tier in enumerate(TIERS) for name in tier}
LOADING_USERS = {"engine", "spec", "train", "bench", "cli"}  # loading feeds models; the engine side calls it
VERBS = ["generate", "bench", "serve", "train-assistant", "export-assistant"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every tandem module this file imports, at any depth (function-level imports count too)."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from tandem import kernels` imports the subpackage tandem.kernels
            out |= {f"{base}.{a.name}" for a in node.names} if base == "tandem" else {base}
    return {m for m in out if m.split(".")[0] == "tandem" and m != "tandem"}


def _part(module: str) -> str:
    return module.split(".")[1]


def import_edges() -> list[tuple[str, str, str]]:
    """(importing file, its subpackage, imported subpackage) for every import that crosses subpackages."""
    edges = []
    for f in sorted(PKG.rglob("*.py")):
        if f == PKG / "__init__.py":
            continue
        src = _part(_module_name(f))
        for m in _imports(f):
            if _part(m) != src:
                edges.append((str(f.relative_to(ROOT)), src, _part(m)))
    return edges


def test_import_parser_sees_known_edges():
    """The checker itself: it finds the imports it must judge (else the layering test could pass vacuously)."""
    edges = {(f, d) for f, _, d in import_edges()}
    assert ("tandem/__main__.py", "cli") in edges
    assert ("tandem/kvcache/cache.py", "kernels") in edges  # `from tandem import kernels`
    assert ("tandem/server/app.py", "engine") in edges
    assert any(f.startswith("tandem/bench/") and d == "engine" for f, d in edges)  # function-level import


def test_every_subpackage_has_a_tier():
    parts = {_part(_module_name(f)) for f in PKG.rglob("*.py") if f != PKG / "__init__.py"}
    assert parts <= set(RANK), f"place {sorted(parts - set(RANK))} in TIERS"


def test_imports_point_one_way():
    bad = [f"{f}: {src} imports {dst}" for f, src, dst in import_edges()
           if src in RANK and dst in RANK and RANK[dst] >= RANK[src]]
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_loading_is_called_from_the_engine_side_only():
    bad = [f"{f}: {src} imports loading" for f, src, dst in import_edges()
           if dst == "loading" and src not in LOADING_USERS]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", sorted((PKG / "models").rglob("*.py")), ids=lambda p: str(p.relative_to(PKG / "models")))
def test_model_files_stay_small(path):
    n = len(path.read_text().splitlines())
    assert n <= 400, f"{path.relative_to(ROOT)} has {n} lines (at most 400)"


def _calls(path: Path, cls: str, fn: str) -> set[str]:
    """Names of the functions that `cls.fn` in `path` calls."""
    tree = ast.parse(path.read_text())
    body = next(f for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name == cls
                for f in c.body if isinstance(f, ast.FunctionDef) and f.name == fn)
    return {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "")
            for n in ast.walk(body) if isinstance(n, ast.Call)}


def test_generate_and_scheduler_run_the_same_round():
    """One loop body: Engine.generate and the batch scheduler's step both call decode_round, and nothing else in
    them verifies, drafts or rolls back on its own."""
    from tandem.engine import batch, core, speculative

    gen = _calls(PKG / "engine" / "core.py", "Engine", "generate")
    step = _calls(PKG / "engine" / "batch.py", "BatchScheduler", "_step")
    assert "decode_round" in gen and "decode_round" in step
    assert core.decode_round is batch.decode_round is speculative.decode_round
    for name in ("verify", "verify_tree", "propose", "forward_batch", "rollback", "compact", "accept"):
        assert name not in gen | step, f"{name} called outside decode_round"


def _help(main, argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0, argv
    return out.getvalue()


def test_tandem_help():
    r = subprocess.run([sys.executable, "-m", "tandem", "--help"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert all(v in r.stdout for v in VERBS), r.stdout


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help(verb):
    from tandem.cli import main

    assert f"usage: tandem {verb}" in _help(main, [verb, "--help"])


@pytest.mark.parametrize("module", ["tandem.bench.kernels", "tandem.bench.loadtest"])
def test_bench_module_help(module):
    main = importlib.import_module(module).main
    assert f"python -m {module}" in _help(main, ["--help"])


def test_engine_flags_reach_the_options():
    import argparse

    from tandem.engine.options import EngineOptions, add_engine_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    o = EngineOptions.from_args(p.parse_args(["-m", "x.gguf", "--drafter", "d", "--spec-n-max", "5",
                                              "--spec-n-min", "2", "--spec-p-min", "0.25", "--weight-format", "bf16",
                                              "-ctk", "q8_0", "-ctv", "turbo4", "-c", "512", "-t", "2"]))
    assert (o.model, o.drafter, o.weight_format, o.cache_type_k, o.cache_type_v, o.max_len, o.threads) == \
        ("x.gguf", "d", "bf16", "q8_0", "turbo4", 512, 2)
    assert (o.spec.enabled, o.spec.n_max, o.spec.n_min, o.spec.p_min) == (True, 5, 2, 0.25)
    assert o.plain().spec.enabled is False and o.plain().spec.n_max == 5
    assert EngineOptions.from_args(p.parse_args(["--no-spec"])).spec.enabled is False


def test_bad_engine_flags_are_clear_errors(capsys):
    from tandem.cli import main

    assert main(["generate", "-p", "x", "--spec-n-max", "2", "--spec-n-min", "3"]) == 2
    assert "n_min" in capsys.readouterr().err
    assert main(["bench", "-ctk", "q9"]) == 2  # refused before any model is loaded
    assert "q9" in capsys.readouterr().err
    assert main(["bench", "--context", "512", "-c", "256"]) == 2
    assert "--ctx-size 256 is too small" in capsys.readouterr().err


def test_serve_without_fastapi_says_so(monkeypatch, capsys):
    """A missing optional dependency is a clear error when its verb runs, not a missing verb."""
    from tandem.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve"]) == 2
    assert "tandem serve needs fastapi" in capsys.readouterr().err
