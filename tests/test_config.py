"""The config schema: what is accepted, what is refused and how the refusal reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml

from mergesearch.config import ConfigError, load_config, mask_password, parse_config
from mergesearch.evaluators import check_objectives
from mergesearch.search.samplers import (
    SAMPLERS,
    SamplerSpec,
    build_sampler,
    check_sampler,
    needs_flat_space,
)
from mergesearch.spaces import check_space

ROOT = Path(__file__).resolve().parent.parent
MINIMAL = {
    "models": {"base": "b", "sources": {"x": "x", "y": "y"}},
    "objectives": [{"name": "acc", "tasks": ["demo_add"], "metric": "acc,none"}],
}


def with_(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        node = data
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return data


def refusal(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(data, source="cfg.yaml")
    return str(e.value)


def option_refusal(data: dict) -> str:
    """How an objective's options are refused: by its evaluator, once the config parsed."""
    with pytest.raises(ConfigError) as e:
        check_objectives(parse_config(data, source="cfg.yaml"))
    return str(e.value)


def test_shipped_configs_load():
    demo = load_config(ROOT / "mergesearch" / "demo" / "demo.yaml")
    assert [o.name for o in demo.objectives] == ["add", "reverse", "sort"]
    assert (demo.sampler.name, demo.sampler.warm_start) == ("gp", True)
    assert demo.include_paths() == [str(ROOT / "mergesearch" / "demo" / "tasks")]
    cluster = load_config(ROOT / "configs" / "mistral7b-cluster.yaml")
    assert cluster.workers.gpus_per_worker == 1


def test_defaults_pick_tpe_without_a_warm_start_for_any_number_of_objectives():
    two = with_(objectives=[{"name": "a", "tasks": ["t"], "metric": "acc,none"},
                            {"name": "b", "evaluator": "cost"}])
    assert (parse_config(two).sampler.name, parse_config(two).sampler.warm_start) == ("tpe", False)
    assert (parse_config(MINIMAL).sampler.name, parse_config(MINIMAL).sampler.warm_start) == ("tpe", False)


def test_population_defaults_to_twice_the_workers_at_least_16():
    assert parse_config(with_(workers={"count": 12})).population_size == 24
    assert parse_config(MINIMAL).population_size == 16


def test_directions_default_by_evaluator():
    cfg = check_objectives(parse_config(with_(objectives=[{"name": "a", "tasks": ["t"], "metric": "acc,none"},
                                                          {"name": "kept", "evaluator": "cost"}])))
    assert [o.direction for o in cfg.objectives] == ["maximize", "minimize"]


def test_objective_options_are_kept_as_given_in_the_snapshot():
    snapshot = parse_config(MINIMAL).snapshot()
    assert snapshot["objectives"] == [{"name": "acc", "evaluator": "lm_eval", "direction": None,
                                       "tasks": ["demo_add"], "metric": "acc,none"}]


def test_unknown_option_of_an_objective_is_refused_with_its_path():
    msg = option_refusal(with_(objectives=[{"name": "a", "tasks": ["t"], "metric": "acc,none", "limt": 4}]))
    assert msg == "objectives.0.limt: unknown key"


def test_option_of_another_evaluator_is_refused():
    msg = option_refusal(with_(objectives=[{"name": "a", "tasks": ["t"], "metric": "acc,none"},
                                           {"name": "kept", "evaluator": "cost", "seq_len": 8}]))
    assert msg == "objectives.1.seq_len: unknown key"


def test_unknown_key_is_refused_with_its_path():
    assert refusal(with_(space__methodz=["ties"])) == "cfg.yaml: space.methodz: unknown key"


def test_wrong_type_is_refused_with_its_path():
    assert refusal(with_(budget={"n_trials": "many"})).startswith("cfg.yaml: budget.n_trials:")


def space_refusal(data: dict) -> str:
    with pytest.raises(ConfigError) as e:
        check_space(parse_config(data, source="cfg.yaml").space)
    return str(e.value)


def test_unknown_method_is_refused_naming_known_ones():
    msg = space_refusal(with_(space={"methods": ["tiez"]}))
    assert "space.methods.tiez: unknown merge method" in msg and "ties" in msg


def test_bound_outside_valid_range_is_refused():
    msg = space_refusal(with_(space={"methods": ["ties"], "params": {"density": [0.2, 1.5]}}))
    assert "space.params.density: 1.5 is outside its valid range [0.0, 1.0]" in msg


def test_duplicate_objective_names_are_refused():
    msg = refusal(with_(objectives=[{"name": "a", "tasks": ["t"], "metric": "m"},
                                    {"name": "a", "tasks": ["u"], "metric": "m"}]))
    assert "'a' is used twice" in msg


def test_cmaes_with_several_objectives_is_refused():
    msg = refusal(with_(sampler={"name": "cmaes"}, objectives=[
        {"name": "a", "tasks": ["t"], "metric": "m"}, {"name": "b", "tasks": ["u"], "metric": "m"}]))
    assert "cmaes handles a single objective" in msg


def test_lm_eval_objective_needs_a_metric():
    assert "objectives.0.metric: an lm_eval objective names the metric" in option_refusal(
        with_(objectives=[{"name": "a", "tasks": ["t"]}]))


def test_limit_above_one_as_a_fraction_is_refused():
    assert option_refusal(with_(objectives=[{"name": "a", "tasks": ["t"], "metric": "m", "limit": 1.5}])) == (
        "objectives.0.limit: a positive count, or a fraction in (0, 1]")


def test_heldout_options_are_refused_with_their_path():
    msg = option_refusal(with_(heldout=[{"name": "h", "evaluator": "perplexity"}]))
    assert msg == "heldout.0.dataset: a perplexity objective needs a dataset"


def test_objective_name_with_a_space_is_refused():
    assert refusal(with_(objectives=[{"name": "a b", "evaluator": "cost"}])) == (
        "cfg.yaml: objectives.0.name: 'a b' may only use letters, digits, '_', '.', '-'")


def test_unknown_sampler_is_refused_naming_known_ones():
    with pytest.raises(ConfigError) as e:
        check_sampler(parse_config(with_(sampler={"name": "annealing"})))
    assert str(e.value).startswith("sampler.name: unknown sampler 'annealing'; known: cmaes, gp, nsga2")


def test_a_registered_sampler_is_built_by_name_with_its_seed():
    seeds: list[int] = []

    def build(config, seed: int) -> optuna.samplers.BaseSampler:
        seeds.append(seed)
        return optuna.samplers.RandomSampler(seed=seed)

    SAMPLERS.register("test_seeded", SamplerSpec(build))
    sampler = build_sampler(parse_config(with_(sampler={"name": "test_seeded", "seed": 5})), offset=2)
    assert isinstance(sampler, optuna.samplers.RandomSampler) and seeds == [7]


def test_a_sampler_declared_flat_samples_every_methods_knobs():
    SAMPLERS.register("test_flat", SamplerSpec(lambda config, seed: optuna.samplers.RandomSampler(seed), True))
    two_methods = parse_config(with_(sampler={"name": "test_flat"}, space={"methods": ["ties", "dare_ties"]}))
    random = parse_config(with_(sampler={"name": "random"}, space={"methods": ["ties", "dare_ties"]}))
    assert (needs_flat_space(two_methods), needs_flat_space(random)) == (True, False)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("models:\n  base: b\n  sources: [x, y\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line \d+"):
        load_config(f)


def test_storage_password_is_masked_in_the_snapshot(monkeypatch):
    monkeypatch.setenv("PGPASSWORD", "s3cret")
    cfg = parse_config(with_(study={"name": "s", "storage": "postgresql://u:${PGPASSWORD}@h/db"}))
    assert cfg.storage_url == "postgresql://u:s3cret@h/db"
    assert cfg.snapshot()["study"]["storage"] == "postgresql://u:***@h/db"
    assert mask_password("sqlite:///x.db") == "sqlite:///x.db"


def test_relative_task_folders_are_taken_from_the_config_folder(tmp_path):
    f = tmp_path / "sub" / "c.yaml"
    f.parent.mkdir()
    f.write_text(yaml.safe_dump(with_(lm_eval={"include_path": "tasks"})))
    assert load_config(f).include_paths() == [str(tmp_path / "sub" / "tasks")]


@pytest.mark.e2e
def test_schema_command_prints_json_schema():
    out = subprocess.run([sys.executable, "-m", "mergesearch.cli", "schema"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0
    assert '"objectives"' in out.stdout and '"models"' in out.stdout
    assert all(f'"{name}_options"' in out.stdout for name in ("lm_eval", "perplexity", "cost"))
