"""The demo's synthetic skills and their data, generated deterministically.

Each skill maps a prompt to an answer: addition (``12+7=`` -> ``19``), string reversal
(``abcd>`` -> ``dcba``) and sorting (``dbca:`` -> ``abcd``). Every example also carries three
distractors of the same form (nearby numbers; the answer with two neighbouring letters
swapped), so the lm-eval tasks are 4-way multiple choice: a model that knows the format
but not the skill scores about 0.25.

Each skill has a basic half and a harder half, mixed evenly: addition without and with a
carry, reversal of four-letter and of six-letter words, sorting words of the letters a..h
and words that also use i..l. The base model is taught only the basic halves (it knows
some of every skill); each expert learns its whole skill. The examples are split into
``train`` (the only data any model trains on), ``test`` (what the search optimises) and
``heldout`` (seen by nobody).
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

LETTERS = "abcdefgh"
NEW_LETTERS = "ijkl"  # letters that only the sorting expert learns to place
SKILLS = ("add", "reverse", "sort")
SPLITS = {"test": 150, "heldout": 150}  # examples per split; the rest is train
PER_HALF = 1680  # examples of each half of a reversal or sorting skill: all 4-letter words of a..h


def _add_examples(rng: random.Random) -> list[dict]:
    out = []
    for a, b in itertools.product(range(30), range(30)):
        s = a + b
        wrong = [s + d for d in (1, -1, 10, -10, 2, -2, 11, -11) if s + d >= 0]
        out.append({"context": f"{a}+{b}=", "answer": str(s),
                    "distractors": [str(w) for w in rng.sample(wrong, 3)]})
    return out


def _words(skill: str, rng: random.Random) -> list[str]:
    """Every 4-letter word of a..h (the basic half), then as many harder words: six letters
    for reversal, words that use some of i..l for sorting."""
    basic = ["".join(p) for p in itertools.permutations(LETTERS, 4)]
    if skill == "reverse":
        harder = ["".join(p) for p in itertools.permutations(LETTERS, 6)]
    else:
        harder = ["".join(p) for p in itertools.permutations(LETTERS + NEW_LETTERS, 4)
                  if set(p) & set(NEW_LETTERS)]
    return basic + rng.sample(harder, PER_HALF)


def _perm_examples(rng: random.Random, skill: str) -> list[dict]:
    out = []
    for word in _words(skill, rng):
        answer = word[::-1] if skill == "reverse" else "".join(sorted(word))
        # Near misses: a model must place every letter, not just the first, to tell them apart.
        swaps = [answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:] for i in range(len(answer) - 1)]
        sep = ">" if skill == "reverse" else ":"
        out.append({"context": f"{word}{sep}", "answer": answer, "distractors": rng.sample(swaps, 3)})
    return out


def examples(skill: str) -> dict[str, list[dict]]:
    """The skill's examples by split, each with 'context', 'answer', 'choices' and 'label'."""
    rng = random.Random(f"mergesearch-demo-v2-{skill}")
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


def is_basic(skill: str, context: str) -> bool:
    """Whether the example is of the skill's basic half, the part the base model is taught:
    a sum without a carry, a 4-letter word to reverse, a word of a..h to sort."""
    if skill == "add":
        a, b = context.removesuffix("=").split("+")
        return int(a) % 10 + int(b) % 10 < 10
    word = context[:-1]
    return len(word) == 4 if skill == "reverse" else set(word) <= set(LETTERS)


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
