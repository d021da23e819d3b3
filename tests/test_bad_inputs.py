"""A corpus of malformed inputs (tests/bad_inputs/): each is refused before any work
starts, with exit code 2 and one line naming the field or file, never a traceback, and an
existing study is left as it was."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import optuna
import pytest
from support import cli_error
from transformers import LlamaConfig, LlamaForCausalLM

from mergesearch.demo.tokenizer import char_tokenizer

HERE = Path(__file__).resolve().parent
CASES = sorted((HERE / "bad_inputs").glob("*.yaml"))
PWNED = "mergesearch-pickle-ran"


class _Payload:
    """Unpickling this runs code: a loader that honours it would create a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _llama(path: Path, **kw) -> str:
    tok = char_tokenizer()
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
               tie_word_embeddings=False)
    LlamaForCausalLM(LlamaConfig(**{**cfg, **kw})).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def places(tmp_path_factory, families) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-models")
    llama = families["llama"]
    noweights = root / "noweights"
    noweights.mkdir()
    shutil.copy(Path(llama["s1"]) / "config.json", noweights)
    corrupt = root / "corrupt"
    shutil.copytree(llama["s1"], corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x07\x00\x00\x00\x00\x00\x00\x00{garbage" + b"\0" * 64)
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(Path(llama["s1"]) / "config.json", pickled)
    with open(pickled / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Payload(root / PWNED)}, f)
    return {
        "base": llama["base"], "s0": llama["s0"], "s1": llama["s1"],
        "gpt2": families["gpt2"]["s0"],
        "wide": _llama(root / "wide", hidden_size=48),
        "bigvocab": _llama(root / "bigvocab", vocab_size=len(char_tokenizer()) + 8),
        "noweights": str(noweights), "corrupt": str(corrupt), "pickled": str(pickled),
        "missing": str(root / "no-such-model"), "tasks": str(HERE.parent / "mergesearch" / "demo" / "tasks"),
        "pwned": str(root / PWNED),
    }


def render(case: Path, places: dict[str, str], tmp_path: Path) -> tuple[Path, str]:
    # Latin-1 maps every byte to one character and back: a case that is not UTF-8 on
    # purpose (c27) keeps its bytes, the others are unchanged.
    text = case.read_bytes().decode("latin-1")
    for key, value in {**places, "run_dir": str(tmp_path / "run")}.items():
        text = text.replace("{" + key + "}", value)
    expect = text.splitlines()[0].removeprefix("# expect:").strip()
    path = tmp_path / case.name
    path.write_bytes(text.encode("latin-1"))
    return path, expect


def refuse(path: Path) -> str:
    return cli_error("run", path)


def test_the_corpus_holds_at_least_30_malformed_inputs():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_malformed_input_is_refused_with_one_line_naming_the_field_or_file(
        case, places, tmp_path, ray_session):
    path, expect = render(case, places, tmp_path)
    output = refuse(path)
    assert expect in output, output
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
    assert not Path(places["pwned"]).exists()  # no pickle was executed


def test_an_existing_study_is_untouched_by_bad_configs(places, tmp_path, ray_session):
    """A study with a finished trial and a snapshot; bad configs aimed at it change nothing."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="bad", storage=storage, directions=["maximize"])
    study.set_user_attr("mergesearch.config", {"kept": True})
    study.add_trial(optuna.trial.create_trial(value=0.5, params={"x": 0.1},
                                              distributions={"x": optuna.distributions.FloatDistribution(0, 1)}))
    before = (json.dumps(study.user_attrs, sort_keys=True), [(t.number, t.state, t.values) for t in study.trials])
    for name in ["m04_mismatched_shapes", "c10_density_out_of_range", "e01_unknown_task", "m03_corrupt_safetensors"]:
        path, _ = render(HERE / "bad_inputs" / f"{name}.yaml", places, tmp_path)
        text = path.read_text().replace('study: {name: bad, run_dir: "', f'study: {{name: bad, storage: "{storage}", run_dir: "')
        path.write_text(text)
        refuse(path)
    study = optuna.load_study(study_name="bad", storage=storage)
    after = (json.dumps(study.user_attrs, sort_keys=True), [(t.number, t.state, t.values) for t in study.trials])
    assert after == before


def test_an_error_raised_in_a_worker_reaches_the_user_without_its_class_path(ray_session):
    """A user error raised in a Ray worker crosses as a traceback whose last line starts
    with the class path (``mergesearch.config.ConfigError: ...``): the message drops it."""
    from mergesearch.config import ConfigError
    from mergesearch.search.pool import actor_cause

    @ray_session.remote
    class Refuses:
        def __init__(self):
            raise ConfigError("config snapshot: budget.n_trials: Input should be greater than or equal to 1")

        def info(self):
            return {}

    with pytest.raises(ray_session.exceptions.RayActorError) as e:
        ray_session.get(Refuses.remote().info.remote(), timeout=120)
    assert actor_cause(e.value) == "config snapshot: budget.n_trials: Input should be greater than or equal to 1"
