"""What every route needs: the engine, its scheduler, the served model's names and limits, the metrics.

create_app puts one ServerState on app.state; routes receive it through FastAPI's dependency `state_of`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from tandem.chat import ChatEncoder, ChatTemplate
from tandem.config import SpecConfig
from tandem.engine.batch import BatchScheduler
from tandem.server.metrics import Metrics

FINGERPRINT = "tandem-0.1.0"


@dataclass
class ServerState:
    engine: Any
    scheduler: BatchScheduler
    model_id: str
    names: set[str]
    template: ChatTemplate
    metrics: Metrics
    api_key: str | None
    max_tokens_limit: int
    spec_default: SpecConfig
    vocab_size: int | None
    special_in_content: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    chat: ChatEncoder = field(init=False)

    def __post_init__(self):
        self.chat = ChatEncoder(self.template, self.engine.tokenizer, self.special_in_content)

    @property
    def n_ctx(self) -> int:
        return self.engine.max_len

    @property
    def spec_available(self) -> bool:
        return self.engine.drafter is not None


def state_of(request: Request) -> ServerState:
    """FastAPI dependency: the app's ServerState."""
    return request.app.state.tandem


def model_names(loaded: Any, alias: str | None) -> tuple[str, set[str]]:
    """The served model id and every name a request may use for it."""
    path = getattr(loaded, "path", None)
    names: set[str] = set()
    if path:
        p = Path(path)
        names |= {str(path), p.name, p.stem}
    model_id = getattr(loaded, "name", None) or (Path(path).stem if path else "model")  # embedded: its name
    names.add(model_id)
    if alias:
        model_id = alias
    names.add(model_id)
    return model_id, names


def vocab_size(engine) -> int | None:
    args = getattr(engine.model, "args", None)
    v = getattr(args, "vocab_size", None)
    return int(v) if v else None
