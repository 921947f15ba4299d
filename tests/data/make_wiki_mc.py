"""Build wiki_mc.jsonl: a 4-way multiple-choice task from the offline Wikipedia evaluation text.

Each item gives the first words of a sentence and asks which continuation is the real one; the
three distractors are continuations of other sentences. Deterministic (seed 0).

    .venv/bin/python tests/data/make_wiki_mc.py
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

ITEMS = 40


def main() -> None:
    from llmprune.io.data import load_text

    text = load_text("wikipedia", "evaluation")
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+", text)]
    sentences = [s for s in sentences if 16 <= len(s) <= 40 and all(w.isascii() for w in s)]
    rng = random.Random(0)
    picked = rng.sample(sentences, ITEMS * 4)
    with open(Path(__file__).with_name("wiki_mc.jsonl"), "w") as out:
        for index in range(ITEMS):
            own, others = picked[index * 4], picked[index * 4 + 1 : index * 4 + 4]
            cut = 10
            choices = [" " + " ".join(s[cut : cut + 6]) for s in [own, *others]]
            order = list(range(4))
            rng.shuffle(order)
            item = {"context": " ".join(own[:cut]), "choices": [choices[i] for i in order],
                    "label": order.index(0)}
            out.write(json.dumps(item) + "\n")


if __name__ == "__main__":
    main()
