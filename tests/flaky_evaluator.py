"""User-defined evaluators (loaded by 'module:Class') that fail on purpose, for the
failure-isolation tests. They score a real number read from the live weights."""

from __future__ import annotations

import os
from pathlib import Path

from mergesearch.evaluators.base import Evaluator


class _WeightMean(Evaluator):
    def setup(self, model, tokenizer, engine=None) -> None:
        self.param = next(model.parameters())

    def value(self) -> float:
        return float(self.param.detach().float().mean())


class FlakyEvaluator(_WeightMean):
    """Raises for `ties` candidates, scores NaN for `dare_ties` ones and -inf for
    `della_linear` ones, and runs out of memory for `linear` ones: a real allocation the
    CPU allocator refuses."""

    def measure(self, recipe):
        method = recipe.method if recipe else None
        if method == "ties":
            raise RuntimeError("ties is not allowed here")
        if method == "dare_ties":
            return float("nan"), {}
        if method == "della_linear":
            return float("-inf"), {}
        if method == "linear":
            import torch

            torch.empty(2**60, dtype=torch.uint8)  # an exabyte
        return self.value(), {}


class CrashOnceEvaluator(_WeightMean):
    """Kills its worker process during the first candidate it sees."""

    def measure(self, recipe):
        marker = Path(os.environ["MERGESEARCH_TEST_MARKER"])
        if recipe is not None and recipe.method != "passthrough" and not marker.exists():
            marker.write_text("died")
            os._exit(1)
        return self.value(), {}
