"""Evaluators: each scores one objective on the live model (see `base.Evaluator`).

Built-in: ``lm_eval``, ``perplexity``, ``cost``, registered lazily in `EVALUATORS` (a module
loads when a config names it). `register_evaluator` adds one under a short name; a config
can also name any subclass as ``evaluator: package.module:Class``. Each evaluator declares
its ``Options`` (the objective's other keys) and its ``direction``; `check_objectives`
checks a config's objectives against them before any work starts.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from mergesearch.config import Config, Objective, format_validation_error
from mergesearch.errors import ConfigError, EvaluatorError
from mergesearch.evaluators.base import Evaluator, EvaluatorOptions, Score
from mergesearch.registry import Registry

EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator")
EVALUATORS.register("lm_eval", "mergesearch.evaluators.lm_eval:LmEvalEvaluator")
EVALUATORS.register("perplexity", "mergesearch.evaluators.perplexity:PerplexityEvaluator")
EVALUATORS.register("cost", "mergesearch.evaluators.cost:CostEvaluator")
BUILT_IN = frozenset(EVALUATORS)


def register_evaluator(name: str, cls: type[Evaluator] | str) -> None:
    """Make ``cls`` (an `Evaluator` subclass, or ``"package.module:Class"``) the evaluator
    called ``name`` in configs. A name is taken once."""
    EVALUATORS.register(name, cls)


def registered_evaluators(config: Config) -> dict[str, type[Evaluator]]:
    """The evaluators ``config`` names that were registered in this process by name (not
    the built-in ones, nor ``package.module:Class``): a worker in another process (a Ray
    actor) knows only what its own imports register, so these travel with it."""
    names = {o.evaluator for o in [*config.objectives, *config.heldout]}
    return {n: evaluator_class(n) for n in sorted(names) if n in EVALUATORS and n not in BUILT_IN}


def adopt_evaluators(evaluators: dict[str, type[Evaluator]]) -> None:
    """Register, in a worker's process, the evaluators its driver registered by name
    (`registered_evaluators`); names this process knows already are left as they are."""
    for name, cls in evaluators.items():
        if name not in EVALUATORS:
            EVALUATORS.register(name, cls)


def evaluator_class(name: str) -> type[Evaluator]:
    """The evaluator registered as ``name``, or the class ``package.module:Class`` names;
    `EvaluatorError` naming the known ones, or why it cannot be imported, otherwise."""
    try:
        cls = EVALUATORS.get(name, allow_import=True)
    except KeyError as e:
        raise EvaluatorError(f"evaluator: {e.args[0]}, or 'package.module:Class'") from None
    except (ImportError, AttributeError) as e:
        raise EvaluatorError(f"evaluator: cannot import {name!r} ({e})") from None
    if not (isinstance(cls, type) and issubclass(cls, Evaluator)):
        raise EvaluatorError(f"evaluator: {name!r} is not an Evaluator subclass")
    return cls


def check_objectives(config: Config, source: str | None = None) -> Config:
    """Check every objective (and heldout objective) of ``config`` against its evaluator,
    before any work starts: the evaluator exists, its options are valid (`ConfigError`
    naming ``objectives.<i>.<field>``; ``source``, the config's file, leads the message
    where given), and a direction left unset becomes the evaluator's. Returns ``config``."""
    for section in ("objectives", "heldout"):
        for i, objective in enumerate(getattr(config, section)):
            where = f"{section}.{i}"
            try:
                cls = evaluator_class(objective.evaluator)
            except EvaluatorError as e:
                raise EvaluatorError(_located(source, where, str(e))) from None
            try:
                cls.read_options(objective)
            except ValidationError as e:
                raise ConfigError(_located(source, where, format_validation_error(e))) from None
            if objective.direction is None:
                if cls.direction not in ("maximize", "minimize"):
                    raise EvaluatorError(_located(source, where, f"direction: {cls.__name__} declares "
                                                  f"{cls.direction!r}; set maximize or minimize"))
                objective.direction = cls.direction
    return config


def objective_options(objective: Objective) -> EvaluatorOptions:
    """The objective's options, validated by its evaluator's ``Options``."""
    return evaluator_class(objective.evaluator).read_options(objective)


def _located(source: str | None, where: str, detail: str) -> str:
    """``objectives.0`` + ``tasks: msg`` -> ``objectives.0.tasks: msg``, after the file."""
    located = f"{where}.{detail}" if re.match(r"^[\w\[\]-]+(\.[\w\[\]-]+)*: ", detail) else f"{where}: {detail}"
    return f"{source}: {located}" if source else located


def options_schemas() -> dict[str, Any]:
    """The JSON schema of each registered evaluator's options, as ``<name>_options``, and
    the models they refer to, for ``$defs`` of the config's schema."""
    defs: dict[str, Any] = {}
    for name in EVALUATORS.names():
        schema = evaluator_class(name).Options.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(schema.pop("$defs", {}))
        schema["description"] = (f"Options of evaluator: {name}, the objective's keys besides name, "
                                 f"evaluator and direction. " + schema.get("description", "")).strip()
        defs[f"{name}_options"] = schema
    return defs


def build_evaluators(config: Config, objectives: list[Objective] | None = None) -> list[Evaluator]:
    """One evaluator per objective (default: the config's objectives), after
    `check_objectives`."""
    check_objectives(config)
    objectives = config.objectives if objectives is None else objectives
    return [evaluator_class(o.evaluator)(o, config) for o in objectives]


def score_all(evaluators: list[Evaluator], recipe=None) -> list[Score]:
    return [ev.score(recipe) for ev in evaluators]


__all__ = ["EVALUATORS", "Evaluator", "EvaluatorOptions", "Score", "build_evaluators", "check_objectives",
           "evaluator_class", "objective_options", "options_schemas", "register_evaluator",
           "registered_evaluators", "adopt_evaluators", "score_all"]
