"""Loads the demo tasks' data from the JSONL files beside this file, whatever the working
directory (lm-eval's `dataset_kwargs.data_files` would resolve against the working directory)."""

from pathlib import Path

import datasets


def load(file: str, **_) -> datasets.DatasetDict:
    path = Path(__file__).resolve().parent / file
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})
