"""Fisher information for a study: calibration examples from the config, one cache file per
model in ``<run_dir>/fisher/``, computed once (by the driver, before the workers start)
and read by every worker and by export.

Calibration texts come from ``fisher.dataset`` when given, else from the objectives' own
data, as each evaluator offers it (`Evaluator.calibration_texts`): lm-eval tasks' training
documents (else validation, else the test documents past the objective's ``limit``, which
it never scores), written as the prompt followed by its correct answer; perplexity
objectives' datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mergesearch.config import Config
from mergesearch.errors import EvaluatorError
from mergesearch.evaluators import build_evaluators
from mergesearch.evaluators.perplexity import load_texts
from mergesearch.merging.engine import default_device
from mergesearch.merging.fisher_info import cached_fisher, load_fisher
from mergesearch.merging.registry import all_methods


def uses_fisher(config: Config) -> bool:
    methods = all_methods()
    return any("fisher" in methods[m].needs for m in config.space.methods)


def calibration_texts(config: Config) -> list[str]:
    spec = config.fisher
    if spec.dataset is not None:
        texts = load_texts(spec.dataset, config.root)
    else:
        streams = [ev.calibration_texts() for ev in build_evaluators(config)]
        texts = [t for group in zip(*streams) for t in group]  # round robin over objectives
        longest = max(streams, key=len, default=[])
        texts += longest[len(texts) // max(len(streams), 1):]
    texts = [t for t in texts if t][: spec.examples]
    if not texts:
        raise EvaluatorError("fisher: no calibration texts; set fisher.dataset")
    return texts


def calibration_examples(config: Config, tokenizer: Any) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=True).input_ids[: config.fisher.seq_len]
            for t in calibration_texts(config)]


def fisher_files(config: Config, models: list[str], device: str | torch.device | None = None) -> dict[str, Path]:
    """Each model's Fisher cache file, computed where missing (one model at a time)."""
    from transformers import AutoTokenizer


    trust = config.models.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(models[0], trust_remote_code=trust)
    examples = calibration_examples(config, tokenizer)
    device = device or default_device()
    return {m: cached_fisher(m, examples, config.run_dir / "fisher", device, trust) for m in models}


def attach_fisher(config: Config, engine: Any) -> None:
    """Load (computing first where needed) every model's Fisher into ``engine``."""
    files = fisher_files(config, engine.models, engine.device)
    engine.attach_fisher({m: load_fisher(f, engine.device) for m, f in files.items()})
