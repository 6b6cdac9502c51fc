"""`tandem serve`: the OpenAI-compatible HTTP server (FastAPI + uvicorn live only in this package).

    add_serve_args(parser)   the serve options (model/spec options shared with `tandem generate`)
    serve(args)              load the engine with --parallel slots and run uvicorn (default 127.0.0.1)
    create_app(engine, ...)  the ASGI app, for tests and embedding
"""

from __future__ import annotations

import argparse


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from tandem.cli import _add_model_args

    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/* "
                                                   "(default: $TANDEM_API_KEY, else no key)")
    p.add_argument("--parallel", "-np", type=int, default=4, help="slots: requests decoded together in one batch")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="most tokens one request may ask for (default: the context size)")
    p.add_argument("--alias", default=None, help="model id to serve as (default: from the model file)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def serve(a) -> int:
    import logging
    import os

    import uvicorn

    from tandem.cli import _engine_from
    from tandem.errors import ConfigError
    from tandem.server.app import create_app

    if a.parallel < 1:
        raise ConfigError(f"--parallel must be >= 1, got {a.parallel}")
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    eng = _engine_from(a, n_slots=a.parallel)
    app = create_app(eng, alias=a.alias, api_key=a.api_key or os.environ.get("TANDEM_API_KEY"),
                     max_tokens_limit=a.max_tokens)
    uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
    return 0


def create_app(*args, **kw):
    from tandem.server.app import create_app as _create

    return _create(*args, **kw)


__all__ = ["add_serve_args", "serve", "create_app"]
