"""GGUF files: metadata -> HF-style config dict, tensors -> HF-named torch tensors, tokenizer metadata.

Everything architecture-specific is data in `gguf_archs/` (one `GGUFArch` per `general.architecture`): which GGUF
metadata keys become which config.json keys, the config values llama.cpp does not store, the tensor-name keymap
(llama.cpp name pattern -> HF checkpoint name) and the value fix-ups llama.cpp's converter applied (fn(tensor,
config), e.g. Gemma norms stored as `1 + w`, llama's permuted q/k rows).

Tensors are dequantized to fp32 (or `dtype`) with `gguf.quants.dequantize`, which covers every ggml quant type the
installed gguf-py knows; F32/F16/BF16/Q8_0 take a vectorized torch path that gives bit-identical results.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch

from tandem.config import check_model_config
from tandem.errors import ModelLoadError
from tandem.kernels.kquants import SUPPORTED_TYPES
from tandem.loading.gguf_archs import ARCHS, GGUFArch
from tandem.loading.gguf_reader import _reader

GGUF_MAGIC = b"GGUF"


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
        if "vocab_size" not in cfg:  # the embedding's rows (a vocabulary may be padded), else the token list
            tokens = self.fields.get("tokenizer.ggml.tokens")
            if "token_embd.weight" in self._tensors:
                cfg["vocab_size"] = int(self._tensors["token_embd.weight"].shape[-1])
            elif tokens is not None:
                cfg["vocab_size"] = len(tokens.data)
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
        check_model_config(cfg, f"{self.path} (metadata)", ModelLoadError)
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

    def state_dict(self, dtype: torch.dtype = torch.float32, config: dict | None = None) -> dict[str, torch.Tensor]:
        """All tensors under their HF names, fix-ups applied (they may need `config`, default self.config()), in
        `dtype`. `self.sources` maps each HF name back to its GGUF name (for error messages); `self.blocks` maps the
        HF name of each 2-D tensor no fix-up touched, in a type the VNNI kernels keep as stored, to (type name, raw
        rows uint8 [N, row bytes]) (tandem.kernels.prepare's `native` format)."""
        spec = self.arch()
        config = self.config() if config is None else config
        n_blocks = int(self.meta(f"{self.architecture}.block_count", 0))
        missing = [n for n in spec.expected(n_blocks) if n not in self._tensors]
        if missing:
            raise ModelLoadError(f"{self.path}: missing tensor(s) {missing[:8]}"
                                 f"{' ...' if len(missing) > 8 else ''} for architecture {self.architecture!r}")
        out, unknown = {}, []
        self.sources: dict[str, str] = {}
        self.blocks: dict[str, tuple[str, np.ndarray]] = {}
        for name in self._tensors:
            if name in spec.derived:
                continue
            hf = spec.hf_name(name)
            if hf is None:
                unknown.append(name)
                continue
            w = read = self.read(name)
            try:
                w = spec.fixup(name, w, config)
            except (ValueError, RuntimeError) as e:
                raise ModelLoadError(f"{self.path}: tensor {name!r} of shape {tuple(w.shape)} does not fit the "
                                     f"config ({type(e).__name__}: {e})") from None
            out[hf] = w if w.dtype == dtype or not w.is_floating_point() else w.to(dtype)
            self.sources[hf] = name
            t = self._tensors[name]
            if w is read and w.dim() == 2 and t.tensor_type.name in SUPPORTED_TYPES:
                self.blocks[hf] = (t.tensor_type.name, t.data)
        if unknown:
            raise ModelLoadError(f"{self.path}: tensor(s) with no mapping for architecture {self.architecture!r}: "
                                 f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        return out if spec.regroup is None else spec.regroup(out, config)

    # tokenizer
    def tokenizer_metadata(self) -> dict[str, Any]:
        """Every `tokenizer.*` metadata value (arrays as lists), keyed by its full GGUF key."""
        return {k: self.meta(k) for k in self.fields if k.startswith("tokenizer.")}

    @property
    def chat_template(self) -> str | None:
        return self.meta("tokenizer.chat_template")


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
