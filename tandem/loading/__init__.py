"""Load a model (our nn.Module), its HF-style config, tokenizer and chat template from a GGUF or an HF directory.

    from tandem.loading import load
    m = load(None)             # the embedded default (Qwen2.5-Coder-1.5B-Instruct Q4_K_M; tandem.loading.default)
    m = load("gemma-3-270m")   # another embedded model, by name
    m = load("x.gguf")         # any GGUF of a supported architecture
    m = load("path/to/hf_dir") # config.json + model.safetensors / sharded index (+ tokenizer.json)
    m = load("x.gguf", weight_format="native")  # straight into the kernels' formats, one tensor at a time
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tandem.errors import ModelLoadError

__all__ = ["Loaded", "load", "load_state_into", "detect_kind"]


@dataclass
class Loaded:
    model: nn.Module  # eval mode, on `device`, parameters in `dtype`, requires_grad False
    config: dict[str, Any]  # HF config.json-style dict
    tokenizer: Any  # tandem.tokenizer.Tokenizer or None
    chat_template: str | None
    path: str  # the file or directory the weights came from
    kind: str  # "gguf" | "hf"
    name: str | None = None  # the embedded model's name (tandem.loading.default) when it is one


def detect_kind(path: str) -> str:
    p = Path(path)
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return "gguf"
        return "hf"
    if not p.exists():
        from tandem.loading.default import EMBEDDED
        raise ModelLoadError(f"{path}: no such file or directory (nor an embedded model name: {', '.join(EMBEDDED)})")
    if p.name == "config.json":
        return "hf"
    with open(p, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF" or p.suffix.lower() == ".gguf":
        return "gguf"
    raise ModelLoadError(f"{path}: not a GGUF file (magic {magic!r}) nor an HF model directory")


_INIT_FNS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
             "xavier_normal_", "zeros_", "ones_", "constant_", "orthogonal_")


@contextlib.contextmanager
def _no_init():
    """Skip random initialisation while building a model whose every weight is about to be replaced."""
    saved = {n: getattr(nn.init, n) for n in _INIT_FNS if hasattr(nn.init, n)}
    try:
        for n in saved:
            setattr(nn.init, n, lambda t, *a, **k: t)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def _set_param(model: nn.Module, name: str, p: nn.Parameter) -> None:
    mod_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(mod_name) if mod_name else model, leaf, p)


def check_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str,
                  file_names: dict[str, str] | None = None) -> dict[str, torch.Tensor]:
    """`weights` with every tie group completed, after checking that names, shapes and kinds (integer vs floating
    point) match `model` (its parameters may be on the meta device); errors name the tensor as the file spells it."""
    weights = dict(weights)
    for names in (g for g in _tie_groups(model) if len(g) > 1):
        present = [n for n in names if n in weights]
        if present:
            for n in names:
                weights[n] = weights[present[0]]
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    if missing or unexpected:
        raise ModelLoadError(f"{source}: weights do not match the model: missing {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")
    file_names = file_names or {}
    bad = [f"{k}{f' (file tensor {file_names[k]!r})' if k in file_names else ''}: expected {tuple(v.shape)}, "
           f"got {tuple(weights[k].shape)}" for k, v in expected.items() if tuple(weights[k].shape) != tuple(v.shape)]
    if bad:
        raise ModelLoadError(f"{source}: tensor shape mismatch: {bad[:4]}")
    bad = [f"{file_names.get(k, k)}: expected {v.dtype}, got {weights[k].dtype}" for k, v in expected.items()
           if v.is_floating_point() != weights[k].is_floating_point()]
    if bad:
        raise ModelLoadError(f"{source}: tensor dtype mismatch (integer vs floating point): {bad[:4]}")
    return weights


def load_state_into(model: nn.Module, weights: dict[str, torch.Tensor], source: str,
                    file_names: dict[str, str] | None = None) -> nn.Module:
    """Strict, zero-copy (assign) load of HF-named weights into `model`, keeping tied parameters tied.

    A tie group (parameters that are the same object, e.g. lm_head.weight / embed_tokens.weight) needs just one
    member in `weights`; all members end up sharing the loaded tensor. `file_names` (HF name -> name in the file,
    e.g. the GGUF tensor) makes errors name the tensor as the file spells it."""
    tied = [names for names in _tie_groups(model) if len(names) > 1]
    weights = check_weights(model, weights, source, file_names)
    model.load_state_dict(weights, strict=True, assign=True)
    for names in tied:
        p = model.get_parameter(names[0])
        for n in names[1:]:
            _set_param(model, n, p)
    return model


def _tie_groups(model: nn.Module) -> list[list[str]]:
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    return list(groups.values())


def _tokenizer_cache_path(gguf_path: str) -> Path | None:
    from tandem.loading.default import cache_dir
    try:
        st = os.stat(gguf_path)
    except OSError:
        return None
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}|{st.st_size}|{st.st_mtime_ns}|v2".encode()).hexdigest()[:24]
    return cache_dir() / "tokenizers" / f"{key}.json"


def _gguf_tokenizer(f, cache: bool):
    """The file's tokenizer; the derived tokenizer.json is cached (building Gemma's merges takes seconds)."""
    from tandem.tokenizer import Tokenizer
    if "tokenizer.ggml.tokens" not in f.fields:
        return None
    cp = _tokenizer_cache_path(f.path) if cache else None
    if cp is not None and cp.is_file():
        try:
            return Tokenizer.load_saved(cp)
        except Exception:
            pass  # stale or broken cache: rebuild
    tok = Tokenizer.from_gguf_metadata(f.tokenizer_metadata(), f.architecture, source=f.path)
    if cp is not None:
        try:
            cp.parent.mkdir(parents=True, exist_ok=True)
            tmp = cp.with_suffix(f".{os.getpid()}.tmp")
            tok.save(tmp)
            os.replace(str(tmp) + ".tandem.json", str(cp) + ".tandem.json")
            os.replace(tmp, cp)
        except OSError:
            pass
    return tok


def load(path: str | os.PathLike | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, tokenizer: bool = True, tokenizer_cache: bool = True,
         weight_format: str | None = None) -> Loaded:
    """Load a model: a GGUF file, an HF directory, or an embedded model's name (None: the default), assembled into the
    cache on first use (tandem.loading.default).

    weight_format: also prepare the weights in that kernel format (tandem.kernels.prepare); a GGUF then goes from
    the mapped file straight into it one tensor at a time (tandem.loading.stream), never as a whole fp32 model."""
    from tandem.loading import stream
    from tandem.loading.default import EMBEDDED, model_path
    from tandem.models import build

    if path is None or (str(path) in EMBEDDED and not Path(path).exists()):
        path = model_path(path)
    path = str(path)
    kind = detect_kind(path)
    if kind == "gguf" and Path(path).is_dir():  # a directory holding one .gguf and no config.json
        path = str(next(Path(path).glob("*.gguf")))
    if kind == "gguf":
        from tandem.loading.gguf import GGUFFile
        f = GGUFFile(path)
        config = f.config()
        # a drafter reading its target's tokens (needs_tokenizer=False) loads no tokenizer of its own
        tok = _gguf_tokenizer(f, tokenizer_cache) if tokenizer and f.arch().needs_tokenizer else None
        template = f.chat_template
    else:
        from tandem.loading import hf
        if Path(path).name == "config.json":
            path = str(Path(path).parent)
        config = hf.read_config(path)
        tok, template = hf.read_tokenizer(path, config) if tokenizer else (None, None)
    with _no_init(), stream.meta_params():
        model = build(config)  # parameters on the meta device: every one is about to be loaded
    streamable = kind == "gguf" and weight_format is not None and torch.device(device).type == "cpu" \
        and dtype == torch.float32
    names = stream.plan(f, config, model) if streamable else None
    if names is not None:
        stream.load_streaming(f, config, model, names, weight_format)
    else:
        if kind == "gguf":
            weights = f.state_dict(dtype=dtype, config=config)
            file_names, blocks = f.sources, f.blocks
        else:
            weights, file_names, blocks = hf.state_dict(path, dtype=dtype), None, {}
        weights = model.sanitize(weights)  # an instance method where the renames depend on the config (gemma4)
        load_state_into(model, weights, path, file_names)
        del weights
        model.gguf_blocks = blocks  # raw GGUF rows by parameter name, for kernels.prepare(model, "native")
    model.requires_grad_(False)
    model.to(device=device)
    model.eval()
    if weight_format is not None and names is None:
        from tandem import kernels
        kernels.prepare(model, weight_format)
    name = next((n for n, m in EMBEDDED.items() if m.file == Path(path).name), None)
    return Loaded(model=model, config=config, tokenizer=tok, chat_template=template, path=path, kind=kind, name=name)
