import json
from pathlib import Path

import pytest

from tandem import sharegpt
from tandem.errors import ConfigError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "eval-exclude" / "sharegpt-first-turn-sha256.txt"


def _write(tmp_path, convs, truncate=0):
    text = json.dumps(convs, indent=2)
    p = tmp_path / sharegpt.JSON_NAME
    p.write_text(text[:len(text) - truncate] if truncate else text)
    return p


def test_reads_truncated_file_and_splits(tmp_path):
    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f" question {i} "},
                                               {"from": "gpt", "value": f"answer {i}"}]} for i in range(5)]
    convs.append({"id": "weird", "conversations": [{"from": "robot", "value": "x"}]})
    convs.append({"id": "empty", "conversations": []})
    p = _write(tmp_path, convs, truncate=40)  # the tail of the last object is cut, as in the real file
    got = list(sharegpt.iter_conversations(tmp_path))
    assert [c.id for c in got] == [f"c{i}" for i in range(5)]
    assert got[0].messages == [{"role": "user", "content": " question 0 "}, {"role": "assistant", "content": "answer 0"}]
    excl = {sharegpt.first_turn_sha256("question 3")}
    train, held = sharegpt.split(p, excl)
    assert [c.id for c in held] == ["c3"] and len(train) == 4


def test_exclude_list_is_the_shared_one():
    ours = sharegpt.load_exclude()
    assert len(ours) > 500
    if SHARED.exists():
        assert ours == sharegpt.load_exclude(SHARED)


def test_bad_exclude_and_missing_file(tmp_path):
    bad = tmp_path / "x.txt"
    bad.write_text("nothex\n")
    with pytest.raises(ConfigError, match="sha256"):
        sharegpt.load_exclude(bad)
    with pytest.raises(ConfigError, match="cannot read ShareGPT"):
        list(sharegpt.iter_conversations(tmp_path / "missing.json"))
