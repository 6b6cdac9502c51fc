"""`GGUFArch`: how one `general.architecture` maps to an HF config dict and HF-named tensors, as data."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:
    from tandem.loading.gguf import GGUFFile

Fixup = Callable[[torch.Tensor, dict], torch.Tensor]


@dataclass
class GGUFArch:
    """How to read one `general.architecture`.

    config_keys: GGUF metadata key (without the `<arch>.` prefix) -> HF config key.
    config_defaults: HF config values llama.cpp does not store (it hard-codes them per architecture).
    tensors: GGUF tensor name -> HF name; `{bid}` stands for the block index in both.
    optional: GGUF names (patterns) that may be absent (e.g. `output.weight` when the head is tied).
    fixups: regex on the GGUF name -> fn(tensor, config) undoing what llama.cpp's converter did to the values.
    finalize: optional fn(config, gguf_file) adjusting the config once everything is read (may also check which
        tensors are present, e.g. ones that are required only in some configurations).
    derived: GGUF tensors the converter generated from the config (e.g. `rope_freqs.weight`): finalize reads them
        back into the config; they are not weights.
    needs_tokenizer: False for drafters that read their target's tokens (the file's tokenizer is not loaded).
    regroup: optional fn(hf_weights, config) -> hf_weights, after the fix-ups, for what the converter split or moved
        across tensors (e.g. MLA's kv_b_proj stored as attn_k_b + attn_v_b, Qwen3.5's mtp.* stored as blk.{L}).
    """

    model_type: str
    architectures: list[str]
    config_keys: dict[str, str]
    config_defaults: dict[str, Any]
    tensors: dict[str, str]
    optional: set[str] = field(default_factory=set)
    fixups: dict[str, Fixup] = field(default_factory=dict)
    finalize: Callable[[dict, "GGUFFile"], None] | None = None
    derived: set[str] = field(default_factory=set)
    needs_tokenizer: bool = True
    regroup: Callable[[dict[str, torch.Tensor], dict], dict[str, torch.Tensor]] | None = None

    def __post_init__(self):
        self._patterns = [(re.compile("^" + re.escape(g).replace(r"\{bid\}", r"(?P<bid>\d+)") + "$"), g, h)
                          for g, h in self.tensors.items()]
        self._fixups = [(re.compile(p), fn) for p, fn in self.fixups.items()]

    def hf_name(self, gguf_name: str) -> str | None:
        for rx, _, hf in self._patterns:
            m = rx.match(gguf_name)
            if m:
                return hf.format(**m.groupdict())
        return None

    def fixup(self, gguf_name: str, t: torch.Tensor, config: dict) -> torch.Tensor:
        for rx, fn in self._fixups:
            if rx.search(gguf_name):
                t = fn(t, config)
        return t

    def has_fixup(self, gguf_name: str) -> bool:
        return any(rx.search(gguf_name) for rx, _ in self._fixups)

    def expected(self, n_blocks: int) -> list[str]:
        """Every GGUF tensor name the model needs (optional ones excluded)."""
        out = []
        for g in self.tensors:
            if g in self.optional:
                continue
            out.extend([g.format(bid=i) for i in range(n_blocks)] if "{bid}" in g else [g])
        return out
