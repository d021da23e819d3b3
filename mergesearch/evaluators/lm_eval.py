"""lm-eval on the resident model: set up once per worker, scored many times.

The live model is wrapped in lm-eval's `HFLM` (a reference, not a copy: in-place weight
changes show in the next call). The task manager is built once per process and the task
dict once per evaluator; each call then runs `lm_eval.evaluator.evaluate` after reseeding
exactly as `simple_evaluate` (and so the `lm_eval` CLI) does, giving the CLI's numbers.
lm-eval's request cache is never used: it is keyed by requests, not weights, and would
return stale scores after a merge.
"""

from __future__ import annotations

import difflib
import logging
import math
import random
from functools import cache
from typing import Any

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from mergesearch.errors import EvaluatorError
from mergesearch.evaluators.base import Evaluator, EvaluatorOptions

# lm-eval's CLI defaults (`--seed 0,1234,1234,1234`).
RANDOM_SEED, NUMPY_SEED, TORCH_SEED = 0, 1234, 1234

# (id(model), batch size) -> HFLM, shared by a worker's lm-eval evaluators of one batch size:
# an HFLM holds its batch size, so objectives of different batch sizes need one each.
_WRAPPERS: dict[tuple[int, int], Any] = {}


@cache
def task_manager(include_paths: tuple[str, ...], include_defaults: bool):
    """One TaskManager per process and set of task folders (indexing is slow)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=include_defaults)


def wrap(model: Any, tokenizer: Any, batch_size: int) -> Any:
    from lm_eval.models.huggingface import HFLM

    key = (id(model), batch_size)
    lm = _WRAPPERS.get(key)
    if lm is None or lm.model is not model:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        _WRAPPERS[key] = lm
    return lm


def metric_keys(task: Any) -> list[str]:
    """`metric,filter` keys a task reports, e.g. ``acc,none``."""
    filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
    return [f"{m},{f}" for m in task.aggregation() for f in filters]


def scaled_limit(limit: int | float | None, fraction: float) -> int | float | None:
    """The objective's ``limit`` cut to ``fraction`` of it: lm-eval reads a float below 1 as
    a fraction of each task's documents and anything else as a count."""
    if fraction >= 1:
        return limit
    if limit is None:
        return fraction
    if isinstance(limit, float) and limit < 1:
        return limit * fraction
    return max(2, math.ceil(limit * fraction))


class LmEvalOptions(EvaluatorOptions):
    """An lm_eval objective: the tasks it scores and the metric it reads, and lm-eval's
    settings for them."""

    tasks: list[str] = Field(default_factory=list, description="lm-eval task or group names")
    metric: str | None = Field(None, description="lm-eval metric key, e.g. 'acc,none'; the mean over tasks is used")
    limit: int | float | None = Field(None, description="Examples per task (int) or fraction (float < 1)")
    num_fewshot: int | None = None
    batch_size: int = Field(16, ge=1)
    apply_chat_template: bool = False
    fewshot_as_multiturn: bool = False
    gen_kwargs: dict[str, Any] | None = None
    seed: int = Field(1234, description="Seed of the few-shot examples' sampler")

    @field_validator("limit")
    @classmethod
    def _limit(cls, v: int | float | None) -> int | float | None:
        if v is not None and (v <= 0 or (isinstance(v, float) and v > 1)):
            raise ValueError("a positive count, or a fraction in (0, 1]")
        return v

    @model_validator(mode="after")
    def _named(self) -> LmEvalOptions:
        # Checked here rather than as required fields, for messages that say what to give.
        if not self.tasks:
            raise ValueError("tasks: an lm_eval objective needs at least one task")
        if not self.metric:
            raise ValueError("metric: an lm_eval objective names the metric it reads, e.g. 'acc,none'")
        return self


class LmEvalEvaluator(Evaluator):
    partial = True
    direction = "maximize"  # lm-eval's metrics are scores: accuracy, exact match, ...
    Options = LmEvalOptions
    options: LmEvalOptions

    def setup(self, model: Any, tokenizer: Any, engine: Any = None) -> None:
        obj, opts, cfg = self.objective, self.options, self.config
        manager = task_manager(tuple(cfg.include_paths()), cfg.lm_eval.include_defaults)
        known = set(manager.all_tasks)
        for name in opts.tasks:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
                hint = f"; close matches: {', '.join(close)}" if close else (
                    "" if known else "; no tasks are indexed: check lm_eval.include_path")
                raise EvaluatorError(f"objectives.{obj.name}.tasks: unknown lm-eval task {name!r}{hint}")
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        try:
            self.task_dict = manager.load(list(opts.tasks))
        except Exception as e:  # noqa: BLE001 - a task that cannot be built is a set-up error
            raise EvaluatorError(f"objectives.{obj.name}.tasks: cannot load ({e.__class__.__name__}: {e})") from None
        for name, task in self.task_dict["tasks"].items():
            if task.config.unsafe_code and not cfg.lm_eval.allow_unsafe_code:
                raise EvaluatorError(
                    f"objectives.{obj.name}.tasks: {name} executes model-written code; set "
                    "lm_eval.allow_unsafe_code: true to allow it")
            if task.get_config("output_type") == "generate_until" and opts.gen_kwargs:
                task.set_config(key="generation_kwargs", value=opts.gen_kwargs, update=True)
            if opts.num_fewshot is not None:
                if task.get_config("num_fewshot") != 0:
                    task.set_config(key="num_fewshot", value=opts.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            keys = metric_keys(task)
            if opts.metric not in keys:
                raise EvaluatorError(
                    f"objectives.{obj.name}.metric: task {name} reports no {opts.metric!r}; "
                    f"it reports {', '.join(keys)}")
        self.lm = wrap(model, tokenizer, opts.batch_size)

    def calibration_texts(self) -> list[str]:
        """Each task's training documents (else validation, else the test documents past
        ``limit``, which this objective never scores), as the prompt and its answer."""
        opts, cfg = self.options, self.config
        manager = task_manager(tuple(cfg.include_paths()), cfg.lm_eval.include_defaults)
        texts: list[str] = []
        for task in manager.load(list(opts.tasks))["tasks"].values():
            if task.has_training_docs():
                docs = list(task.training_docs())
            elif task.has_validation_docs():
                docs = list(task.validation_docs())
            else:
                docs = list(task.test_docs())
                if opts.limit is not None:  # skip the documents the objective scores
                    limit = opts.limit
                    docs = docs[int(limit) if limit >= 1 else int(-(-len(docs) * limit // 1)):]
            texts.extend(_document_text(task, d) for d in docs)
        return texts

    def measure(self, recipe: Any, fraction: float = 1.0) -> tuple[float, dict[str, float]]:
        from lm_eval.evaluator import evaluate

        opts = self.options
        # Standard errors only where a multi-fidelity search reads them: closed-form for
        # means, a 100-draw bootstrap for the metrics lm-eval bootstraps.
        stderr_iters = 100 if self.config.fidelity.enabled else 0
        # Reseed as simple_evaluate does, so that results equal the CLI's.
        random.seed(RANDOM_SEED)
        np.random.seed(NUMPY_SEED)
        torch.manual_seed(TORCH_SEED)
        for task in self.task_dict["tasks"].values():
            task.set_fewshot_seed(seed=opts.seed)
        out = evaluate(
            lm=self.lm, task_dict=self.task_dict, limit=scaled_limit(opts.limit, fraction),
            log_samples=False, bootstrap_iters=stderr_iters, apply_chat_template=opts.apply_chat_template,
            fewshot_as_multiturn=opts.fewshot_as_multiturn, verbosity="ERROR",
            confirm_run_unsafe_code=self.config.lm_eval.allow_unsafe_code,
        )
        results = out["results"]
        metric, _, filter_name = opts.metric.partition(",")
        stderr_key = f"{metric}_stderr,{filter_name}"
        metrics: dict[str, float] = {}
        read = []  # the results the value is the mean of
        for name in opts.tasks:
            if opts.metric in results.get(name, {}):  # a task, or a group with an aggregate
                read.append(results[name])
            else:  # a tag: the mean of its tasks
                read.extend(results[t] for t in self.task_dict["tasks"] if t in results)
        for name in self.task_dict["tasks"]:
            if name in results and opts.metric in results[name]:
                metrics[f"{name}/{opts.metric}"] = results[name][opts.metric]
        metrics["examples"] = float(sum(n.get("effective", 0) for n in out.get("n-samples", {}).values()))
        errors = [r.get(stderr_key) for r in read]
        if stderr_iters and all(isinstance(e, (int, float)) for e in errors):
            metrics["stderr"] = math.sqrt(sum(e * e for e in errors)) / len(errors)
        return float(np.mean([r[opts.metric] for r in read])), metrics


def _document_text(task: Any, doc: dict) -> str:
    prompt, target = task.doc_to_text(doc), task.doc_to_target(doc)
    if task.get_config("output_type") == "multiple_choice":
        choices = task.doc_to_choice(doc)
        target = choices[target] if isinstance(target, int) else target
    if isinstance(target, list):
        target = target[0] if target else ""
    return f"{prompt}{task.get_config('target_delimiter') or ''}{target}"
