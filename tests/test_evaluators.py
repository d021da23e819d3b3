"""Evaluators on the live model, and the demo experts they score."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.studies import TASKS
from support.studies import task_config as config

from mergesearch.config import parse_config
from mergesearch.errors import EvaluatorError
from mergesearch.evaluators import EvaluatorOptions, build_evaluators, register_evaluator
from mergesearch.evaluators.base import Evaluator
from mergesearch.evaluators.cost import kept_fraction
from mergesearch.merging import MergeEngine, load_live_model
from mergesearch.recipe import Recipe
from mergesearch.search import CandidateWorker


class ConstantEvaluator(Evaluator):
    """Scores the number its objective gives: a user's evaluator with an option of its own."""

    direction = "maximize"

    class Options(EvaluatorOptions):
        value: float

    def setup(self, model, tokenizer, engine=None) -> None:
        pass

    def measure(self, recipe):
        return self.options.value, {}


register_evaluator("test_constant", ConstantEvaluator)

SKILLS = [{"name": s, "tasks": [f"demo_{s}"], "metric": "acc,none", "limit": 40} for s in ("add", "reverse", "sort")]


@pytest.fixture(scope="module")
def worker(demo_experts):
    d = {k: str(v) for k, v in demo_experts.items()}
    return CandidateWorker(config(SKILLS).snapshot(), d["base"], {s: d[s] for s in ("add", "reverse", "sort")})


def passthrough(path) -> str:
    return Recipe(method="passthrough", models=[{"model": str(path)}]).model_dump_json()


@pytest.mark.e2e  # real lm-eval on the demo models: a minute or more on 2 shared cores
def test_each_expert_has_its_skill_well_above_base_and_siblings(worker, demo_experts):
    base = worker.evaluate(None).values
    for skill in ("add", "reverse", "sort"):
        scores = worker.evaluate(passthrough(demo_experts[skill])).values
        others = [worker.evaluate(passthrough(demo_experts[o])).values[skill]
                  for o in ("add", "reverse", "sort") if o != skill]
        assert scores[skill] >= 0.9
        assert base[skill] <= scores[skill] - 0.1 and max(others) <= scores[skill] - 0.1


def test_score_follows_in_place_weight_changes(worker, demo_experts):
    base = worker.evaluate(None).values
    merged = Recipe(method="task_arithmetic", base_model=str(demo_experts["base"]),
                    models=[{"model": str(demo_experts["sort"]), "parameters": {"weight": 1.0}}])
    after = worker.evaluate(merged.model_dump_json()).values
    assert after["sort"] >= base["sort"] + 0.1
    assert worker.evaluate(None).values == base  # restored weights, identical scores


@pytest.mark.e2e
def test_scores_equal_the_lm_eval_cli_to_the_last_digit(demo_experts, tmp_path):
    model = str(demo_experts["add"])
    cli = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model}",
         "--tasks", "demo_add,demo_sort", "--include_path", TASKS, "--limit", "40", "--batch_size", "16",
         "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    cfg = config([{"name": "add", "tasks": ["demo_add"], "metric": "acc,none", "limit": 40},
                  {"name": "sort", "tasks": ["demo_sort"], "metric": "acc,none", "limit": 40}])
    ours = CandidateWorker(cfg.snapshot(), model, {}).evaluate(None).values
    assert ours == {"add": results["demo_add"]["acc,none"], "sort": results["demo_sort"]["acc,none"]}


def test_unknown_task_is_refused_with_close_names(demo_experts):
    ev = build_evaluators(config([{"name": "a", "tasks": ["demo_ad"], "metric": "acc,none"}]))[0]
    with pytest.raises(EvaluatorError, match="unknown lm-eval task 'demo_ad'; close matches: demo_add"):
        ev.setup(None, None)


def test_unknown_metric_is_refused_with_the_metrics_that_exist(demo_experts):
    model = load_live_model(demo_experts["base"], torch.device("cpu"))
    ev = build_evaluators(config([{"name": "a", "tasks": ["demo_add"], "metric": "exact_match,none"}]))[0]
    with pytest.raises(EvaluatorError, match="reports no 'exact_match,none'; it reports acc,none"):
        ev.setup(model, None)


def test_code_executing_task_needs_the_unsafe_flag(demo_experts, tmp_path):
    task = (Path(TASKS) / "demo_add.yaml").read_text().replace("task: demo_add", "task: demo_unsafe")
    (tmp_path / "unsafe.yaml").write_text(task + "unsafe_code: true\n")
    (tmp_path / "demo_data.py").write_text((Path(TASKS) / "demo_data.py").read_text())
    (tmp_path / "add_test.jsonl").write_text((Path(TASKS) / "add_test.jsonl").read_text())
    model = load_live_model(demo_experts["base"], torch.device("cpu"))
    cfg = parse_config({"models": {"base": "b", "sources": {"x": "x"}}, "objectives": [
        {"name": "u", "tasks": ["demo_unsafe"], "metric": "acc,none", "limit": 4}],
        "lm_eval": {"include_path": str(tmp_path), "include_defaults": False}})
    with pytest.raises(EvaluatorError, match="executes model-written code; set lm_eval.allow_unsafe_code"):
        build_evaluators(cfg)[0].setup(model, None)


def test_a_registered_evaluator_is_found_by_name_with_its_options_and_direction():
    cfg = config([{"name": "k", "evaluator": "test_constant", "value": 0.25}])
    ev = build_evaluators(cfg)[0]
    assert isinstance(ev, ConstantEvaluator) and cfg.objectives[0].direction == "maximize"
    assert ev.score(None).value == 0.25


def test_an_unknown_evaluator_is_refused_naming_the_known_ones():
    with pytest.raises(EvaluatorError) as e:
        build_evaluators(config([{"name": "k", "evaluator": "constant"}]))
    assert str(e.value).startswith("objectives.0.evaluator: unknown evaluator 'constant'; known: cost, lm_eval")


def test_failing_and_nan_scores_are_failures_and_the_evaluator_stays_usable(demo_experts):
    from flaky_evaluator import FlakyEvaluator

    model = load_live_model(demo_experts["base"], torch.device("cpu"))
    cfg = config([{"name": "f", "evaluator": "flaky_evaluator:FlakyEvaluator", "direction": "maximize"}])
    ev = FlakyEvaluator(cfg.objectives[0], cfg)
    ev.setup(model, None)
    raised = ev.score(Recipe(method="ties", models=[{"model": "x"}]))
    nan = ev.score(Recipe(method="dare_ties", models=[{"model": "x"}]))
    fine = ev.score(None)
    assert raised.value is None and "RuntimeError: ties is not allowed here" in raised.error
    assert nan.value is None and nan.error == "f: score is nan"
    assert fine.ok and math.isfinite(fine.value)


def test_perplexity_equals_exp_of_the_mean_token_nll(demo_experts, tmp_path):
    (tmp_path / "text.jsonl").write_text('{"text": "12+7=19"}\n{"text": "abcd>dcba"}\n')
    cfg = parse_config({"models": {"base": "b", "sources": {"x": "x"}}, "objectives": [
        {"name": "ppl", "evaluator": "perplexity", "seq_len": 4, "max_tokens": 12, "batch_size": 2,
         "dataset": {"path": "json", "data_files": "text.jsonl"}}]}, root=tmp_path)
    model = load_live_model(demo_experts["base"], torch.device("cpu"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_experts["base"])
    ev = build_evaluators(cfg)[0]
    ev.setup(model, tok)
    ids = tok("12+7=19", add_special_tokens=False).input_ids + [tok.eos_token_id]
    ids += tok("abcd>dcba", add_special_tokens=False).input_ids
    windows = torch.tensor(ids[:12]).view(3, 4)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows).logits[:, :-1], -1)
    nll = -logp.gather(-1, windows[:, 1:, None]).mean().item()
    assert ev.score(None).value == pytest.approx(math.exp(nll), rel=1e-5)


def test_kept_fraction_counts_the_entries_ties_keeps(families):
    f = families["llama"]
    tv = MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu")
    recipe = Recipe(method="ties", base_model=f["base"], models=[
        {"model": f["s0"], "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": f["s1"], "parameters": {"weight": 1.0, "density": 0.25}}])
    sizes = [tv.stacks[n][0].numel() for n in tv.names]
    expected = sum(max(1, int(0.5 * n)) + max(1, int(0.25 * n)) for n in sizes) / (2 * sum(sizes))
    assert kept_fraction(recipe, tv) == pytest.approx(expected)
    assert kept_fraction(Recipe(method="task_arithmetic", base_model=f["base"],
                                models=[{"model": f["s0"], "parameters": {"weight": 1.0}}]), tv) == 1.0


@pytest.mark.e2e
def test_eval_command_scores_a_recipe(demo_experts, tmp_path):
    recipe = Recipe(method="task_arithmetic", base_model=str(demo_experts["base"]),
                    models=[{"model": str(demo_experts["add"]), "parameters": {"weight": 1.0}}])
    recipe.save(tmp_path / "r.json")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"models": {"base": "demo:base", "sources": {"add": "demo:add"}},
                               "objectives": SKILLS[:1],
                               "lm_eval": {"include_path": TASKS, "include_defaults": False}}))
    out = subprocess.run([sys.executable, "-m", "mergesearch.cli", "eval", str(cfg), "--recipe",
                          str(tmp_path / "r.json"), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["values"]["add"] >= 0.85


@pytest.mark.e2e
def test_eval_command_takes_demo_for_the_demo_config_wherever_it_runs(demo_experts, tmp_path):
    # a wheel user has no path to the packaged config: `demo` names it
    out = subprocess.run([sys.executable, "-m", "mergesearch.cli", "eval", "demo", "--model",
                          str(demo_experts["sort"]), "--heldout", "--json"], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    values = json.loads(out.stdout)["values"]
    assert set(values) == {"add_heldout", "reverse_heldout", "sort_heldout"}
    assert values["sort_heldout"] >= 0.9


def test_each_lm_eval_objective_runs_with_its_own_batch_size(families):
    cfg = config([{"name": "one", "tasks": ["demo_add"], "metric": "acc,none", "limit": 8, "batch_size": 1},
                  {"name": "four", "tasks": ["demo_sort"], "metric": "acc,none", "limit": 8, "batch_size": 4}])
    worker = CandidateWorker(cfg.snapshot(), families["llama"]["base"], {})
    batches: list[int] = []  # the batch dimension of each forward pass of the live model
    hook = worker.model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append((args[0] if args else kwargs["input_ids"]).shape[0]),
        with_kwargs=True)
    seen = {}
    try:
        for ev in worker.evaluators:
            batches.clear()
            assert ev.score(None).ok
            seen[ev.objective.name] = sorted(set(batches))
    finally:
        hook.remove()
    assert seen == {"one": [1], "four": [4]}


@pytest.mark.e2e
def test_eval_command_prints_no_library_progress_bars(families, tmp_path):
    f = families["llama"]
    (tmp_path / "text.jsonl").write_text('{"text": "12+7=19 and 3+4=7"}\n{"text": "abcd>dcba and xyz>zyx"}\n')
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({
        "models": {"base": f["base"], "sources": {"s0": f["s0"]}},
        "objectives": [
            {"name": "add", "tasks": ["demo_add"], "metric": "acc,none", "limit": 8, "batch_size": 4},
            {"name": "ppl", "evaluator": "perplexity", "direction": "minimize", "seq_len": 8,
             "max_tokens": 32, "dataset": {"path": "json", "data_files": "text.jsonl"}},
            {"name": "cost", "evaluator": "cost"}],
        "lm_eval": {"include_path": TASKS, "include_defaults": False}}))
    Recipe(method="ties", base_model=f["base"], models=[
        {"model": f["s0"], "parameters": {"weight": 1.0, "density": 0.5}}]).save(tmp_path / "r.json")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "datasets")}  # a fresh dataset build
    out = subprocess.run([sys.executable, "-m", "mergesearch.cli", "eval", str(cfg), "--recipe",
                          str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert "ppl" in out.stdout and "cost" in out.stdout
    assert "/s]" not in out.stderr and "%|" not in out.stderr, out.stderr[-2000:]
