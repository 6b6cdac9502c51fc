"""`tandem serve`: its flags (beside the shared engine flags) and the command, which loads the engine and runs uvicorn."""

from __future__ import annotations

import argparse
import importlib.util

from tandem.errors import ConfigError

SHUTDOWN_GRACE_S = 2


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                                                   "(default: $TANDEM_API_KEY, else no key)")
    p.add_argument("--allowed-hosts", default=None, metavar="H1,H2",
                   help="answer only requests whose Host header names one of these (DNS-rebinding defence); "
                        "others get 403")
    p.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024, help="largest request body (413 above)")
    p.add_argument("--special-in-content", action="store_true",
                   help="parse special-token strings inside chat message content as control tokens "
                        "(default: they are plain text, so users cannot forge turns)")
    p.add_argument("--parallel", "-np", type=int, default=4, help="slots: requests decoded together in one batch")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens one request may ask for (default: the context size)")
    p.add_argument("--alias", default=None, help="model id to serve as (default: from the model file)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def serve(a: argparse.Namespace) -> int:
    import logging
    import os

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:  # checked here, not at import, so that every other verb works without them
        raise ConfigError(f"tandem serve needs {' and '.join(missing)}: pip install 'fastapi>=0.110' 'uvicorn>=0.29'")
    if a.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {a.parallel}")
    if a.max_body_bytes < 1024:
        raise ConfigError(f"--max-body-bytes must be >= 1024, got {a.max_body_bytes}")
    hosts = [h.strip() for h in a.allowed_hosts.split(",") if h.strip()] if a.allowed_hosts else None
    if a.allowed_hosts is not None and not hosts:
        raise ConfigError(f"--allowed-hosts names no host: {a.allowed_hosts!r}")
    import uvicorn

    from tandem.engine.factory import build_engine
    from tandem.engine.options import EngineOptions
    from tandem.server.app import create_app

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    eng = build_engine(EngineOptions.from_args(a), n_slots=a.parallel)
    exact, why = eng.exact
    logging.getLogger("tandem.serve").info("model %s; drafter: %s; exact: %s (%s)", eng.loaded.path,
                                           eng.describe_drafter(), "yes" if exact else "no, distribution only", why)
    app = create_app(eng, alias=a.alias, api_key=a.api_key or os.environ.get("TANDEM_API_KEY"),
                     max_tokens_limit=a.max_tokens, allowed_hosts=hosts, max_body_bytes=a.max_body_bytes,
                     special_in_content=a.special_in_content)
    # Ctrl-C: requests still running after SHUTDOWN_GRACE_S are cancelled (their slots freed), then we exit
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level, timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    return 0
