"""Multi-fidelity scoring: scoring a subset of each objective's examples with its standard
error, the promotion rule, and a search that uses them (fronts from full scores only)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from support.studies import TASKS, task_config, write_config

from mergesearch.config import load_config
from mergesearch.evaluators.lm_eval import scaled_limit
from mergesearch.search import (
    CandidateResult,
    CandidateWorker,
    Runner,
    pareto_front,
    study_hypervolume,
)
from mergesearch.search.front import scored_trials
from mergesearch.search.runner import Scored

FIDELITY = {"enabled": True, "fraction": 0.25, "margin": 0.0}


@pytest.mark.parametrize("limit, fraction, expected", [
    (40, 0.25, 10), (60, 0.1, 6), (3, 0.1, 2), (None, 0.25, 0.25), (0.5, 0.5, 0.25), (40, 1.0, 40)])
def test_subset_limit_is_the_fraction_of_the_objectives_limit(limit, fraction, expected):
    assert scaled_limit(limit, fraction) == expected


@pytest.mark.e2e
def test_subset_score_and_stderr_equal_the_lm_eval_cli_on_that_many_examples(demo_experts, tmp_path):
    model = str(demo_experts["base"])
    cli = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model}",
         "--tasks", "demo_add,demo_sort", "--include_path", TASKS, "--limit", "10", "--batch_size", "16",
         "--output_path", str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]
    cfg = task_config([{"name": "both", "tasks": ["demo_add", "demo_sort"], "metric": "acc,none", "limit": 40}],
                 fidelity=FIDELITY)
    out = CandidateWorker(cfg.snapshot(), model, {}).evaluate(None, fraction=0.25)
    add, sort = results["demo_add"], results["demo_sort"]
    assert out.fraction == {"both": 0.25} and out.examples == 20
    assert out.values["both"] == pytest.approx((add["acc,none"] + sort["acc,none"]) / 2, abs=1e-12)
    # the mean of two tasks' accuracies: se = sqrt(se_add^2 + se_sort^2) / 2
    expected = math.hypot(add["acc_stderr,none"], sort["acc_stderr,none"]) / 2
    assert expected > 0 and out.stderr["both"] == pytest.approx(expected, rel=1e-9)


def test_perplexity_on_a_subset_reads_its_first_windows_with_a_delta_method_stderr(demo_experts, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps({"text": f"{a}+{b}={a + b}"}) + "\n" for a in range(10, 60) for b in (3, 7)))
    cfg = task_config([{"name": "ppl", "evaluator": "perplexity", "seq_len": 16, "max_tokens": 160, "batch_size": 4,
                   "dataset": {"path": "json", "data_files": str(data)}}], fidelity=FIDELITY)
    worker = CandidateWorker(cfg.snapshot(), str(demo_experts["base"]), {})
    ev = worker.evaluators[0]
    score = ev.score(None, 0.25)
    windows = ev.windows[:3]  # ceil(10 windows * 0.25)
    with torch.no_grad():
        logits = worker.model(input_ids=windows).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(1)
    assert score.fraction == 0.25 and score.examples == 3
    assert score.value == pytest.approx(math.exp(nll.mean().item()), rel=1e-6)
    assert score.stderr == pytest.approx(score.value * nll.std().item() / math.sqrt(3), rel=1e-5)


def ledger(directions=("maximize", "maximize"), margin=2.0) -> Scored:
    """Two full-fidelity points on the front: a = (0.8, 0.2) and b = (0.3, 0.7)."""
    objectives = [{"name": n, "evaluator": "cost", "direction": d} for n, d in zip("xy", directions)]
    scored = Scored(task_config(objectives, fidelity={**FIDELITY, "margin": margin}))
    scored.add("front-a", {"x": 0.8, "y": 0.2})
    scored.add("front-b", {"x": 0.3, "y": 0.7})
    return scored


def first_pass(x, y, se_x=0.05, se_y=0.05) -> CandidateResult:
    return CandidateResult(values={"x": x, "y": y}, stderr={"x": se_x, "y": se_y}, fraction={"x": 0.25, "y": 0.25})


def test_a_first_pass_dominated_even_when_optimistic_is_not_promoted():
    # (0.6, 0.05) + 2 * 0.05 = (0.7, 0.15): front-a (0.8, 0.2) dominates it
    assert not ledger().promote(first_pass(0.6, 0.05))


def test_a_first_pass_within_its_error_bars_of_the_front_is_promoted():
    # (0.6, 0.12) + 0.1 = (0.7, 0.22): beyond front-a on y, below front-b on x
    assert ledger().promote(first_pass(0.6, 0.12))


def test_margin_zero_promotes_only_points_not_dominated_as_measured():
    assert not ledger(margin=0.0).promote(first_pass(0.6, 0.12))
    assert ledger(margin=0.0).promote(first_pass(0.9, 0.0))


def test_minimized_objectives_move_the_optimistic_point_down():
    scored = ledger(directions=("minimize", "maximize"))
    # x = 0.9 - 2 * 0.1 = 0.7 beats front-a's 0.8, and y = 0.75 beats front-b's 0.7
    assert scored.promote(first_pass(0.9, 0.75, se_x=0.1, se_y=0.0))
    assert not scored.promote(first_pass(0.9, 0.1, se_x=0.01, se_y=0.0))  # (0.88, 0.1) vs (0.8, 0.2)


def test_a_first_pass_without_a_standard_error_is_promoted():
    assert ledger().promote(first_pass(0.0, 0.0, se_x=None))


def test_nothing_to_promote_when_every_objective_was_scored_in_full():
    full = replace(first_pass(0.9, 0.9), fraction={"x": 1.0, "y": 1.0})
    assert not ledger().promote(full)


def test_subset_scores_do_not_count_as_front_points():
    scored = ledger()
    scored.add("low", {"x": 0.95, "y": 0.95}, fidelity=0.25)  # would dominate everything
    assert scored.fidelity("low") == {"fidelity": 0.25}
    assert scored.promote(first_pass(0.9, 0.21))  # (1.0, 0.31): not dominated by a or b


@pytest.fixture(scope="module")
def fidelity_run(tmp_path_factory, demo_experts, ray_session):
    tmp = tmp_path_factory.mktemp("fidelity")
    objectives = [{"name": s, "tasks": [f"demo_{s}"], "metric": "acc,none", "limit": 40} for s in ("add", "sort")]
    # One worker: results arrive in submission order, so the run is the same every time.
    config = load_config(write_config(tmp, n_trials=10, objectives=objectives, fidelity=FIDELITY,
                                      workers={"count": 1}))
    return config, Runner(config).run()


def test_some_candidates_stop_at_the_subset_and_others_are_promoted(fidelity_run):
    _, study = fidelity_run
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    low = [t for t in done if t.user_attrs.get("fidelity") == 0.25]
    promoted = [t for t in done if "first_scores" in t.user_attrs]
    assert len(done) == 10 and low and promoted and len(low) + len(promoted) == 10
    assert all(t.user_attrs["fidelity"] == 1.0 for t in promoted)
    # 10 of 40 examples per objective in the first pass, all 40 again in the second
    assert {t.user_attrs["examples"] for t in low} == {20}
    assert {t.user_attrs["examples"] for t in promoted} == {100}


def test_front_and_hypervolume_use_full_fidelity_scores_only(fidelity_run):
    _, study = fidelity_run
    full = scored_trials(study)
    assert full and all(t.user_attrs.get("fidelity") == 1.0 for t in full)
    assert {t.number for t in pareto_front(study)} <= {t.number for t in full}
    assert study_hypervolume(study) == study_hypervolume(study, full)


def test_a_promoted_candidates_scores_are_its_full_set_scores(fidelity_run, demo_experts):
    config, study = fidelity_run
    t = next(t for t in study.trials if "first_scores" in t.user_attrs)
    d = {k: str(v) for k, v in demo_experts.items()}
    worker = CandidateWorker(config.snapshot(), d["base"], {s: d[s] for s in ("add", "reverse", "sort")})
    recipe = json.dumps(t.user_attrs["recipe"])
    assert worker.evaluate(recipe).values == dict(zip(["add", "sort"], t.values))
    assert worker.evaluate(recipe, fraction=0.25).values == t.user_attrs["first_scores"]
