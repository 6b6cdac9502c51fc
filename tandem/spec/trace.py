"""NDJSON trace of speculation: one line per draft and per verification.

Enable with `--trace FILE` (the CLI calls set_tracer(FILE)) or the TANDEM_TRACE=FILE environment variable.
Events:
  {"event": "draft", "req", "slot", "round", "pos", "tokens": [...], "probs": [...], "drafter", "ms", "t"}
      pos: position of the last emitted token the draft continues; probs: the drafter's probability of each token;
      drafter: the kind that drafted (a chain's winner of the round)
  {"event": "verify", "req", "slot", "round", "pos", "n_draft", "accepted", "tokens": [...], "ms", "t"}
      tokens: what the round emitted (accepted drafts, then the recovered/bonus token)
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import IO, Any, Callable


class Tracer:
    """Writes one JSON object per line to a file (or hands dicts to a callable sink). Thread safe."""

    def __init__(self, target: str | IO[str] | Callable[[dict], Any]):
        self._lock = threading.Lock()
        self._own = False
        self._sink: Callable[[dict], Any] | None = None
        self._fh: IO[str] | None = None
        if callable(target) and not hasattr(target, "write"):
            self._sink = target
        elif isinstance(target, (str, os.PathLike)):
            self._fh = open(target, "a", encoding="utf-8")
            self._own = True
        else:
            self._fh = target

    def emit(self, event: str, **fields: Any) -> None:
        rec = {"event": event, **fields, "t": round(time.time(), 6)}
        with self._lock:
            if self._sink is not None:
                self._sink(rec)
            else:
                self._fh.write(json.dumps(rec, separators=(",", ":")) + "\n")
                self._fh.flush()

    def close(self) -> None:
        if self._own and self._fh is not None:
            self._fh.close()
            self._fh = None


_tracer: Tracer | None = None
_explicit = False  # set_tracer() was called: the environment no longer decides
_env_path: str | None = None


def set_tracer(target: str | IO[str] | Callable[[dict], Any] | Tracer | None) -> Tracer | None:
    """Install the process-wide tracer (None turns tracing off and hands control back to TANDEM_TRACE)."""
    global _tracer, _explicit, _env_path
    if _tracer is not None and _tracer is not target:
        _tracer.close()
    _tracer = target if (target is None or isinstance(target, Tracer)) else Tracer(target)
    _explicit = _tracer is not None
    _env_path = None
    return _tracer


def get_tracer() -> Tracer | None:
    """The active tracer: the one set_tracer() installed, else one appending to $TANDEM_TRACE (if set)."""
    global _tracer, _env_path
    if not _explicit:
        path = os.environ.get("TANDEM_TRACE") or None
        if path != _env_path:
            if _tracer is not None:
                _tracer.close()
            _tracer = Tracer(path) if path else None
            _env_path = path
    return _tracer
