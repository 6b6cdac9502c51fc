"""Drafters shipped inside the package, and the targets they were trained for (matched by file sha256)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

SHIPPED_DIR = Path(__file__).parent

# drafter directory (under this package) -> sha256 of the target file it was trained for. Listed drafters are on
# by default (--no-spec turns them off); only drafters that make their target faster belong here.
GEMMA_3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # embedded gemma-3-270m
# gemma-3-270m/: bench (greedy, n_max 3) acceptance 0.39, mean length 2.16, 1.46x plain speed (TRAINING.md)
QWEN25_CODER_15B_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"  # the embedded default
QWEN25_CODER_05B_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"  # --model ...-0.5b-...
# qwen2.5-coder-{1.5b,0.5b}-instruct/: EAGLE-3 heads (train-eagle3, TRAINING.md); chat bench figures in the README
KNOWN: dict[str, set[str]] = {"gemma-3-270m": {GEMMA_3_270M_SHA256},
                              "qwen2.5-coder-1.5b-instruct": {QWEN25_CODER_15B_SHA256},
                              "qwen2.5-coder-0.5b-instruct": {QWEN25_CODER_05B_SHA256}}
_MAX_HASH_BYTES = 2 << 30  # don't hash multi-GB targets just to look for a drafter


def _sha256(path: Path) -> str | None:
    """A file's sha256: from the loader's stamp when it is current, else computed (small files only)."""
    st = path.stat()
    stamp = path.with_name(path.name + ".stamp.json")
    try:
        s = json.loads(stamp.read_text())
        if s.get("size") == st.st_size and s.get("mtime_ns") == st.st_mtime_ns:
            return s["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    if st.st_size > _MAX_HASH_BYTES:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def known_drafter(target_path: str | os.PathLike | None) -> Path | None:
    """The shipped drafter directory for this target file, if one was trained for it."""
    if target_path is None or not Path(target_path).is_file():
        return None
    sha = _sha256(Path(target_path))
    for name, shas in KNOWN.items():
        d = SHIPPED_DIR / name
        if sha in shas and (d / "config.json").is_file() and (d / "model.safetensors").is_file():
            return d
    return None
