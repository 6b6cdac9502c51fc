"""Frozen request/engine settings. from_dict ignores unknown keys; bad values raise ConfigError naming the field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tandem.errors import ConfigError


def _from_dict(cls, d: dict[str, Any] | None):
    d = d or {}
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy. Processing order: temperature -> top_k -> top_p -> min_p (see tandem.sampling)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, (list, str)):
            object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        checks = [
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an integer >= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("min_p", 0 <= self.min_p < 1, "in [0, 1)"),
            ("max_tokens", isinstance(self.max_tokens, int) and self.max_tokens >= 1, "an integer >= 1"),
        ]
        for name, ok, want in checks:
            if not ok:
                raise ConfigError(f"sampling.{name} must be {want}, got {getattr(self, name)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    from_dict = classmethod(_from_dict)


@dataclass(frozen=True)
class SpecConfig:
    """Speculation settings for one request. method: a name in tandem.spec.drafter.METHODS (a drafter kind and
    whether drafts are sampled); "auto" = the engine's drafter, argmax drafts. n_max / n_min / p_min are applied
    by tandem.spec.policy."""

    enabled: bool = True
    method: str = "auto"
    n_max: int = 3
    n_min: int = 1
    p_min: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.n_max, int) and 1 <= self.n_max <= 16):
            raise ConfigError(f"speculative.n_max must be an integer in [1, 16], got {self.n_max!r}")
        if not (isinstance(self.n_min, int) and 1 <= self.n_min <= self.n_max):
            raise ConfigError(f"speculative.n_min must be an integer in [1, n_max={self.n_max}], got {self.n_min!r}")
        if not 0 <= self.p_min <= 1:
            raise ConfigError(f"speculative.p_min must be in [0, 1], got {self.p_min!r}")

    from_dict = classmethod(_from_dict)
