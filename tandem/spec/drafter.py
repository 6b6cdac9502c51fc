"""The drafter protocol and the one registry of speculative methods (name -> drafter class + options).

A round of speculative decoding, as the engine (tandem.engine.speculative) runs it for one slot:

    drafter.begin(slot, prompt_state)             once, after prefill (the prompt's last hidden state)
    loop:
        draft = drafter.propose(ctx)              ctx.last_token is the last emitted token, at ctx.position
                                                  (not yet in the target cache: cache length == ctx.position)
        target forward over [last_token, d1..dk]  ONE forward, k+1 rows of logits and hidden states
        verdict = verify(...)                     a accepted drafts, then one recovered or bonus token
        cache rolled back to position + a + 1     only the engine moves cache lengths
        drafter.accept(slot, a, target_hidden)    target_hidden [B, D]: the row that produced the last emitted token

A drafter never writes the target cache and never leaves it longer than the accepted tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from tandem.config import SamplingParams, SpecConfig
from tandem.errors import ConfigError


@dataclass
class Draft:
    """tokens [B, k] (long); probs [B, k, V] fp32: the distribution each token was SAMPLED from, or None when the
    tokens are deterministic (greedy / argmax drafts: verify treats them as one-hot q). k may be 0 (no draft)."""

    tokens: torch.Tensor
    probs: torch.Tensor | None = None
    confidences: list[float] = field(default_factory=list)  # drafter's probability of each token (for traces)

    @property
    def k(self) -> int:
        return int(self.tokens.shape[1])

    @staticmethod
    def empty(batch: int = 1, device="cpu") -> "Draft":
        return Draft(torch.zeros(batch, 0, dtype=torch.long, device=device), None)


@dataclass
class PromptState:
    """What a drafter may read after prefill. hidden: the target's final-norm hidden state of the last prompt
    row [B, D] (it produced the first generated token)."""

    ids: list[int]
    hidden: torch.Tensor
    cache: Any  # tandem.kvcache.KVCache of the target


@dataclass
class DraftContext:
    """One propose() call. last_token sits at `position`; the target cache holds entries 0..position-1."""

    slot: int
    last_token: int
    position: int
    cache: Any
    sampling: SamplingParams
    spec: SpecConfig
    k_max: int  # most tokens this round may draft (n_max capped by context and budget)
    sample_drafts: bool = False  # draw from the drafter's processed distribution (T > 0 and the method asks)
    generator: torch.Generator | None = None
    request_id: str | None = None
    round: int = 0


class Drafter:
    """Base class / protocol. Class attributes say what the engine must provide."""

    needs_target_hidden: ClassVar[bool] = False  # accept() gets the target hidden row
    reads_target_kv: ClassVar[bool] = False  # propose() reads the target cache (must hold exactly the prefix)
    max_draft: ClassVar[int] = 16

    def begin(self, slot: int, prompt_state: PromptState) -> None:
        raise NotImplementedError

    def propose(self, ctx: DraftContext) -> Draft:
        raise NotImplementedError

    def accept(self, slot: int, n_accepted: int, target_hidden: torch.Tensor | None) -> None:
        raise NotImplementedError

    def end(self, slot: int) -> None:
        """Forget the slot's state (optional)."""


@dataclass(frozen=True)
class Method:
    name: str
    drafter_cls: type
    sample_drafts: bool  # at T > 0 drafts are sampled (p/q rejection) instead of argmax (sample-and-compare)
    help: str = ""


# name -> Method: the only place speculative method names are defined (SpecConfig.method picks one)
METHODS: dict[str, Method] = {}


def register(name: str, sample_drafts: bool = False, help: str = ""):
    def deco(cls):
        METHODS[name] = Method(name, cls, sample_drafts, help)
        return cls
    return deco


def get_method(name: str) -> Method:
    # importing the package registers the built-in drafters
    import tandem.spec  # noqa: F401
    m = METHODS.get(name)
    if m is None:
        raise ConfigError(f"speculative.method {name!r} unknown; known: {sorted(METHODS)}")
    return m
