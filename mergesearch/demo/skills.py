"""The demo's synthetic skills and their data, generated deterministically.

Each skill maps a prompt to an answer: addition (``12+7=`` -> ``19``), string reversal
(``abcd>`` -> ``dcba``) and sorting (``dbca:`` -> ``abcd``). Every example also carries three
distractors of the same form (nearby numbers; other orderings of the same letters), so the
lm-eval tasks are 4-way multiple choice: a model that knows the format but not the skill
scores about 0.25. Each skill's examples are split into ``train`` (the experts' fine-tuning
data), ``test`` (what the search optimises) and ``heldout`` (seen by nobody).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

LETTERS = "abcdefgh"
SKILLS = ("add", "reverse", "sort")
SPLITS = {"test": 150, "heldout": 150}  # examples per split; the rest is train


def _add_examples(rng: random.Random) -> list[dict]:
    out = []
    for a, b in itertools.product(range(30), range(30)):
        s = a + b
        wrong = [s + d for d in (1, -1, 10, -10, 2, -2, 11, -11) if s + d >= 0]
        out.append({"context": f"{a}+{b}=", "answer": str(s),
                    "distractors": [str(w) for w in rng.sample(wrong, 3)]})
    return out


def _perm_examples(rng: random.Random, skill: str) -> list[dict]:
    out = []
    for letters in itertools.permutations(LETTERS, 4):
        word = "".join(letters)
        answer = word[::-1] if skill == "reverse" else "".join(sorted(word))
        others = sorted({"".join(p) for p in itertools.permutations(word)} - {answer})
        sep = ">" if skill == "reverse" else ":"
        out.append({"context": f"{word}{sep}", "answer": answer, "distractors": rng.sample(others, 3)})
    return out


def examples(skill: str) -> dict[str, list[dict]]:
    """The skill's examples by split, each with 'context', 'choices' and 'label'."""
    rng = random.Random(f"mergesearch-demo-{skill}")
    items = _add_examples(rng) if skill == "add" else _perm_examples(rng, skill)
    rng.shuffle(items)
    splits, start = {}, 0
    for split, n in SPLITS.items():
        splits[split] = items[start:start + n]
        start += n
    splits["train"] = items[start:]
    for split in splits.values():
        for ex in split:
            choices = [ex["answer"], *ex["distractors"]]
            rng.shuffle(choices)
            ex["choices"] = choices
            ex["label"] = choices.index(ex["answer"])
    return splits


def random_answer(skill: str, context: str, rng: random.Random) -> str:
    """An answer of the right form but no skill: what the base model is trained on."""
    if skill == "add":
        return str(rng.randrange(0, 59))
    word = list(context[:-1])
    rng.shuffle(word)
    return "".join(word)


def write_task_data(folder: Path) -> None:
    """Write ``<skill>_<split>.jsonl`` for the lm-eval task YAMLs (test and heldout)."""
    folder.mkdir(parents=True, exist_ok=True)
    for skill in SKILLS:
        for split, rows in examples(skill).items():
            if split == "train":
                continue
            with open(folder / f"{skill}_{split}.jsonl", "w") as f:
                for ex in rows:
                    f.write(json.dumps({"context": ex["context"], "choices": ex["choices"],
                                        "label": ex["label"]}) + "\n")
    with open(folder / "demo_text.jsonl", "w") as f:  # a small corpus for perplexity
        for skill in SKILLS:
            for ex in examples(skill)["heldout"][:60]:
                f.write(json.dumps({"text": ex["context"] + ex["answer"]}) + "\n")
