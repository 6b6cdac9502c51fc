"""JIT build of the C++ kernels (AVX-512) with a one-time logged fallback when the compiler or CPU lacks support.

The extension is built once per source/CPU-flags combination and cached in the torch extensions directory
(TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions). Set TANDEM_NO_EXT=1 to force the reference paths.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("tandem.kernels")

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = ["small_gemm.cpp", "vnni_gemm.cpp", "attention.cpp", "quant_attention.cpp", "kv_quantize.cpp", "glue.cpp",
            "bindings.cpp"]
_REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "f16c", "fma")

_lock = threading.Lock()
_state: dict = {"tried": False, "mod": None, "why": None}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _build():
    if os.environ.get("TANDEM_NO_EXT"):
        raise RuntimeError("disabled by TANDEM_NO_EXT")
    flags = _cpu_flags()
    missing = [f for f in _REQUIRED_FLAGS if f not in flags]
    if missing:
        raise RuntimeError(f"CPU lacks {', '.join(missing)}")
    from torch.utils import cpp_extension
    h = hashlib.sha1()
    for p in [_CSRC / s for s in _SOURCES] + sorted(_CSRC.glob("*.h")):  # headers too: they change the build
        h.update(p.read_bytes())
    h.update(" ".join(sorted(flags)).encode())  # -march=native: a cached build is only valid on the same CPU kind
    h.update(sys.prefix.encode())  # one build per environment: torch rebuilds a name whose include paths changed
    name = f"tandem_kernels_{h.hexdigest()[:12]}"
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.tandem-build", "w") as guard:
        _exclusive(guard)  # the OS drops it if its holder dies: a lock file left then is stale, not a live build
        for stale in [root / name / "lock", *root.glob(f"*/{name}/lock")]:
            if stale.exists():
                log.warning("tandem.kernels: removing %s left by a killed build (it would block forever)", stale)
                stale.unlink(missing_ok=True)
        return cpp_extension.load(
            name=name, sources=[str(_CSRC / s) for s in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-DNDEBUG"], extra_ldflags=["-fopenmp"],
            verbose=False)


def _exclusive(f) -> None:
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file is all there is
        return
    fcntl.flock(f, fcntl.LOCK_EX)


def ext():
    """The compiled module, or None (after one logged warning) when it cannot be built or used here."""
    if _state["tried"]:
        return _state["mod"]
    with _lock:
        if not _state["tried"]:
            try:
                _state["mod"] = _build()
            except Exception as e:  # compiler missing, CPU without AVX-512, build error: fall back, never crash
                _state["why"] = f"{type(e).__name__}: {e}"
                log.warning("tandem.kernels: fast CPU kernels unavailable (%s); using reference paths "
                            "(slower, and batch invariance of linears then comes from row-by-row calls)",
                            str(e).splitlines()[0] if str(e) else type(e).__name__)
            _state["tried"] = True
    return _state["mod"]


@functools.lru_cache(maxsize=None)
def has_vnni() -> bool:
    """Whether this CPU runs the q8_0x8 int8 dot-product GEMMs (AVX-512 VNNI); else q8_0x8 takes the torch path."""
    return "avx512_vnni" in _cpu_flags()


def unavailable_reason() -> str | None:
    ext()
    return _state["why"]
