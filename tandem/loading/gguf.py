"""GGUF files: metadata -> HF-style config dict, tensors -> HF-named torch tensors, tokenizer metadata.

Everything architecture-specific is data in `gguf_archs/` (one `GGUFArch` per `general.architecture`): which GGUF
metadata keys become which config.json keys, the config values llama.cpp does not store, the tensor-name keymap
(llama.cpp name pattern -> HF checkpoint name) and the value fix-ups llama.cpp's converter applied (fn(tensor,
config), e.g. Gemma norms stored as `1 + w`, llama's permuted q/k rows).

Tensors are dequantized to fp32 (or `dtype`) with `gguf.quants.dequantize`, which covers every ggml quant type the
installed gguf-py knows; F32/F16/BF16/Q8_0 take a vectorized torch path that gives bit-identical results.
"""

from __future__ import annotations

import mmap
import os
import warnings
from typing import Any

import numpy as np
import torch

from tandem.config import check_model_config
from tandem.errors import ModelLoadError
from tandem.loading.gguf_archs import ARCHS, GGUFArch
from tandem.loading.gguf_reader import _reader

GGUF_MAGIC = b"GGUF"
_TOKENIZER_ARRAYS = (("tokenizer.ggml.tokens", str, "strings"), ("tokenizer.ggml.merges", str, "strings"),
                     ("tokenizer.ggml.scores", (int, float), "numbers"), ("tokenizer.ggml.token_type", int, "integers"))


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
        n_split = self.meta("split.count", 1)
        if isinstance(n_split, int) and n_split > 1:
            raise ModelLoadError(f"{self.path}: shard {self.meta('split.no', 0) + 1} of a GGUF split in {n_split} files "
                                 f"(split.count); merge them first: llama-gguf-split --merge {self.path} OUT.gguf")
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
            if v is not None:  # checked here: finalize computes with these before the whole config is checked
                check_model_config({hk: v}, f"{self.path}: metadata '{a}.{gk}'", ModelLoadError)
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
            if v is not None:  # an integer: check_model_config below says so otherwise
                cfg[hk] = v
        cfg["tie_word_embeddings"] = "output.weight" not in self._tensors
        gguf_key = {h: f"{a}.{g}" for g, h in spec.config_keys.items()}
        missing = [gguf_key.get(k, k) for k in ("num_hidden_layers", "hidden_size") if k not in cfg]
        if missing:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks {missing}")
        if spec.finalize is not None:
            try:
                spec.finalize(cfg, self)
            except KeyError as e:  # a value the family needs and llama.cpp's converter writes
                raise ModelLoadError(f"{self.path}: GGUF metadata lacks {gguf_key.get(e.args[0], e.args[0])!r} "
                                     f"({e.args[0]})") from None
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

    def tensor(self, name: str, config: dict, read: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, dequantized (or `read`, its dequantized values), with the architecture's fix-ups applied."""
        w = self.read(name) if read is None else read
        try:
            return self.arch().fixup(name, w, config)
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{self.path}: tensor {name!r} of shape {tuple(w.shape)} does not fit the "
                                 f"config ({type(e).__name__}: {e})") from None

    def mapped(self) -> dict[str, str]:
        """GGUF name -> HF name of every weight tensor (derived ones skipped); errors on missing or unmapped ones."""
        spec = self.arch()
        n_blocks = self.meta(f"{self.architecture}.block_count", 0)
        if not isinstance(n_blocks, int) or not 0 <= n_blocks <= len(self._tensors):  # config() checked the type
            raise ModelLoadError(f"{self.path}: field '{self.architecture}.block_count' = {n_blocks!r} does not fit "
                                 f"the file's {len(self._tensors)} tensors")
        missing = [n for n in spec.expected(n_blocks) if n not in self._tensors]
        if missing:
            raise ModelLoadError(f"{self.path}: missing tensor(s) {missing[:8]}"
                                 f"{' ...' if len(missing) > 8 else ''} for architecture {self.architecture!r}")
        out = {n: spec.hf_name(n) for n in self._tensors if n not in spec.derived}
        unknown = [n for n, hf in out.items() if hf is None]
        if unknown:
            raise ModelLoadError(f"{self.path}: tensor(s) with no mapping for architecture {self.architecture!r}: "
                                 f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
        return out

    def state_dict(self, dtype: torch.dtype = torch.float32, config: dict | None = None) -> dict[str, torch.Tensor]:
        """All tensors under their HF names, fix-ups applied (they may need `config`, default self.config()), in
        `dtype`, each a full copy (the fp32 reference path; tandem.loading.stream packs without it).
        `self.sources` maps each HF name back to its GGUF name (for error messages); `self.blocks` maps the HF name
        of each 2-D tensor no fix-up touched, in a type the VNNI kernels keep as stored, to (type name, raw rows uint8
        [N, row bytes]) (tandem.kernels.prepare's `native` format)."""
        from tandem.kernels.kquants import GGUF_TYPES
        spec = self.arch()
        config = self.config() if config is None else config
        out = {}
        self.sources: dict[str, str] = {}
        self.blocks: dict[str, tuple[str, np.ndarray]] = {}
        for name, hf in self.mapped().items():
            read = self.read(name)
            w = self.tensor(name, config, read)
            out[hf] = w if w.dtype == dtype or not w.is_floating_point() else w.to(dtype)
            self.sources[hf] = name
            if w is read and w.dim() == 2 and self.qtype(name) in GGUF_TYPES:
                self.blocks[hf] = (self.qtype(name), self.raw(name))
        return out if spec.regroup is None else spec.regroup(out, config)

    def qtype(self, name: str) -> str:
        return self._tensors[name].tensor_type.name

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as uint8 rows [N, row bytes] (a view of the mapped file)."""
        return self._tensors[name].data

    def offset(self, name: str) -> int:
        return int(self._tensors[name].data_offset)

    def release(self, name: str) -> None:
        """Drop the mapped pages of a tensor already copied out, so the file is not held in memory twice."""
        t = self._tensors[name]
        mm = getattr(self.reader.data, "_mmap", None)
        if mm is None:
            return
        start = int(t.data_offset) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(mm), int(t.data_offset) + int(t.n_bytes))
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    # tokenizer
    def tokenizer_metadata(self) -> dict[str, Any]:
        """Every `tokenizer.*` metadata value (arrays as lists), keyed by its full GGUF key, of the types read."""
        out = {k: self.meta(k) for k in self.fields if k.startswith("tokenizer.")}
        for key, kind, what in _TOKENIZER_ARRAYS:
            v = out.get(key)
            if v is None:
                continue
            odd = v if not isinstance(v, list) else next((x for x in v if not isinstance(x, kind)), None)
            if odd is not None:
                got = type(v).__name__ if odd is v else f"a list holding {type(odd).__name__} {odd!r}"
                raise ModelLoadError(f"{self.path}: metadata {key!r} must be a list of {what}, got {got}")
        return out

    @property
    def chat_template(self) -> str | None:
        v = self.meta("tokenizer.chat_template")
        if v is not None and not isinstance(v, str):
            raise ModelLoadError(f"{self.path}: metadata 'tokenizer.chat_template' must be a string, got "
                                 f"{type(v).__name__} {v!r}")
        return v


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    return GGUFFile(path)
