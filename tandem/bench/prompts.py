"""Bench prompts in the nine mtp-bench categories (our own text, written completion-style for base models; on an
instruct model each is sent as one user message through its chat template), and --prompts files."""

import json
from pathlib import Path

from tandem.errors import ConfigError

PROMPTS: dict[str, list[str]] = {
    "code_python": [
        "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number using iteration.\"\"\"\n",
        "# Python: read a CSV file and print the average of the 'price' column\nimport csv\n\n",
        "class Stack:\n    \"\"\"A simple LIFO stack backed by a list.\"\"\"\n\n    def __init__(self):\n",
    ],
    "code_cpp": [
        "// C++: return the index of target in a sorted vector, or -1\n#include <vector>\n\nint binary_search(",
        "#include <iostream>\n#include <string>\n\n// Reverse a string in place\nvoid reverse(std::string& s) {\n",
        "// A minimal RAII wrapper around a FILE*\n#include <cstdio>\n\nclass File {\npublic:\n",
    ],
    "explain_concept": [
        "Photosynthesis is the process by which plants",
        "In computer science, a hash table is a data structure that",
        "The theory of supply and demand explains how prices",
    ],
    "summarize": [
        "Article: The city council met on Tuesday to discuss the new bicycle lanes planned for the downtown area. "
        "Supporters said the lanes would reduce traffic and improve safety, while some shop owners worried about "
        "losing parking spaces. After two hours of debate, the council voted to build a trial lane on Main Street "
        "for six months.\n\nSummary:",
        "Text: Researchers found that people who slept fewer than six hours a night were more likely to catch colds "
        "after being exposed to the virus than those who slept seven hours or more. The study followed 164 adults "
        "for one week.\n\nIn one sentence, the text says that",
        "Meeting notes: The team agreed to move the release to next Friday because two tests still fail on Windows. "
        "Anna will fix the path handling, Ben will update the documentation, and everyone will review the changelog "
        "on Thursday.\n\nShort summary:",
    ],
    "qa_factual": [
        "Question: What is the capital of Japan?\nAnswer:",
        "Question: How many planets are in the Solar System?\nAnswer:",
        "Question: Who wrote the play Romeo and Juliet?\nAnswer:",
    ],
    "translation": [
        "English: Good morning, how are you today?\nFrench:",
        "English: The train leaves at seven o'clock.\nGerman:",
        "English: I would like a cup of coffee, please.\nSpanish:",
    ],
    "creative_short": [
        "Once upon a time, in a small village by the sea, there lived an old fisherman who",
        "The robot opened its eyes for the first time and",
        "Write a short poem about autumn leaves:\n\n",
    ],
    "stepwise_math": [
        "Question: A shop sells pencils at 3 dollars each. How much do 7 pencils cost?\nLet's think step by step.",
        "Question: If a train travels 60 km per hour for 2.5 hours, how far does it go?\nSolution:",
        "Question: What is 15% of 240?\nStep 1:",
    ],
    "long_code_review": [
        "Review the following Python function and list its problems.\n\n"
        "def process(items):\n    result = []\n    for i in range(len(items)):\n        if items[i] != None:\n"
        "            result.append(items[i] * 2)\n    return result\n\ndef load(path):\n    f = open(path)\n"
        "    data = f.read()\n    return data.split(',')\n\nReview:\n1.",
        "Code review of this C function:\n\nint sum(int *a, int n) {\n    int s;\n    for (int i = 0; i <= n; i++)\n"
        "        s += a[i];\n    return s;\n}\n\nProblems found:\n-",
        "Here is a JavaScript snippet:\n\nfunction getUser(id) {\n  var user = users.find(u => u.id == id)\n"
        "  return user.name\n}\n\nA careful reviewer would point out that",
    ],
}

CATEGORIES = list(PROMPTS)


def _messages(it, where: str) -> list[dict] | None:
    """An item's chat messages, None if it has none; ConfigError naming the place when they are malformed."""
    msgs = it.get("messages") if isinstance(it, dict) else None
    if msgs is None:
        return None
    if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                    and isinstance(m.get("content"), str) for m in msgs)):
        raise ConfigError(f"{where}: \"messages\" must be a non-empty list of {{\"role\": str, \"content\": str}}, "
                          f"got {json.dumps(msgs)[:80]}")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def load_prompts(path: str) -> dict[str, list]:
    """A prompt file -> {category: prompts}: a JSON list of strings (one category, the file's stem), or JSONL /
    a JSON list of objects with a "prompt" string or chat "messages" (a list of {"role", "content"}) and an optional
    "category" string."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"--prompts {path}: cannot read it ({e.strerror})") from None
    try:
        items = json.loads(text)
        if isinstance(items, dict):  # JSONL of a single line
            items = [items]
            where = ["line 1"]
        else:
            where = [f"item {i}" for i in range(len(items))] if isinstance(items, list) else []
    except json.JSONDecodeError:
        items, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--prompts {path} line {n}: not JSON ({e.msg}); expected a JSON list of "
                                      f"strings or JSONL with a \"prompt\" or \"messages\" field") from None
                where.append(f"line {n}")
    if not isinstance(items, list) or not items:
        raise ConfigError(f"--prompts {path}: expected a non-empty JSON list of strings or JSONL with a \"prompt\" "
                          f"or \"messages\" field, got {type(items).__name__ if items else 'nothing'}")
    out: dict[str, list] = {}
    for it, w in zip(items, where):
        if isinstance(it, str):
            it = {"prompt": it}
        msgs = _messages(it, f"--prompts {path} {w}")
        if msgs is None and not (isinstance(it, dict) and isinstance(it.get("prompt"), str) and it["prompt"]):
            raise ConfigError(f"--prompts {path} {w}: expected a non-empty string or an object with a \"prompt\" "
                              f"string or \"messages\", got {json.dumps(it)[:80]}")
        out.setdefault(str(it.get("category", p.stem)), []).append(msgs if msgs is not None else it["prompt"])
    return out
