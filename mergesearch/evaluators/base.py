"""The Evaluator contract.

An evaluator scores one objective. It is set up once per worker with the live model (the
one `MergeEngine.merge_into` writes into) and its tokenizer, then scores the model's
*current* weights as many times as asked. `score` never raises: an exception, NaN or inf
becomes a failed `Score` with its reason, so one bad candidate never takes a worker down.

Multi-fidelity: an evaluator that can score a subset of its examples sets ``partial =
True`` and takes ``measure(recipe, fraction=...)``. Any evaluator may report the metrics
``stderr`` (the standard error of its value) and ``examples`` (how many it scored); a
search with ``fidelity.enabled`` promotes a candidate scored on a subset to the full set
only if, allowing for the standard error, it could still enter the Pareto front.

`score` runs `measure` with the libraries' progress bars and chatter off (`quiet`).

Options: an evaluator declares the keys of an objective it reads as ``Options``, a pydantic
model (`EvaluatorOptions`: unknown keys refused), with their defaults and checks, and its
natural ``direction``; it reads them, validated, as ``self.options``. A config holds them
beside the objective's ``name``, ``evaluator`` and ``direction``.
"""

from __future__ import annotations

import math
import time
import traceback
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from mergesearch.quiet import quiet_libraries

if TYPE_CHECKING:  # pragma: no cover
    from mergesearch.config import Config, Objective
    from mergesearch.merging.engine import MergeEngine
    from mergesearch.recipe import Recipe


@dataclass
class Score:
    """The outcome of scoring one objective: ``value`` (None on failure), extra named
    metrics (per task, standard errors, ...), the reason of a failure, and the time taken."""

    objective: str
    value: float | None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0
    fraction: float = 1.0  # of the objective's examples scored

    @property
    def stderr(self) -> float | None:
        return self.metrics.get("stderr")

    @property
    def examples(self) -> int:
        return int(self.metrics.get("examples", 0))

    @property
    def ok(self) -> bool:
        return self.error is None


class EvaluatorOptions(BaseModel):
    """Base of an evaluator's ``Options``: the keys of an objective it reads; any other key
    is refused (a typo is not silently ignored)."""

    model_config = ConfigDict(extra="forbid")


# Configs stored on studies before evaluators declared their options hold every evaluator's
# keys at these defaults (a cost objective with ``tasks: []``, ...). Such a key, where the
# evaluator declares no option of that name and its value is this default, is dropped, so
# that those studies can still be resumed, evaluated and exported.
LEGACY_DEFAULTS: dict[str, Any] = {
    "tasks": [], "metric": None, "limit": None, "num_fewshot": None, "batch_size": 16,
    "apply_chat_template": False, "fewshot_as_multiturn": False, "gen_kwargs": None,
    "seed": 1234, "dataset": None, "max_tokens": 16384, "seq_len": 256,
}


class Evaluator(ABC):
    """Base class: subclasses implement `setup` and `measure`, and declare their
    ``Options`` and ``direction``."""

    partial = False  # True: `measure` takes `fraction` and can score a subset of examples
    # Lower is better unless an evaluator says otherwise (as for every evaluator but lm_eval
    # before evaluators declared it); an objective's ``direction`` overrides it.
    direction: ClassVar[Literal["maximize", "minimize"]] = "minimize"
    Options: ClassVar[type[EvaluatorOptions]] = EvaluatorOptions  # none, unless declared

    def __init__(self, objective: Objective, config: Config):
        self.objective = objective
        self.config = config
        self.options = self.read_options(objective)

    @classmethod
    def read_options(cls, objective: Objective) -> EvaluatorOptions:
        """The objective's keys besides name, evaluator and direction, validated by
        ``Options``; pydantic's ValidationError where one is unknown or wrong."""
        given = dict(objective.model_extra or {})
        for key, default in LEGACY_DEFAULTS.items():
            if key in given and key not in cls.Options.model_fields and given[key] == default:
                del given[key]
        return cls.Options.model_validate(given)

    @abstractmethod
    def setup(self, model: Any, tokenizer: Any, engine: MergeEngine | None = None) -> None:
        """Once per worker: build task dicts, tokenise data, wrap the live model.
        Raise `EvaluatorError` for a wrong task, metric or dataset name."""

    @abstractmethod
    def measure(self, recipe: Recipe | None) -> tuple[float, dict[str, float]]:
        """Score the model's current weights (``recipe`` is what they were merged from, or
        None for a plain model): the objective's value and any extra metrics."""

    def calibration_texts(self) -> list[str]:
        """Texts of this objective's data that it does not score (its training documents,
        say), for calibrating the ``fisher`` method; none unless an evaluator has them.
        Called without `setup`."""
        return []

    def score(self, recipe: Recipe | None = None, fraction: float = 1.0) -> Score:
        """Score the current weights; with ``fraction`` < 1, on that fraction of the
        examples where the evaluator can (`partial`), else on all of them."""
        start = time.perf_counter()
        fraction = fraction if self.partial and fraction < 1 else 1.0
        try:
            with quiet_libraries():
                value, metrics = self.measure(recipe, fraction=fraction) if fraction < 1 else self.measure(recipe)
            value = float(value)
            if not math.isfinite(value):
                return Score(self.objective.name, None, metrics, f"{self.objective.name}: score is {value}",
                             time.perf_counter() - start)
        except Exception as e:  # noqa: BLE001 - a candidate's failure is data, not a crash
            last = traceback.extract_tb(e.__traceback__)[-1:] or [None]
            where = f" at {last[0].filename}:{last[0].lineno}" if last[0] else ""
            return Score(self.objective.name, None, {}, f"{self.objective.name}: {e.__class__.__name__}: {e}{where}",
                         time.perf_counter() - start)
        return Score(self.objective.name, value, metrics, None, time.perf_counter() - start, fraction)
