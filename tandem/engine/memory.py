"""Memory: the process's RSS (now, peak), the bytes the KV and drafter caches hold, and --fit's choice of context
length and slots from the memory still free once the weights are loaded (Linux /proc and cgroup files)."""

from __future__ import annotations

import logging
import os
import resource
from dataclasses import dataclass
from typing import Any

from tandem.errors import ConfigError

log = logging.getLogger("tandem.engine")

MIN_FIT_CTX = 256  # shortest context --fit offers; less and it says the machine is too small
FIT_RESERVE = 0.15  # of the free memory, left for activations, logits, the allocator and the OS


def rss_bytes() -> int | None:
    """This process's resident set size now."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """The largest resident set size this process has had (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            v = f.read().strip()
        return None if v == "max" else int(v)
    except (OSError, ValueError):
        return None


def available_bytes() -> int | None:
    """Memory this process can still take: the kernel's MemAvailable, bounded by a cgroup limit and RLIMIT_AS."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(ln.split()[1]) * 1024 for ln in f if ln.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 1 << 60:
            avail = lim - use if avail is None else min(avail, lim - use)
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        try:
            with open("/proc/self/statm") as f:
                vsz = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            avail = soft - vsz if avail is None else min(avail, soft - vsz)
        except (OSError, ValueError, IndexError):
            pass
    return avail


def drafter_cache_bytes(drafter: Any) -> int:
    """Bytes of the caches a drafter (or a chain's members) holds; 0 for drafters reading the target's."""
    if drafter is None:
        return 0
    members = getattr(drafter, "members", None)
    if isinstance(members, dict):
        return sum(drafter_cache_bytes(d) for d in members.values())
    return int(getattr(getattr(drafter, "cache", None), "total_bytes", 0) or 0)


def report(eng) -> dict[str, int | None]:
    """What the bench and /metrics show: RSS once loaded, the peak so far, now, and the caches' bytes."""
    return {"rss_after_load_bytes": getattr(eng, "rss_after_load", None), "peak_rss_bytes": peak_rss_bytes(),
            "rss_bytes": rss_bytes(), "kv_cache_bytes": int(eng.cache.total_bytes),
            "drafter_cache_bytes": drafter_cache_bytes(eng.drafter)}


@dataclass(frozen=True)
class Fit:
    max_len: int
    n_slots: int
    free_bytes: int
    cache_bytes: int

    def describe(self) -> str:
        return (f"--fit: {self.free_bytes / 2**30:.1f} GiB free after loading the weights -> context {self.max_len} "
                f"tokens x {self.n_slots} slot{'s' if self.n_slots > 1 else ''} "
                f"({self.cache_bytes / 2**20:.0f} MiB of caches)")


def fit(cache_bytes, max_len: int, n_slots: int, free: int | None = None) -> Fit:
    """The longest context (<= max_len) and then the most slots (<= n_slots) whose caches fit the free memory
    (less FIT_RESERVE). cache_bytes(slots, ctx) -> bytes: what the caches of that shape would hold."""
    free = available_bytes() if free is None else free
    if free is None:
        raise ConfigError("--fit: cannot read this machine's free memory (/proc/meminfo); give --ctx-size instead")
    budget = int(free * (1 - FIT_RESERVE))
    per_tok = max(1, (cache_bytes(1, 2 * MIN_FIT_CTX) - cache_bytes(1, MIN_FIT_CTX)) // MIN_FIT_CTX)
    fixed = max(0, cache_bytes(1, MIN_FIT_CTX) - per_tok * MIN_FIT_CTX)  # per slot: recurrent state, padding
    ctx = min(max_len, (budget - fixed) // per_tok // MIN_FIT_CTX * MIN_FIT_CTX) if budget > fixed else 0
    if ctx < min(max_len, MIN_FIT_CTX):
        raise ConfigError(f"--fit: {free / 2**20:.0f} MiB free after loading the weights, but a {MIN_FIT_CTX}-token "
                          f"context needs {(fixed + per_tok * MIN_FIT_CTX) / 2**20 / (1 - FIT_RESERVE):.0f} MiB")
    slots = max(1, min(n_slots, budget // (fixed + per_tok * ctx)))
    return Fit(ctx, slots, free, slots * (fixed + per_tok * ctx))
