"""GGUF files: metadata -> HF-style config dict, tensors -> HF-named torch tensors, tokenizer metadata.

Everything architecture-specific is data in `ARCHS` (one `GGUFArch` per `general.architecture`): which GGUF metadata
keys become which config.json keys, the config values llama.cpp does not store, the tensor-name keymap
(llama.cpp name pattern -> HF checkpoint name) and the value fix-ups llama.cpp's converter applied (named ops from
`FIXUPS`, e.g. Gemma norms stored as `1 + w`). To support a new architecture, add an entry to `ARCHS` (gemma3 is
defined here, gemma4-assistant in gguf_gemma4_assistant.py).

Tensors are dequantized to fp32 (or `dtype`) with `gguf.quants.dequantize`, which covers every ggml quant type the
installed gguf-py knows; F32/F16/BF16/Q8_0 take a vectorized torch path that gives bit-identical results.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from tandem.errors import ModelLoadError
from tandem.loading import gguf_gemma4_assistant as gemma4_assistant
from tandem.loading.gguf_reader import _reader

GGUF_MAGIC = b"GGUF"


# -- value fix-ups: undo what llama.cpp's convert_hf_to_gguf.py did to a tensor ------------------------------------

def _minus_one(t: torch.Tensor) -> torch.Tensor:
    # Gemma RMSNorm computes x * (1 + w); llama.cpp's converter stores (w + 1) so its norm is a plain x * w'.
    return t - 1.0


FIXUPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "minus_one": _minus_one,
}


@dataclass
class GGUFArch:
    """How to read one `general.architecture`.

    config_keys: GGUF metadata key (without the `<arch>.` prefix) -> HF config key.
    config_defaults: HF config values llama.cpp does not store (it hard-codes them per architecture).
    tensors: GGUF tensor name -> HF name; `{bid}` stands for the block index in both.
    optional: GGUF names (patterns) that may be absent (e.g. `output.weight` when the head is tied).
    fixups: regex on the GGUF name -> name of an op in FIXUPS, applied after dequantization.
    finalize: optional function(config, gguf_file) adjusting the config once everything is read (may also check
        which tensors are present, e.g. ones that are required only in some configurations).
    derived: GGUF tensors the converter generated from the config (e.g. `rope_freqs.weight`): finalize reads them
        back into the config; they are not weights.
    needs_tokenizer: False for drafters that read their target's tokens (the file's tokenizer is not loaded).
    """

    model_type: str
    architectures: list[str]
    config_keys: dict[str, str]
    config_defaults: dict[str, Any]
    tensors: dict[str, str]
    optional: set[str] = field(default_factory=set)
    fixups: dict[str, str] = field(default_factory=dict)
    finalize: Callable[[dict, "GGUFFile"], None] | None = None
    derived: set[str] = field(default_factory=set)
    needs_tokenizer: bool = True

    def __post_init__(self):
        self._patterns = [(re.compile("^" + re.escape(g).replace(r"\{bid\}", r"(?P<bid>\d+)") + "$"), g, h)
                          for g, h in self.tensors.items()]
        self._fixups = [(re.compile(p), FIXUPS[op]) for p, op in self.fixups.items()]

    def hf_name(self, gguf_name: str) -> str | None:
        for rx, _, hf in self._patterns:
            m = rx.match(gguf_name)
            if m:
                return hf.format(**m.groupdict())
        return None

    def fixup(self, gguf_name: str, t: torch.Tensor) -> torch.Tensor:
        for rx, fn in self._fixups:
            if rx.search(gguf_name):
                t = fn(t)
        return t

    def expected(self, n_blocks: int) -> list[str]:
        """Every GGUF tensor name the model needs (optional ones excluded)."""
        out = []
        for g in self.tensors:
            if g in self.optional:
                continue
            out.extend([g.format(bid=i) for i in range(n_blocks)] if "{bid}" in g else [g])
        return out


# The llama.cpp names of the dense-decoder pieces every Gemma shares.
_GEMMA_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{bid}.attn_q.weight": "model.layers.{bid}.self_attn.q_proj.weight",
    "blk.{bid}.attn_k.weight": "model.layers.{bid}.self_attn.k_proj.weight",
    "blk.{bid}.attn_v.weight": "model.layers.{bid}.self_attn.v_proj.weight",
    "blk.{bid}.attn_output.weight": "model.layers.{bid}.self_attn.o_proj.weight",
    "blk.{bid}.attn_q_norm.weight": "model.layers.{bid}.self_attn.q_norm.weight",
    "blk.{bid}.attn_k_norm.weight": "model.layers.{bid}.self_attn.k_norm.weight",
    "blk.{bid}.attn_norm.weight": "model.layers.{bid}.input_layernorm.weight",
    "blk.{bid}.post_attention_norm.weight": "model.layers.{bid}.post_attention_layernorm.weight",
    "blk.{bid}.ffn_norm.weight": "model.layers.{bid}.pre_feedforward_layernorm.weight",
    "blk.{bid}.post_ffw_norm.weight": "model.layers.{bid}.post_feedforward_layernorm.weight",
    "blk.{bid}.ffn_gate.weight": "model.layers.{bid}.mlp.gate_proj.weight",
    "blk.{bid}.ffn_up.weight": "model.layers.{bid}.mlp.up_proj.weight",
    "blk.{bid}.ffn_down.weight": "model.layers.{bid}.mlp.down_proj.weight",
}


def _gemma3_finalize(cfg: dict, f: "GGUFFile") -> None:
    # Attention scale: llama.cpp uses 1/sqrt(hidden/heads) for the 27B (62 blocks) and 1/sqrt(head_dim) otherwise,
    # which is what each HF config.json's query_pre_attn_scalar says (168 for 27B, 256 for the others).
    n_layers = cfg["num_hidden_layers"]
    cfg["query_pre_attn_scalar"] = (cfg["hidden_size"] // cfg["num_attention_heads"] if n_layers == 62
                                    else cfg["head_dim"])
    # llama.cpp: every 6th layer is global (set_swa_pattern(6)); local layers use rope base 10000 (hard-coded).
    p = cfg["sliding_window_pattern"]
    cfg["layer_types"] = ["sliding_attention" if (i + 1) % p else "full_attention" for i in range(n_layers)]
    # Global layers of the 4B/12B/27B use linear RoPE scaling (factor 8), stored as rope.scaling.*.
    kind = f.meta("gemma3.rope.scaling.type")
    factor = f.meta("gemma3.rope.scaling.factor")
    full = {"rope_type": "default", "rope_theta": cfg["rope_theta"]}
    if kind is not None and kind != "none" and factor is not None:
        if kind != "linear":
            raise ModelLoadError(f"{f.path}: unsupported gemma3 rope scaling {kind!r} (only 'linear')")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
        full = {"rope_type": "linear", "factor": float(factor), "rope_theta": cfg["rope_theta"]}
    cfg["rope_parameters"] = {"full_attention": full,
                              "sliding_attention": {"rope_type": "default",
                                                    "rope_theta": cfg["rope_local_base_freq"]}}


ARCHS: dict[str, GGUFArch] = {
    "gemma3": GGUFArch(
        model_type="gemma3_text",
        architectures=["Gemma3ForCausalLM"],
        config_keys={
            "context_length": "max_position_embeddings",
            "block_count": "num_hidden_layers",
            "feed_forward_length": "intermediate_size",
            "embedding_length": "hidden_size",
            "rope.freq_base": "rope_theta",
            "attention.key_length": "head_dim",
            "attention.head_count": "num_attention_heads",
            "attention.head_count_kv": "num_key_value_heads",
            "attention.layer_norm_rms_epsilon": "rms_norm_eps",
            "attention.sliding_window": "sliding_window",
            "vocab_size": "vocab_size",
        },
        config_defaults={
            "hidden_activation": "gelu_pytorch_tanh",
            "rope_local_base_freq": 10000.0,
            "rope_theta": 1000000.0,
            "rope_scaling": None,
            "sliding_window_pattern": 6,
            "final_logit_softcapping": None,
            "attn_logit_softcapping": None,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_bidirectional_attention": False,
        },
        tensors=_GEMMA_TENSORS,
        optional={"output.weight"},
        # verified against transformers (Gemma2TensorProcessor: every "norm.weight" gets -1) and by comparing
        # state dicts with AutoModelForCausalLM.from_pretrained(gguf_file=...) in tests/test_real_model.py.
        # No q/k permutation: llama.cpp only permutes q/k for the llama family.
        fixups={r"norm\.weight$": "minus_one"},
        finalize=_gemma3_finalize,
    ),
}


ARCHS[gemma4_assistant.ARCH] = GGUFArch(**gemma4_assistant.SPEC)


def _check_magic(path: str) -> None:
    if not os.path.exists(path):
        raise ModelLoadError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ModelLoadError(f"{path}: is a directory, expected a .gguf file")
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head != GGUF_MAGIC:
        raise ModelLoadError(f"{path}: not a GGUF file (magic {head!r}, expected {GGUF_MAGIC!r})")


# -- dequantization ------------------------------------------------------------------------------------------------

def _fast_dequant(data: np.ndarray, qtype) -> torch.Tensor | None:
    """Torch paths for the types where numpy in gguf-py is slow; bit-identical to gguf.quants.dequantize."""
    with warnings.catch_warnings():  # the mmap is read-only; every path below makes a new tensor
        warnings.simplefilter("ignore", UserWarning)
        return _fast_dequant_impl(data, qtype)


def _fast_dequant_impl(data: np.ndarray, qtype) -> torch.Tensor | None:
    from gguf import GGMLQuantizationType as Q
    if qtype == Q.F32:
        return torch.from_numpy(np.array(data, dtype=np.float32, copy=True))
    if qtype in (Q.I8, Q.I16, Q.I32, Q.I64):  # integer tensors (e.g. a token ordering) stay integral, as int64
        return torch.from_numpy(np.array(data, dtype=np.int64, copy=True))
    if qtype == Q.F16:
        return torch.from_numpy(np.ascontiguousarray(data).view(np.float16)).float()
    if qtype == Q.BF16:
        raw = torch.from_numpy(np.ascontiguousarray(data).view(np.int16))
        return raw.view(torch.bfloat16).float()
    if qtype == Q.Q8_0:
        # block = fp16 scale d + 32 x int8 q; value = d * q (gguf-py computes it in fp32)
        raw = np.ascontiguousarray(data, dtype=np.uint8)
        rows = raw.shape[:-1]
        blocks = torch.from_numpy(raw.reshape(-1, 34))
        d = blocks[:, :2].contiguous().view(torch.float16).float()
        q = blocks[:, 2:].contiguous().view(torch.int8).float()
        return q.mul_(d).reshape(*rows, -1)  # in place: one fp32 copy of the (large) embedding at a time
    return None


def dequantize(data: np.ndarray, qtype) -> torch.Tensor:
    """A GGUF tensor's raw data -> fp32 torch tensor in the numpy (row-major) shape (int64 for integer types)."""
    t = _fast_dequant(data, qtype)
    if t is not None:
        return t
    from gguf.quants import dequantize as gq_dequantize
    return torch.from_numpy(np.ascontiguousarray(gq_dequantize(data, qtype), dtype=np.float32))


# -- the file --------------------------------------------------------------------------------------------------------

class GGUFFile:
    """An opened (memory-mapped) GGUF file."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        _check_magic(self.path)
        try:
            self.reader = _reader(self.path)
        except ModelLoadError:
            raise
        except Exception as e:  # gguf-py raises ValueError/IndexError/struct errors/... on bad or truncated data
            raise ModelLoadError(f"{self.path}: corrupt or truncated GGUF file "
                                 f"({type(e).__name__}: {e})") from None
        self.fields = self.reader.fields
        self.architecture = self.meta("general.architecture")
        if self.architecture is None:
            raise ModelLoadError(f"{self.path}: GGUF has no general.architecture")
        self._tensors = {t.name: t for t in self.reader.tensors}

    # metadata
    def meta(self, key: str, default=None):
        f = self.fields.get(key)
        if f is None:
            return default
        try:
            return f.contents()
        except Exception as e:
            raise ModelLoadError(f"{self.path}: cannot read metadata {key!r} ({type(e).__name__}: {e})") from None

    def arch(self) -> GGUFArch:
        spec = ARCHS.get(self.architecture)
        if spec is None:
            raise ModelLoadError(f"{self.path}: unsupported GGUF architecture {self.architecture!r}; "
                                 f"supported: {sorted(ARCHS)}")
        return spec

    def config(self) -> dict:
        """HF config.json-style dict for this model."""
        spec = self.arch()
        a = self.architecture
        cfg: dict[str, Any] = {"model_type": spec.model_type, "architectures": list(spec.architectures)}
        cfg.update(spec.config_defaults)
        for gk, hk in spec.config_keys.items():
            v = self.meta(f"{a}.{gk}")
            if isinstance(v, float):  # stored as float32: 1e-6 reads back as 9.99999997e-07; keep config.json's
                v = float(str(np.float32(v)))
            if v is not None:
                cfg[hk] = v
        if "vocab_size" not in cfg:
            tokens = self.fields.get("tokenizer.ggml.tokens")
            if tokens is not None:
                cfg["vocab_size"] = len(tokens.data)
            elif "token_embd.weight" in self._tensors:
                cfg["vocab_size"] = int(self._tensors["token_embd.weight"].shape[-1])
        for key, hk in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
            v = self.meta(f"tokenizer.ggml.{key}")
            if v is not None:
                cfg[hk] = int(v)
        cfg["tie_word_embeddings"] = "output.weight" not in self._tensors
        missing = [k for k in ("num_hidden_layers", "hidden_size") if k not in cfg]
        if missing:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks {[f'{a}.{k}' for k in missing]}")
        if spec.finalize is not None:
            spec.finalize(cfg, self)
        return cfg

    # tensors
    @property
    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def tensor_info(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """GGUF name -> (quant type name, torch shape)."""
        return {n: (t.tensor_type.name, tuple(int(x) for x in reversed(t.shape))) for n, t in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        """One tensor, dequantized to fp32 (integer types: int64), in torch (row-major) shape, without fix-ups."""
        t = self._tensors.get(name)
        if t is None:
            raise ModelLoadError(f"{self.path}: missing tensor {name!r}")
        shape = tuple(int(x) for x in reversed(t.shape))
        try:
            w = dequantize(t.data, t.tensor_type)
            return w.reshape(shape)
        except Exception as e:
            raise ModelLoadError(f"{self.path}: cannot read tensor {name!r} ({t.tensor_type.name}, shape {shape}): "
                                 f"{type(e).__name__}: {e}") from None

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """All tensors under their HF names, fix-ups applied, in `dtype`."""
        spec = self.arch()
        n_blocks = int(self.meta(f"{self.architecture}.block_count", 0))
        missing = [n for n in spec.expected(n_blocks) if n not in self._tensors]
        if missing:
            raise ModelLoadError(f"{self.path}: missing tensor(s) {missing[:8]}"
                                 f"{' ...' if len(missing) > 8 else ''} for architecture {self.architecture!r}")
        out = {}
        unknown = []
        for name in self._tensors:
            if name in spec.derived:
                continue
            hf = spec.hf_name(name)
            if hf is None:
                unknown.append(name)
                continue
            w = spec.fixup(name, self.read(name))
            out[hf] = w if w.dtype == dtype or not w.is_floating_point() else w.to(dtype)
        if unknown:
            raise ModelLoadError(f"{self.path}: tensor(s) with no mapping for architecture {self.architecture!r}: "
                                 f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        return out

    # tokenizer
    def tokenizer_metadata(self) -> dict[str, Any]:
        """Every `tokenizer.*` metadata value (arrays as lists), keyed by its full GGUF key."""
        return {k: self.meta(k) for k in self.fields if k.startswith("tokenizer.")}

    @property
    def chat_template(self) -> str | None:
        return self.meta("tokenizer.chat_template")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
