"""GGUF -> a ready model in its kernel formats, one tensor at a time, without an fp32 copy of the model.

The model is built with its parameters on the meta device; each GGUF tensor then goes from the mapped file straight
into its kernel format: a linear's blocks the VNNI kernels hold as stored are packed from the raw bytes (weight
format `native`), any other tensor is dequantized alone and packed (or kept, fp32 / norms / biases) before the next
is read, and the file's pages of a consumed tensor are dropped. Peak memory: the packed model plus one tensor.

Streaming needs the architecture's `regroup` and the model's `sanitize` to only rename, drop or tie tensors; that is
checked by running them on meta tensors. A model whose loading computes new tensors from several (stacked experts,
MLA's kv_b_proj) takes the whole-dict path (GGUFFile.state_dict, then kernels.prepare).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import warnings

import torch
import torch.nn as nn

from tandem.errors import ModelLoadError

FLOAT_TYPES = ("F32", "F16", "BF16")


@contextlib.contextmanager
def meta_params():
    """Build modules with every parameter on the meta device (buffers stay real: RoPE tables, orderings)."""
    reg = nn.Module.register_parameter
    inits = {cls: cls.__init__ for cls in (nn.Linear, nn.Embedding)}

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        reg(self, name, param)

    def meta_init(init):  # allocate nothing for the big ones, not even untouched pages (RLIMIT_AS counts them)
        return lambda self, *a, device=None, **k: init(self, *a, device=device or "meta", **k)

    nn.Module.register_parameter = register
    for cls, init in inits.items():
        cls.__init__ = meta_init(init)
    try:
        yield
    finally:
        nn.Module.register_parameter = reg
        for cls, init in inits.items():
            cls.__init__ = init


def plan(f, config: dict, model: nn.Module) -> dict[str, str] | None:
    """HF name -> GGUF name of every weight the model takes, when regroup and sanitize only rename, drop or tie
    (None: they compute new tensors). Shapes after the fix-ups are checked against the model here, before any read."""
    from tandem.loading import check_weights
    spec = f.arch()
    metas, src, info = {}, {}, f.tensor_info()
    for g, hf in f.mapped().items():
        qtype, shape = info[g]
        t = torch.empty(shape, device="meta", dtype=torch.int64 if qtype.startswith("I") else torch.float32)
        try:
            t = spec.fixup(g, t, config)
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{f.path}: tensor {g!r} of shape {shape} does not fit the config "
                                 f"({type(e).__name__}: {e})") from None
        metas[hf], src[id(t)] = t, g
    try:
        out = spec.regroup(dict(metas), config) if spec.regroup is not None else metas
        out = model.sanitize(out)
    except Exception:  # noqa: BLE001 - a regroup that needs real values: the whole-dict path runs it
        return None
    if not all(id(v) in src for v in out.values()):
        return None
    names = {k: src[id(v)] for k, v in out.items()}
    check_weights(model, out, f.path, names)
    return names


def load_streaming(f, config: dict, model: nn.Module, names: dict[str, str], weight_format: str) -> nn.Module:
    """Fill the meta-parameter `model` from GGUF `f` per `names` (plan()), packing linears into `weight_format`
    as they come; leaves it prepared (kernels.prepare's result, `kernel_format` set)."""
    from tandem import kernels
    groups: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(n)
    tie = {n: g for g in groups.values() for n in g}
    by_file: dict[str, set[str]] = {}
    for hf, g in names.items():
        by_file.setdefault(g, set()).update(tie.get(hf, [hf]))
    for g in sorted(by_file, key=f.offset):  # file order: the mapped pages are read sequentially
        targets = sorted(by_file[g])
        lins = [n for n in targets if n.endswith(".weight") and isinstance(_owner(model, n), nn.Linear)]
        if lins and weight_format != "fp32":
            packed = kernels.to_huge_pages(_packed(f, g, config, _owner(model, lins[0]), weight_format))
            for n in targets:
                mod_name = n.rpartition(".")[0]
                emb = _owner(model, n)
                _set_module(model, mod_name, kernels.PackedEmbedding(packed) if isinstance(emb, nn.Embedding)
                            else packed)
        elif weight_format != "fp32" and _raw_embedding(f, g, model, targets):
            _set_module(model, targets[0].rpartition(".")[0], GGUFEmbedding(f.qtype(g), f.raw(g), f.path))
        else:
            w = f.tensor(g, config)
            p = nn.Parameter(w if not w.is_floating_point() else w.float(), requires_grad=False)
            for n in targets:
                mod_name, _, leaf = n.rpartition(".")
                setattr(model.get_submodule(mod_name) if mod_name else model, leaf, p)
        f.release(g)
        _trim()
    return kernels.prepare(model, weight_format)  # what is left: fp32 linears, MoE experts' pack_weights


def _owner(model: nn.Module, name: str) -> nn.Module:
    mod_name = name.rpartition(".")[0]
    return model.get_submodule(mod_name) if mod_name else model


def _set_module(model: nn.Module, name: str, mod: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, mod)


def _packed(f, g: str, config: dict, lin: nn.Module, fmt: str):
    """The PackedLinear for GGUF tensor `g` feeding nn.Linear `lin` (its bias kept when already loaded)."""
    from tandem.kernels import kquants
    from tandem.kernels._ext import has_vnni
    from tandem.kernels.linear import PackedLinear, base_format
    from gguf import GGMLQuantizationType

    from tandem.loading.gguf import dequantize
    bias = lin.bias if lin.bias is not None and lin.bias.device.type != "meta" else None
    qtype, raw, K = f.qtype(g), f.raw(g), lin.in_features
    if fmt == "native" and has_vnni():
        if qtype in FLOAT_TYPES and not f.arch().has_fixup(g):  # float layouts are not 64-row panels: one piece
            return PackedLinear.from_gguf(qtype, raw, K, bias=bias)
        if qtype in kquants.GGUF_TYPES and not f.arch().has_fixup(g):
            try:
                with warnings.catch_warnings():  # torch views the read-only mapped rows; parsing copies them
                    warnings.simplefilter("ignore", UserWarning)
                    return _chunked(raw.shape[0], lambda n0, n1: PackedLinear.from_gguf(qtype, raw[n0:n1], K), bias)
            except ValueError as e:
                raise ModelLoadError(f"{f.path}: tensor {g!r} ({qtype}): {e}") from None
        if qtype not in kquants.GGUF_TYPES and qtype not in FLOAT_TYPES:
            raise ModelLoadError(f"{f.path}: tensor {g!r} has GGUF type {qtype}, which the native kernels lack "
                                 f"(they hold {', '.join(sorted(kquants.GGUF_TYPES))}); --weight-format q8_0x8 "
                                 f"requantizes it")
    fmt = base_format(fmt)
    if f.arch().has_fixup(g) or raw.ndim != 2:  # a fix-up may mix rows: the whole tensor at once
        return PackedLinear.from_weight(f.tensor(g, config), fmt, bias)
    t = GGMLQuantizationType[qtype]
    return _chunked(raw.shape[0], lambda n0, n1: PackedLinear.from_weight(
        dequantize(raw[n0:n1], t).reshape(n1 - n0, K), fmt), bias)


CHUNK = 16384  # rows packed at a time (a multiple of the kernels' 64-row panels): transients of one chunk only


def _chunked(N: int, make, bias):
    """make(n0, n1) -> PackedLinear of rows n0..n1, assembled panel-wise into one PackedLinear of N rows without a
    second full-size copy (every packed tensor is [panels, ...], each panel 64 rows of its own)."""
    from tandem.kernels.linear import PackedLinear
    first = make(0, min(N, CHUNK))
    if N <= CHUNK:
        out = first
    else:
        panels = -(-N // 64)
        bufs = {k: torch.empty((panels,) + tuple(v.shape[1:]), dtype=v.dtype) for k, v in first.named_buffers()}
        chunk = first
        for n0 in range(0, N, CHUNK):
            chunk = first if n0 == 0 else make(n0, min(N, n0 + CHUNK))
            for k, v in chunk.named_buffers():
                bufs[k][n0 // 64:n0 // 64 + v.shape[0]] = v
        out = PackedLinear(first.in_features, N, first.fmt, bufs)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False)
    return out


def _raw_embedding(f, g: str, model: nn.Module, targets: list[str]) -> bool:
    """Whether GGUF tensor `g` is an untied embedding table kept as its stored blocks (rows dequantized on lookup)."""
    return (len(targets) == 1 and targets[0].endswith(".weight") and isinstance(_owner(model, targets[0]), nn.Embedding)
            and f.qtype(g) != "F32" and not f.arch().has_fixup(g) and f.raw(g).ndim == 2)


_LIBC = ctypes.util.find_library("c")


def _trim() -> None:
    """Hand the freed heap back to the OS: the per-tensor transients would otherwise fragment it (~40 % of RSS)."""
    trim = getattr(ctypes.CDLL(_LIBC), "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)


class GGUFEmbedding(nn.Module):
    """An untied embedding table held as the GGUF's own blocks (uint8 [V, row bytes]); a lookup dequantizes just
    its rows, bitwise as the fp32 reference path (gguf-py's values)."""

    class _WeightInfo:  # what Model.embed reads from `.weight` (dtype and device of the rows it gets back)
        dtype, device = torch.float32, torch.device("cpu")

    def __init__(self, qtype: str, raw, source: str):
        super().__init__()
        import numpy as np
        from gguf import GGMLQuantizationType
        self.qtype, self.source = GGMLQuantizationType[qtype], source
        self.register_buffer("raw", torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True)), persistent=False)
        self.num_embeddings = self.raw.shape[0]
        self.embedding_dim = int(self._rows(torch.zeros(1, dtype=torch.int64)).shape[-1])

    @property
    def weight(self):
        return GGUFEmbedding._WeightInfo()

    def _rows(self, flat: torch.Tensor) -> torch.Tensor:
        from tandem.loading.gguf import dequantize
        return dequantize(self.raw.index_select(0, flat).numpy(), self.qtype)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1).to(torch.int64).cpu()
        if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < self.num_embeddings):
            raise IndexError(f"token ids {flat.min().item()}..{flat.max().item()} outside the embedding table "
                             f"[0, {self.num_embeddings})")
        return self._rows(flat).reshape(*tokens.shape, -1).to(tokens.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype.name} blocks as stored"
