"""Perplexity of the live model over a `datasets` dataset, within a token budget.

The text is tokenised once at set-up into windows of `seq_len` tokens (at most
`max_tokens` in all); each call is a no-grad pass over those windows: exp(mean NLL).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field, model_validator

from mergesearch.config import DatasetSpec
from mergesearch.errors import EvaluatorError
from mergesearch.evaluators.base import Evaluator, EvaluatorOptions


def load_texts(spec: Any, root) -> list[str]:
    import datasets

    files = spec.data_files
    if isinstance(files, str):
        files = str(root / files) if not files.startswith("/") else files
    elif isinstance(files, list):
        files = [str(root / f) if not f.startswith("/") else f for f in files]
    try:
        data = datasets.load_dataset(spec.path, spec.name, data_files=files, split=spec.split)
    except Exception as e:  # noqa: BLE001 - missing file, unknown dataset, offline hub
        raise EvaluatorError(f"dataset: cannot load {spec.path!r} ({e.__class__.__name__}: {e})") from None
    if spec.text_field not in data.column_names:
        raise EvaluatorError(f"dataset.text_field: no column {spec.text_field!r}; columns: "
                             + ", ".join(data.column_names))
    return [t for t in data[spec.text_field] if t]


class PerplexityOptions(EvaluatorOptions):
    """A perplexity objective: the texts, and how many of their tokens are scored."""

    dataset: DatasetSpec | None = Field(None, description="The texts: a `datasets` dataset")
    max_tokens: int = Field(16384, ge=1, description="Token budget for perplexity")
    seq_len: int = Field(256, ge=2, description="Tokens per window")
    batch_size: int = Field(16, ge=1, description="Windows per forward pass")

    @model_validator(mode="after")
    def _has_data(self) -> PerplexityOptions:
        # Checked here rather than as a required field, for a message that says what to give.
        if self.dataset is None:
            raise ValueError("dataset: a perplexity objective needs a dataset")
        return self


class PerplexityEvaluator(Evaluator):
    partial = True  # the first windows
    direction = "minimize"
    Options = PerplexityOptions
    options: PerplexityOptions

    def setup(self, model: Any, tokenizer: Any, engine: Any = None) -> None:
        obj, opts = self.objective, self.options
        ids: list[int] = []
        for text in load_texts(opts.dataset, self.config.root):
            ids.extend(tokenizer(text, add_special_tokens=False).input_ids)
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
            if len(ids) >= opts.max_tokens:
                break
        ids = ids[: opts.max_tokens]
        n = len(ids) // opts.seq_len
        if n == 0:
            raise EvaluatorError(f"objectives.{obj.name}.dataset: fewer than seq_len={opts.seq_len} tokens")
        device = next(model.parameters()).device
        self.windows = torch.tensor(ids[: n * opts.seq_len], device=device).view(n, opts.seq_len)
        self.model = model

    def calibration_texts(self) -> list[str]:
        return load_texts(self.options.dataset, self.config.root)

    @torch.no_grad()
    def measure(self, recipe: Any, fraction: float = 1.0) -> tuple[float, dict[str, float]]:
        windows = self.windows[: max(1, math.ceil(len(self.windows) * fraction))]
        per_window = []  # mean NLL of each window (all windows have seq_len tokens)
        for batch in windows.split(self.options.batch_size):
            logits = self.model(input_ids=batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), batch[:, 1:], reduction="none")
            per_window.append(nll.mean(1).double())
        nlls = torch.cat(per_window)
        mean = nlls.mean().item()
        ppl = math.exp(mean)
        metrics = {"nll": mean, "tokens": float(windows[:, 1:].numel()), "examples": float(len(windows))}
        if len(nlls) > 1:  # the delta method: se(exp(m)) = exp(m) se(m)
            metrics["stderr"] = ppl * nlls.std().item() / math.sqrt(len(nlls))
        return ppl, metrics
