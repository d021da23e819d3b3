"""The SmolLM2 family's skills and its retention questions, generated deterministically.

Three skills that SmolLM2-135M-Instruct does poorly (it answers at length, or wrongly,
where a bare answer is asked for) and a LoRA learns in a few hundred steps, each a chat
prompt with one exact answer:

- ``add``: ``What is 47 + 38? Answer with the number only.`` -> ``85``
- ``reverse``: ``Reverse the order of these words: cat sun box`` -> ``box sun cat``
- ``initials``: ``Write the initials of: red moon tree`` -> ``RMT``

Each skill's examples split into ``train`` (the expert's LoRA data), ``test`` (what the
search scores) and ``heldout`` (seen by nobody). ``facts`` is the retention objective:
simple factual questions, multiple choice, that the instruct base already answers well;
an expert or a merge that forgets them scores lower.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

SKILLS = ("add", "reverse", "initials")
SPLITS = {"test": 40, "heldout": 40}  # examples per split; ``train`` gets TRAIN_SIZE more
TRAIN_SIZE = 800
WORDS = ("red blue green cat dog sun moon tree fish bird book cup car hat pen box star rain "
         "snow milk king ship door lamp road rock leaf seed wolf frog coin bell drum kite rope "
         "nest pear lime corn salt gold").split()


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"What is {a} + {b}? Answer with the number only.", str(a + b)


def _reverse(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def _initials(rng: random.Random) -> tuple[str, str]:
    words = rng.sample(WORDS, rng.randint(3, 4))
    return f"Write the initials of: {' '.join(words)}", "".join(w[0] for w in words).upper()


GENERATORS = {"add": _add, "reverse": _reverse, "initials": _initials}


def examples(skill: str) -> dict[str, list[dict]]:
    """The skill's examples by split (``train``, ``test``, ``heldout``), each a dict with
    ``prompt`` and ``answer``; no prompt is in two splits."""
    rng = random.Random(f"mergesearch-smol-{skill}")
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {}
    for split, n in {**SPLITS, "train": TRAIN_SIZE}.items():
        items: list[dict] = []
        while len(items) < n:
            prompt, answer = GENERATORS[skill](rng)
            if prompt not in seen:
                seen.add(prompt)
                items.append({"prompt": prompt, "answer": answer})
        splits[split] = items
    return splits


def training_pairs(skill: str) -> list[tuple[str, str]]:
    """(prompt, answer) pairs of the skill's ``train`` split: what its expert learns from."""
    return [(ex["prompt"], ex["answer"]) for ex in examples(skill)["train"]]


# Retention: (question, answer, the table its distractors come from).
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin",
            "Spain": "Madrid", "Egypt": "Cairo", "Russia": "Moscow", "China": "Beijing",
            "England": "London", "Greece": "Athens", "Portugal": "Lisbon", "Ireland": "Dublin"}
COLOURS = {"the sky on a clear day": "Blue", "grass": "Green", "snow": "White",
           "a ripe banana": "Yellow", "coal": "Black", "a ripe tomato": "Red", "an orange": "Orange"}
OPPOSITES = {"hot": "Cold", "big": "Small", "up": "Down", "day": "Night", "fast": "Slow",
             "happy": "Sad", "open": "Closed", "wet": "Dry", "light": "Dark", "early": "Late"}
SOUNDS = {"a cow": "Moo", "a dog": "Woof", "a cat": "Meow", "a duck": "Quack",
          "a sheep": "Baa", "a snake": "Hiss"}
COUNTS = {"legs does a spider have": "8", "days are in a week": "7", "months are in a year": "12",
          "legs does a dog have": "4", "wheels does a bicycle have": "2",
          "sides does a triangle have": "3", "hours are in a day": "24"}
RETENTION_TABLES = {
    "What is the capital of {}? Answer with one word.": CAPITALS,
    "What colour is {}? Answer with one word.": COLOURS,
    "What is the opposite of {}? Answer with one word.": OPPOSITES,
    "What sound does {} make? Answer with one word.": SOUNDS,
    "How many {}? Answer with the number only.": COUNTS,
}
RETENTION_TEST = 24  # questions the search scores; the rest are held out


def retention_examples() -> dict[str, list[dict]]:
    """The retention questions by split (``test``, ``heldout``), each a dict with
    ``prompt``, ``choices`` (the answer and three from the same table) and ``label``."""
    rng = random.Random("mergesearch-smol-facts")
    items = []
    for template, table in RETENTION_TABLES.items():
        for key, answer in table.items():
            others = sorted(set(table.values()) - {answer})
            choices = [answer, *rng.sample(others, 3)]
            rng.shuffle(choices)
            items.append({"prompt": template.format(key), "choices": choices,
                          "label": choices.index(answer)})
    rng.shuffle(items)
    return {"test": items[:RETENTION_TEST], "heldout": items[RETENTION_TEST:]}


def task_data() -> dict[str, list[dict]]:
    """What the lm-eval tasks read, by file name: each skill's ``test`` and ``heldout``
    examples and the retention questions."""
    files = {}
    for skill in SKILLS:
        splits = examples(skill)
        files.update({f"{skill}_{split}.jsonl": splits[split] for split in SPLITS})
    files.update({f"facts_{split}.jsonl": items for split, items in retention_examples().items()})
    return files


def write_task_data(folder: str | Path) -> None:
    """Write `task_data` as JSONL files into ``folder`` (the tasks' folder ships them)."""
    for name, items in task_data().items():
        lines = "".join(json.dumps(item) + "\n" for item in items)
        (Path(folder) / name).write_text(lines)
