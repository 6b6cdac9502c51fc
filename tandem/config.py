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
    by tandem.spec.policy; adaptive: n_max is a cap and each round's length is chosen from the acceptance and the
    measured round cost (the CLI, server and bench turn it on; a bare SpecConfig pins k = n_max, as tests need).
    n_max / p_min None = unset: resolved() takes the drafter's recommendation, else N_MAX / P_MIN."""

    N_MAX = 3  # built-in defaults of the unset n_max / p_min
    P_MIN = 0.0

    enabled: bool = True
    method: str = "auto"
    n_max: int | None = None
    n_min: int = 1
    p_min: float | None = None
    adaptive: bool = False
    chain: tuple[str, ...] = ()  # drafters to try in order each round (tandem.spec.chain); () = the engine's order
    tree: bool | int | None = None  # draft trees: False/None off, True on (default node budget), int: node budget

    def __post_init__(self):
        if isinstance(self.chain, (list, str)):
            object.__setattr__(self, "chain", (self.chain,) if isinstance(self.chain, str) else tuple(self.chain))
        if not all(isinstance(n, str) and n for n in self.chain) or len(set(self.chain)) != len(self.chain):
            raise ConfigError(f"speculative.chain must list distinct drafter names, got {list(self.chain)!r}")
        if self.tree is not None and not isinstance(self.tree, bool) and not (
                _is_int(self.tree) and 1 <= self.tree <= 64):
            raise ConfigError(f"speculative.tree must be true, false or a node budget in [1, 64], got {self.tree!r}")
        if not isinstance(self.adaptive, bool):
            raise ConfigError(f"speculative.adaptive must be true or false, got {self.adaptive!r}")
        if self.n_max is not None and not (_is_int(self.n_max) and 1 <= self.n_max <= 16):
            raise ConfigError(f"speculative.n_max must be an integer in [1, 16], got {self.n_max!r}")
        top = 16 if self.n_max is None else self.n_max
        if not (_is_int(self.n_min) and 1 <= self.n_min <= top):
            raise ConfigError(f"speculative.n_min must be an integer in [1, n_max={top}], got {self.n_min!r}")
        if self.p_min is not None and (isinstance(self.p_min, bool) or not isinstance(self.p_min, (int, float))
                                       or not 0 <= self.p_min <= 1):
            raise ConfigError(f"speculative.p_min must be a number in [0, 1], got {self.p_min!r}")

    def resolved(self, recommended: dict | None = None) -> "SpecConfig":
        """n_max / p_min set: kept; unset: the drafter's `recommended` value, else N_MAX / P_MIN (n_max raised to
        n_min: a length the request set wins over a recommendation)."""
        rec = recommended or {}
        n_max = self.n_max if self.n_max is not None else max(self.n_min, rec.get("n_max", self.N_MAX))
        p_min = self.p_min if self.p_min is not None else rec.get("p_min", self.P_MIN)
        return dataclasses.replace(self, n_max=n_max, p_min=float(p_min))

    from_dict = classmethod(_from_dict)


# -- model config.json checks (before anything is built or allocated) ---------------------------------------------
# field -> largest plausible value: far above every released model, far below what would exhaust memory
_MODEL_INTS = {"vocab_size": 1 << 24, "hidden_size": 1 << 16, "intermediate_size": 1 << 20,
               "moe_intermediate_size": 1 << 20, "num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 12,
               "num_key_value_heads": 1 << 12, "head_dim": 1 << 13, "num_experts": 1 << 14,
               "num_local_experts": 1 << 14, "n_routed_experts": 1 << 14, "num_experts_per_tok": 1 << 14,
               "kv_lora_rank": 1 << 16, "q_lora_rank": 1 << 16, "max_position_embeddings": 1 << 26,
               "hidden_size_per_layer_input": 1 << 16, "vocab_size_per_layer_input": 1 << 24,
               "sliding_window": 1 << 26}
_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")  # others may be 0 (unused)
_MODEL_FLOATS = ("rms_norm_eps", "layer_norm_eps", "rope_theta")
_TOKEN_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_model_config(cfg: dict, source: str, error: type[Exception] = ConfigError) -> None:
    """`error` naming `source` and the field for a config.json value of the wrong type, an absurd size, or a
    special-token id outside the vocabulary; nested `text_config` checked too. Run before building the model."""
    if not isinstance(cfg, dict):
        raise error(f"{source}: expected a JSON object, got {type(cfg).__name__}")
    for key, limit in _MODEL_INTS.items():
        v = cfg.get(key)
        for n in (v if isinstance(v, list) else [] if v is None else [v]):  # GGUF may store one per layer
            if not _is_int(n):
                raise error(f"{source}: field {key!r} must be an integer, got {type(n).__name__} {n!r}")
            low = 1 if key in _POSITIVE else 0
            if not low <= n <= limit:
                raise error(f"{source}: field {key!r} = {n} is outside [{low}, {limit}]")
    for key in _MODEL_FLOATS:
        v = cfg.get(key)
        for x in (v if isinstance(v, list) else [] if v is None else [v]):  # Step3.5: rope_theta per layer
            if isinstance(x, bool) or not isinstance(x, (int, float)):
                raise error(f"{source}: field {key!r} must be a number, got {type(x).__name__} {x!r}")
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    vocab = cfg.get("vocab_size", text.get("vocab_size"))
    for key in _TOKEN_IDS:
        v = cfg.get(key)
        for t in (v if isinstance(v, list) else [] if v is None else [v]):
            if not _is_int(t):
                raise error(f"{source}: field {key!r} must be an integer token id (or a list of them), "
                            f"got {type(t).__name__} {t!r}")
            if key != "pad_token_id" and vocab is not None and not 0 <= t < vocab:  # some configs pad with -1
                raise error(f"{source}: field {key!r} = {t} is outside the vocabulary [0, {vocab})")
    if text:
        check_model_config(text, f"{source} (text_config)", error)
