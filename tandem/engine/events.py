"""Typed events the engine yields; the CLI, server and bench consume the same stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Token:
    id: int
    text: str  # newly releasable text (may be "" while a stop string or a UTF-8 character is pending)
    from_draft: bool = False


@dataclass
class GenStats:
    prompt_n: int = 0
    cached_n: int = 0  # prompt tokens restored from the prefix cache instead of prefilled
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0
    spec: Any = None  # tandem.spec.stats.SpecStats when speculation ran

    @property
    def prompt_per_second(self) -> float:
        return 1000.0 * self.prompt_n / self.prompt_ms if self.prompt_ms else 0.0

    @property
    def predicted_per_second(self) -> float:
        return 1000.0 * self.predicted_n / self.predicted_ms if self.predicted_ms else 0.0

    def timing_line(self) -> str:
        return (f"prompt: {self.prompt_n} tok, {self.prompt_per_second:.1f} tok/s | "
                f"decode: {self.predicted_n} tok, {self.predicted_per_second:.1f} tok/s")


@dataclass
class Finished:
    reason: str  # "stop" (EOS or stop string), "length" (max_tokens or context full)
    stats: GenStats = field(default_factory=GenStats)
    text: str = ""  # the whole completion text
