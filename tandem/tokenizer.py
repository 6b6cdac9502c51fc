"""Tokenizer on the `tokenizers` library (the only module importing it), from GGUF metadata or a tokenizer.json.

The GGUF path rebuilds the tokenizer the way transformers does for the same file (so ids are identical to
`AutoTokenizer.from_pretrained(dir, gguf_file=...)`): for Gemma's SentencePiece vocabulary that is a byte-fallback
BPE over the file's tokens, with merges derived from the vocabulary (the file lists none) ranked by token order,
spaces normalized to U+2581, control tokens (type 3) matched whole as special tokens and user-defined ones
(type 4) as plain added tokens, and BOS prepended when `tokenizer.ggml.add_bos_token` says so. For `gpt2`
(byte-level BPE: Llama 3, Qwen, SmolLM2) it is the file's merges with the split regex `tokenizer.ggml.pre` names.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers.models import BPE, Unigram

from tandem.errors import ModelLoadError

# llama.cpp token types
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BYTE_PIECE = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")
_SP = "\u2581"

# Stop tokens beyond the file's eos (only added when the vocabulary has them): end-of-turn markers, as llama.cpp's
# end-of-generation set holds them (llama-vocab.cpp).
_EXTRA_EOS = ("<end_of_turn>", "<turn|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>")

# Byte-level split regexes by `tokenizer.ggml.pre`, as llama.cpp (llama-vocab.cpp) and transformers
# (integrations/gguf/gguf_tokenizer_mapping.py) choose them; None = GPT-2's own (ByteLevel's built-in regex).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_BPE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe"), _LLAMA3),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2),
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O),
    **dict.fromkeys(("gpt2", "default", "smollm"), None),
}
# SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-type) isolate every digit before GPT-2's regex.
_DIGITS_FIRST = {"smollm"}


def _derive_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary with no merge list: every split of a token into two vocabulary tokens,
    ranked by the merged token's position in the file (earlier = higher priority), ties broken by shorter left
    then shorter right piece; within one token the splits are ordered by the ids of their halves.

    This is the ranking transformers uses for Gemma GGUF files (Gemma's scores do not follow merge order)."""
    vocab = {t: i for i, t in enumerate(tokens)}  # later duplicates win, as in a dict built the same way
    rank = {t: -i for i, t in enumerate(tokens)}
    merges = []
    for tok, score in rank.items():
        local = []
        for k in range(1, len(tok)):
            left, right = tok[:k], tok[k:]
            li, ri = vocab.get(left), vocab.get(right)
            if li is not None and ri is not None:
                local.append((li, ri, left, right, score))
        local.sort(key=lambda x: (x[0], x[1]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[4], len(m[2]), len(m[3])), reverse=True)
    return [(m[2], m[3]) for m in merges]


def _byte_level_spelling(tokens: list[str]) -> list[str]:
    """Tokens as the byte-level alphabet spells them: llama.cpp writes a few added tokens (e.g. with a real space)
    in plain text; transformers re-spells those byte by byte, so ids stay where the file puts them."""
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    spell = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    return [t if set(t) <= alphabet else "".join(p for p, _ in spell.pre_tokenize_str(t)) for t in tokens]


def _byte_level_bpe(tokens: list[str], merges: list[str] | None, pre: str | None, source: str) -> _HFTokenizer:
    if not merges:
        raise ModelLoadError(f"{source}: byte-level BPE GGUF without tokenizer.ggml.merges")
    if pre not in _BPE_SPLITS:
        raise ModelLoadError(f"{source}: unsupported tokenizer.ggml.pre {pre!r} for a byte-level BPE vocabulary; "
                             f"supported: {sorted(_BPE_SPLITS)}")
    backend = _HFTokenizer(BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in merges], dropout=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    split = _BPE_SPLITS[pre]
    if split is None:
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                                 if pre in _DIGITS_FIRST else byte_level)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend


def _bos_processor(bos: str | None, bos_id: int | None, add_bos: bool, eos: str | None, eos_id: int | None,
                   add_eos: bool):
    """TemplateProcessing adding BOS in front (and/or EOS at the end) of every sequence."""
    pre = [f"{bos}:0"] if add_bos and bos is not None else []
    post = [f"{eos}:0"] if add_eos and eos is not None else []
    pre1 = [p.replace(":0", ":1") for p in pre]
    post1 = [p.replace(":0", ":1") for p in post]
    special = ([(bos, bos_id)] if pre else []) + ([(eos, eos_id)] if post and eos != bos else [])
    return processors.TemplateProcessing(single=pre + ["$A:0"] + post,
                                         pair=pre + ["$A:0"] + post + pre1 + ["$B:1"] + post1,
                                         special_tokens=special)


class Tokenizer:
    """encode/decode plus the ids the engine needs (bos, the stop set, pad)."""

    def __init__(self, backend: _HFTokenizer, bos_id: int | None, eos_ids: list[int], pad_id: int | None = None,
                 unk_id: int | None = None, add_bos: bool = True):
        self.backend = backend
        self.bos_id = bos_id
        self.eos_ids = list(dict.fromkeys(eos_ids))
        self.pad_id = pad_id
        self.unk_id = unk_id
        self.add_bos = add_bos
        self._byte_fallback = isinstance(backend.model, BPE) and bool(getattr(backend.model, "byte_fallback", False))

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any], architecture: str = "", source: str = "<gguf>") -> "Tokenizer":
        """From a GGUF's `tokenizer.*` metadata (full keys, arrays as lists)."""
        model = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise ModelLoadError(f"{source}: GGUF has no tokenizer.ggml.tokens")
        types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)

        def tok_id(key):
            v = meta.get(f"tokenizer.ggml.{key}")
            return int(v) if v is not None else None

        bos_id, eos_id = tok_id("bos_token_id"), tok_id("eos_token_id")
        pad_id, unk_id = tok_id("padding_token_id"), tok_id("unknown_token_id")
        if model == "llama":  # SentencePiece BPE with byte fallback (Gemma, Llama 2, Mistral, ...)
            if architecture.startswith("gemma") or str(meta.get("tokenizer.ggml.pre", "")).startswith("gemma"):
                # Gemma files store tokens made of 2+ spaces with real spaces; the vocabulary spells them with
                # U+2581 like every other piece (the normalizer turns spaces into U+2581 before lookup).
                tokens = [_SP * len(t) if " " in t and not t.strip() else t for t in tokens]
            merges = meta.get("tokenizer.ggml.merges")
            merges = ([tuple(m.split(" ", 1)) for m in merges] if merges else _derive_merges(tokens))
            vocab = {t: i for i, t in enumerate(tokens)}
            unk = tokens[unk_id] if unk_id is not None else "<unk>"
            backend = _HFTokenizer(BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True,
                                       dropout=None))
            backend.normalizer = normalizers.Replace(" ", _SP)
            backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
            backend.decoder = decoders.Sequence([decoders.Replace(_SP, " "), decoders.ByteFallback(),
                                                 decoders.Fuse()])
            if meta.get("tokenizer.ggml.add_space_prefix") and not architecture.startswith("gemma"):
                backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SP),
                                                           normalizers.Replace(" ", _SP)])
        elif model == "gpt2":
            tokens = _byte_level_spelling(tokens)
            backend = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges"), meta.get("tokenizer.ggml.pre"),
                                      source)
        elif model == "t5":
            scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
            backend = _HFTokenizer(Unigram([(t, float(s)) for t, s in zip(tokens, scores)], unk_id=unk_id or 0,
                                           byte_fallback=False))
            backend.pre_tokenizer = pre_tokenizers.Metaspace()
            backend.decoder = decoders.Metaspace()
        else:
            raise ModelLoadError(f"{source}: unsupported GGUF tokenizer model {model!r}; "
                                 f"supported: ['gpt2', 'llama', 't5']")

        vocab = backend.get_vocab(with_added_tokens=True)
        orig = meta.get("tokenizer.ggml.tokens")
        # a byte-level control token spelled outside the byte alphabet is a llama.cpp mislabel (transformers skips it)
        control = [AddedToken(t, normalized=False, special=True) for t, o, ty in zip(tokens, orig, types)
                   if ty == _CONTROL and (model != "gpt2" or t == o)]
        if control:
            backend.add_special_tokens(control)
        user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(orig, types)
                if ty == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens(user)

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        add_bos = True if add_bos is None and model == "llama" else bool(add_bos)
        add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
        if (add_bos and bos_id is not None) or (add_eos and eos_id is not None):
            backend.post_processor = _bos_processor(tokens[bos_id] if bos_id is not None else None, bos_id, add_bos,
                                                    tokens[eos_id] if eos_id is not None else None, eos_id, add_eos)
        eos_ids = [i for i in (eos_id, tok_id("eot_token_id"), tok_id("eom_token_id")) if i is not None]
        eos_ids += [vocab[t] for t in _EXTRA_EOS if t in vocab and types[vocab[t]] == _CONTROL]
        return cls(backend, bos_id, eos_ids, pad_id, unk_id, add_bos)

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike, config: dict | None = None,
                  tokenizer_config: dict | None = None) -> "Tokenizer":
        """From an HF `tokenizer.json`; special ids from config.json / tokenizer_config.json when given."""
        path = str(tokenizer_json)
        try:
            backend = _HFTokenizer.from_file(path)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read tokenizer ({type(e).__name__}: {e})") from None
        config = config or {}
        tc = tokenizer_config or {}
        vocab = backend.get_vocab(with_added_tokens=True)

        def special(name: str, cfg_key: str):
            v = tc.get(name)
            if isinstance(v, dict):
                v = v.get("content")
            if isinstance(v, str) and v in vocab:
                return vocab[v]
            c = config.get(cfg_key, (config.get("text_config") or {}).get(cfg_key))
            return c

        bos_id = special("bos_token", "bos_token_id")
        eos = special("eos_token", "eos_token_id")
        eos_ids = list(eos) if isinstance(eos, list) else ([eos] if eos is not None else [])
        cfg_eos = config.get("eos_token_id")
        if isinstance(cfg_eos, list):
            eos_ids += cfg_eos
        elif cfg_eos is not None:
            eos_ids.append(cfg_eos)
        eos_ids += [vocab[t] for t in _EXTRA_EOS if t in vocab]
        add_bos = bool(tc.get("add_bos_token", True))
        return cls(backend, bos_id, [int(e) for e in eos_ids], special("pad_token", "pad_token_id"),
                   special("unk_token", "unk_token_id"), add_bos)

    # -- use -----------------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, i: int) -> str | None:
        return self.backend.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int | None:
        return self.backend.token_to_id(piece)

    def is_byte_piece(self, i: int) -> bool:
        p = self.backend.id_to_token(int(i))
        return self._byte_fallback and p is not None and bool(_BYTE_PIECE.match(p))

    def stream(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)

    def save(self, path: str | os.PathLike) -> None:
        """The backend as a tokenizer.json, plus our extras in `<path>.tandem.json`."""
        self.backend.save(str(path))
        with open(str(path) + ".tandem.json", "w") as fh:
            json.dump({"bos_id": self.bos_id, "eos_ids": self.eos_ids, "pad_id": self.pad_id, "unk_id": self.unk_id,
                       "add_bos": self.add_bos}, fh)

    @classmethod
    def load_saved(cls, path: str | os.PathLike) -> "Tokenizer":
        backend = _HFTokenizer.from_file(str(path))
        with open(str(path) + ".tandem.json") as fh:
            extra = json.load(fh)
        return cls(backend, extra["bos_id"], extra["eos_ids"], extra["pad_id"], extra["unk_id"], extra["add_bos"])


class StreamDecoder:
    """Incremental detokenization: `put(ids) -> new text`, `flush() -> rest`.

    The concatenation of everything returned equals `tokenizer.decode(all ids)` and no chunk ends inside a
    character:
    - a run of byte-fallback tokens (`<0xNN>`) is held until a non-byte token (or flush) closes it, because the
      decoder turns a whole run into text at once (and into one U+FFFD per byte when the run is not valid UTF-8);
    - text ending in U+FFFD (an incomplete byte-level character) is held until more tokens arrive;
    - new text is the decode of [last emitted chunk + pending] minus the decode of the last emitted chunk, so
      decoders that treat the first token specially (leading-space stripping) and the U+2581 -> space rule behave
      as in one `decode` call.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the context chunk (already emitted)
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def put(self, ids: int | Iterable[int]) -> str:
        if isinstance(ids, int):
            ids = [ids]
        self.ids.extend(int(i) for i in ids)
        if self._read == len(self.ids) or self.tok.is_byte_piece(self.ids[-1]):
            return ""
        return self._emit(final=False)

    def _emit(self, final: bool) -> str:
        prev = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        if not final and full.endswith("\ufffd"):
            return ""
        if full.startswith(prev):
            new = full[len(prev):]
        else:  # a decoder that rewrote the context: emit what differs after the common prefix
            n = len(os.path.commonprefix([prev, full]))
            new = full[n:]
        self._prefix, self._read = self._read, len(self.ids)
        return new

    def flush(self) -> str:
        if self._read == len(self.ids):
            return ""
        return self._emit(final=True)

    def reset(self) -> None:
        self.ids.clear()
        self._prefix = self._read = 0
