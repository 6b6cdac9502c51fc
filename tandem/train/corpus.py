"""Training text these machines can get: Python's stdlib sources, Debian doc packages, any text files you name.

Nothing here is committed; `describe()` records what was used (files, bytes, a digest) so a run can be reproduced.
"""

from __future__ import annotations

import gzip
import hashlib
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ConfigError

TEXT_SUFFIXES = (".py", ".rst", ".txt", ".md", ".rst.txt", ".rst.gz", ".txt.gz", ".c", ".h", ".go", ".rs")


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _named_source(name: str) -> list[Path]:
    """`stdlib` = Python standard library sources without tests; anything else is a file/directory path."""
    if name == "stdlib":
        root = stdlib_dir()
        return sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "tests" not in p.parts
                      and "site-packages" not in p.parts and "idlelib" not in p.parts)
    p = Path(name).expanduser()
    if p.is_file():
        return [p]
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.name.endswith(TEXT_SUFFIXES))
    raise ConfigError(f"training data source {name!r}: not 'stdlib' and no such file or directory")


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


@dataclass
class Corpus:
    files: list[Path]

    @classmethod
    def from_sources(cls, sources: list[str]) -> "Corpus":
        files: list[Path] = []
        for s in sources:
            files += _named_source(s)
        if not files:
            raise ConfigError(f"training data sources {sources} hold no text files")
        return cls(files)

    def describe(self) -> dict:
        h = hashlib.sha256()
        total = 0
        for f in self.files:
            size = f.stat().st_size
            total += size
            h.update(f"{f}:{size}\n".encode())
        return {"n_files": len(self.files), "bytes": total, "listing_sha256": h.hexdigest()}

    def documents(self, seed: int, max_chars: int = 20000):
        """Shuffled (fixed seed) document texts, long files cut into pieces of at most max_chars."""
        files = list(self.files)
        random.Random(seed).shuffle(files)
        for f in files:
            text = read_text(f)
            for i in range(0, len(text), max_chars):
                piece = text[i:i + max_chars]
                if len(piece.strip()) > 200:
                    yield piece
