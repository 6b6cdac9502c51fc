"""The OpenAI-compatible HTTP server (FastAPI + uvicorn live only in this package).

    serve.py      `tandem serve`: add_serve_args(parser), serve(args)
    app.py        create_app(engine, ...) -> FastAPI: error handlers, lifespan
    guard.py      pure-ASGI guard: API key (all but /health), --allowed-hosts, body-size limit
    state.py      ServerState (engine, scheduler, limits, metrics), handed to routes as a FastAPI dependency
    routes.py     /health, /v1/models, /metrics, /v1/completions, /v1/chat/completions
    generation.py validate -> submit -> collect (JSON) or relay (streaming.py: SSE)
    protocol.py   OpenAI request bodies and response pieces; metrics.py  Prometheus counters
"""
