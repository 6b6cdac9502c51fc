"""Weights in transparent huge pages (Linux): decode streams every weight once per token, and with 4 KiB pages a
1 GB model crosses ~250k pages per token, each a TLB miss; in 2 MiB pages the same decode is ~10 % faster.

`Arena.place` copies a large CPU tensor into an anonymous region advised MADV_HUGEPAGE (2 MiB-aligned, bump
allocated). The region is reserved PROT_NONE and made writable as it fills; tensors are placed as the loader makes
them, so the transient double is one tensor, never the model. `to_huge_pages(module)`
places the packed linears' weights of a module (idempotent; shared tensors stay shared). A no-op off Linux,
off CPU, where THP is 'never', under a data limit (ulimit -d), or with TANDEM_NO_HUGEPAGES=1.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import resource

import torch
import torch.nn as nn

log = logging.getLogger("tandem.kernels")

HUGE = 2 << 20
REGION = 256 << 20  # address space reserved at a time (PROT_NONE: no memory, no data limit)
MIN_BYTES = 64 << 10  # smaller tensors (norms, biases) stay where they are
_PROT_NONE, _PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
_MAP_FLAGS = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
_FAILED = ctypes.c_void_p(-1).value


def _libc():
    name = ctypes.util.find_library("c")
    if name is None or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def thp_available() -> bool:
    """Whether the kernel gives an advised region huge pages (THP 'always' or 'madvise', not 'never')."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def _data_limited() -> bool:
    """A data limit (ulimit -d) is set: a copy of each tensor would briefly count twice against it (the heap keeps the
    freed transients mapped), so weights stay where the loader put them."""
    soft = resource.getrlimit(resource.RLIMIT_DATA)[0]
    return soft != resource.RLIM_INFINITY


class Arena:
    """Bump allocator over 2 MiB-aligned PROT_NONE reservations, committed (read-write, MADV_HUGEPAGE) as it fills.
    Never freed: weights live as long as the process."""

    def __init__(self):
        off = os.environ.get("TANDEM_NO_HUGEPAGES", "") not in ("", "0")
        self.libc = _libc() if thp_available() and not off and not _data_limited() else None
        self.ranges: list[tuple[int, int]] = []  # [start, end) of every reservation
        self.top = self.committed = self.end = 0

    def holds(self, t: torch.Tensor) -> bool:
        p = t.data_ptr()
        return any(a <= p < b for a, b in self.ranges)

    def _reserve(self, nbytes: int) -> None:
        size = max(REGION, -(-nbytes // HUGE) * HUGE)
        addr = self.libc.mmap(None, size + HUGE, _PROT_NONE, _MAP_FLAGS, -1, 0)
        if addr in (None, _FAILED):
            raise MemoryError(f"reserving {size >> 20} MiB of address space for weights: "
                              f"{os.strerror(ctypes.get_errno())}")
        self.top = self.committed = -(-addr // HUGE) * HUGE
        self.end = self.top + size
        self.ranges.append((self.top, self.end))

    def _alloc(self, nbytes: int) -> int:
        if self.top + nbytes > self.end:
            self._reserve(nbytes)
        p, self.top = self.top, -(-(self.top + nbytes) // 64) * 64
        if self.top > self.committed:  # commit whole huge pages as the top passes them
            new = min(self.end, -(-self.top // HUGE) * HUGE)
            if self.libc.mprotect(self.committed, new - self.committed, _PROT_RW) != 0:
                raise MemoryError(f"committing {(new - self.committed) >> 20} MiB for weights: "
                                  f"{os.strerror(ctypes.get_errno())}")
            self.libc.madvise(self.committed, new - self.committed, mmap.MADV_HUGEPAGE)
            self.committed = new
        return p

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """t's values in the arena (a new tensor of t's dtype and shape), or t itself when it is small, not a
        contiguous CPU tensor, already placed, or THP is unavailable; when memory runs out (a data limit) the arena
        stops, with a warning, and every later tensor stays too."""
        n = t.numel() * t.element_size()
        if (self.libc is None or n < MIN_BYTES or t.device.type != "cpu" or not t.is_contiguous()
                or t.requires_grad or self.holds(t)):
            return t
        try:
            addr = self._alloc(n)
        except MemoryError as e:  # a data limit (ulimit -d) or a full machine: the weights stay where they are
            log.warning("weights stay in 4 KiB pages from here on (%s)", e)
            self.libc = None
            return t
        buf = (ctypes.c_char * n).from_address(addr)
        out = torch.frombuffer(buf, dtype=torch.uint8).view(t.dtype).view(t.shape)
        out.copy_(t)
        return out


_ARENA: Arena | None = None


def arena() -> Arena:
    """The process's weight arena (one: reservations are never returned)."""
    global _ARENA
    if _ARENA is None:
        _ARENA = Arena()
    return _ARENA


@torch.no_grad()
def to_huge_pages(module: nn.Module) -> nn.Module:
    """Move the weights of `module`'s packed linears (what decode streams every token; embeddings, read a few rows
    at a time, stay put) into the arena, tensors shared between modules staying shared; returns the module."""
    from tandem.kernels.linear import PackedLinear
    a = arena()
    if a.libc is None:
        return module
    moved: dict[tuple, torch.Tensor] = {}  # by address: a tensor shared by two modules is placed once, and the old
    # one is freed as soon as its last module lets go (no address is reused meanwhile: the arena is not the heap)

    def place(t: torch.Tensor) -> torch.Tensor:
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if key not in moved:
            moved[key] = a.place(t)
        return moved[key]
    for m in module.modules():
        if isinstance(m, PackedLinear):
            m._apply(place)
    return module
