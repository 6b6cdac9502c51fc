"""Build an evaluation prompt set no Tandem drafter was trained on: the first chain-of-thought question of each
MMLU subject in lm-eval's flan_cot_fewshot prompts (public, on PyPI), as JSONL for `tandem bench --prompts`.

    pip download --no-deps lm-eval==0.4.13 -d /tmp/lm   # the wheel carries the prompts
    python scripts/make_eval_prompts.py /tmp/lm/lm_eval-0.4.13-py3-none-any.whl mmlu_cot36.jsonl 36
"""

import json
import sys
import zipfile

MEMBER = "lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json"


def main(wheel: str, out: str, n: int) -> None:
    with zipfile.ZipFile(wheel) as z:
        subjects = json.loads(z.read(MEMBER))
    rows = []
    for subject in sorted(subjects):
        if subject == "abstract_algebra":  # its first example is garbled in the source (LaTeX escapes)
            continue
        parts = subjects[subject].split("\n\nQ: ")
        if len(parts) < 2:
            continue
        question = parts[1].split("\nA: ")[0]
        rows.append({"prompt": f"Q: {question}\nA: Let's think step by step.", "category": subject})
    with open(out, "w") as f:
        for r in rows[:n]:
            f.write(json.dumps(r) + "\n")
    print(f"{min(n, len(rows))} prompts -> {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 36)
