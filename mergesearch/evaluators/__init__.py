"""Evaluators: each scores one objective on the live model (see `base.Evaluator`).

Built-in: ``lm_eval``, ``perplexity``, ``cost``. A config can name any other subclass as
``evaluator: package.module:Class``; `register_evaluator` adds a short name.
"""

from __future__ import annotations

import importlib

from mergesearch.config import Config, Objective
from mergesearch.errors import EvaluatorError
from mergesearch.evaluators.base import Evaluator, Score

EVALUATORS: dict[str, str | type[Evaluator]] = {
    "lm_eval": "mergesearch.evaluators.lm_eval:LmEvalEvaluator",
    "perplexity": "mergesearch.evaluators.perplexity:PerplexityEvaluator",
    "cost": "mergesearch.evaluators.cost:CostEvaluator",
}


def register_evaluator(name: str, cls: type[Evaluator]) -> None:
    EVALUATORS[name] = cls


def evaluator_class(name: str) -> type[Evaluator]:
    target = EVALUATORS.get(name, name)
    if isinstance(target, type):
        return target
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise EvaluatorError(f"evaluator: cannot import {target!r} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
        raise EvaluatorError(f"evaluator: {target!r} is not an Evaluator subclass")
    return cls


def build_evaluators(config: Config, objectives: list[Objective] | None = None) -> list[Evaluator]:
    objectives = config.objectives if objectives is None else objectives
    return [evaluator_class(o.evaluator)(o, config) for o in objectives]


def score_all(evaluators: list[Evaluator], recipe=None) -> list[Score]:
    return [ev.score(recipe) for ev in evaluators]


__all__ = ["EVALUATORS", "Evaluator", "Score", "build_evaluators", "evaluator_class",
           "register_evaluator", "score_all"]
