"""`tandem serve`: its flags (beside the shared engine flags) and the command, which loads the engine and runs uvicorn."""

from __future__ import annotations

import argparse
import importlib.util

from tandem.errors import ConfigError


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                                                   "(default: $TANDEM_API_KEY, else no key)")
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
    import uvicorn

    from tandem.engine.factory import build_engine
    from tandem.engine.options import EngineOptions
    from tandem.server.app import create_app

    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    eng = build_engine(EngineOptions.from_args(a), n_slots=a.parallel)
    app = create_app(eng, alias=a.alias, api_key=a.api_key or os.environ.get("TANDEM_API_KEY"),
                     max_tokens_limit=a.max_tokens)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0
