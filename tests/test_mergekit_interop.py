"""mergekit interop that never silently differs: for a mergekit config, mergesearch gives
mergekit 0.1.5's result (run here on the same YAML) or refuses it in one line; and what it
hands to mergekit says so where mergekit would build something else."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
from safetensors.torch import load_file
from support.cli import assert_refused
from support.recipes import (
    assert_same_tensors,
    expected_tensors,
    mergekit_tensors,
    ties_recipe,
    write,
)
from support.studies import config_for
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from mergesearch.cli import app
from mergesearch.merging import MergeEngine
from mergesearch.merging.mergekit import from_mergekit, to_mergekit, to_mergekit_yaml
from mergesearch.recipe import Recipe, RecipeError
from mergesearch.search.study import create_or_load

FRANKENMERGE = "depth-changing (frankenmerge) slices are not supported"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"}]


def merge(args: list, tmp_path: Path):
    return CliRunner().invoke(app, ["merge", *map(str, args), "--device", "cpu"])


def merge_config(config: dict, tmp_path: Path, *more: str):
    return merge([write(config, tmp_path), *more], tmp_path)


def mergekit_folder(config: dict, out: Path) -> Path:
    """mergekit's whole output folder (tokenizer and chat template included)."""
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(quiet=True, write_model_card=False))
    return out


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}


# ---- 1. slices that do not keep the model's depth ------------------------------------------


def slices_config(f: dict, *ranges: tuple[int, int]) -> dict:
    return {"merge_method": "slerp", "base_model": f["base"], "parameters": {"t": 0.5},
            "slices": [{"sources": [{"model": f[m], "layer_range": list(r)} for m in ("base", "s0")]}
                       for r in ranges]}


def test_one_slice_of_the_first_layers_is_refused_naming_it_and_the_layer_count(families, tmp_path):
    # mergekit writes a 2-layer model here
    result = merge_config(slices_config(families["llama"], (0, 2)), tmp_path, "--out", tmp_path / "out")
    assert_refused(result, f"slices[0].layer_range: [0, 2] of a model with 4 layers: the slices "
                           f"must cover layers 0..3 in order; {FRANKENMERGE}", tmp_path)


def test_slices_short_of_the_last_layer_are_refused_naming_the_last_slice(families, tmp_path):
    # mergekit writes a 3-layer model here
    result = merge_config(slices_config(families["llama"], (0, 2), (2, 3)), tmp_path, "--out", tmp_path / "out")
    assert_refused(result, "slices[1].layer_range: [2, 3] of a model with 4 layers", tmp_path)


def test_a_slice_past_the_last_layer_is_refused_naming_it(families, tmp_path):
    result = merge_config(slices_config(families["llama"], (0, 2), (2, 8)), tmp_path, "--out", tmp_path / "out")
    assert_refused(result, "slices[1].layer_range: [2, 8] of a model with 4 layers", tmp_path)


def test_a_slice_not_starting_at_layer_zero_is_refused_as_a_frankenmerge(families, tmp_path):
    result = merge_config(slices_config(families["llama"], (2, 8)), tmp_path, "--out", tmp_path / "out")
    assert_refused(result, "slices[0].layer_range [2, 8] changes the layer count or order", tmp_path)


def test_the_engine_refuses_slices_that_do_not_cover_its_layers(families):
    f = families["gpt2"]  # 3 layers
    tv = MergeEngine(f["base"], [f["s0"]], device="cpu")
    with pytest.raises(RecipeError, match=r"slices\[0\]\.layer_range: \[0, 4\] of a model with 3 layers"):
        dict(tv.merged_tensors(from_mergekit(slices_config(f, (0, 4)))))


def test_slices_covering_every_layer_merge_as_mergekit_does(families, tmp_path):
    f = families["gpt2"]
    config = slices_config(f, (0, 1), (1, 3))
    config["slices"][1]["parameters"] = {"t": [0.1, 0.9]}
    tv = MergeEngine(f["base"], [f["s0"]], device="cpu")
    ours = dict(tv.merged_tensors(from_mergekit(config)))
    assert_same_tensors(ours, mergekit_tensors({**config, "dtype": "float32"}, tmp_path / "mk"))


# ---- 2. gradients with more anchors than layers --------------------------------------------

ANCHORS = {5: [0, 0.5, 0.3, 0.7, 1], 7: [0.1, 0.9, 0.2, 0.6, 0.4, 1.0, 0.0]}


def gradient_config(f: dict, method: str, anchors: list[float]) -> dict:
    if method == "slerp":  # mergekit's README example, with 5 anchors
        return {"merge_method": "slerp", "base_model": f["base"], "parameters": {"t": anchors},
                "models": [{"model": f["base"]}, {"model": f["s0"]}]}
    return {"merge_method": "task_arithmetic", "base_model": f["base"],
            "models": [{"model": f["s0"], "parameters": {"weight": anchors}},
                       {"model": f["s1"], "parameters": {"weight": 0.5}}]}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])  # 4 and 3 layers
@pytest.mark.parametrize("n", list(ANCHORS))
@pytest.mark.parametrize("method", ["slerp", "task_arithmetic"])
def test_more_anchors_than_layers_interpolate_as_mergekit_does(method, n, arch, families, tmp_path):
    f = families[arch]
    config = gradient_config(f, method, ANCHORS[n])
    tv = MergeEngine(f["base"], [f["s0"], f["s1"]], device="cpu")
    assert tv.num_layers < n
    ours = dict(tv.merged_tensors(from_mergekit(config)))
    assert_same_tensors(ours, mergekit_tensors({**config, "dtype": "float32"}, tmp_path / "mk"))


def test_merge_command_takes_mergekits_readme_slerp_gradient(families, tmp_path):
    f = families["llama"]
    config = gradient_config(f, "slerp", ANCHORS[5])
    result = merge_config(config, tmp_path, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert_same_tensors(folder_tensors(tmp_path / "out"),
                        mergekit_tensors({**config, "dtype": "float32"}, tmp_path / "mk"))


# ---- 3. tokenizer and chat template ---------------------------------------------------------


def rendered(folder: Path) -> list[str]:
    """CHAT rendered without and with a generation prompt, then with padded contents."""
    tok = AutoTokenizer.from_pretrained(folder)
    padded = [{**m, "content": f" {m['content']}\n"} for m in CHAT]
    return [tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=g)
            for chat in (CHAT, padded) for g in (False, True)]


GENERATION_PROMPT_ENDS = {
    "chatml": "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\n"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("name", list(GENERATION_PROMPT_ENDS))
def test_a_built_in_chat_template_renders_as_mergekits(name, families, tmp_path):
    config = ties_recipe(families["llama"], chat_template=name)
    result = merge_config(config, tmp_path, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    theirs = mergekit_folder(config, tmp_path / "mk")
    assert rendered(tmp_path / "out") == rendered(theirs)
    assert rendered(theirs)[1].endswith(GENERATION_PROMPT_ENDS[name])
    # written where mergekit (through transformers) writes it
    assert (tmp_path / "out" / "chat_template.jinja").exists() and (theirs / "chat_template.jinja").exists()


def test_a_literal_chat_template_is_written_as_given(families, tmp_path):
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    config = ties_recipe(families["llama"], chat_template=template)
    result = merge_config(config, tmp_path, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert rendered(tmp_path / "out") == rendered(mergekit_folder(config, tmp_path / "mk"))
    assert rendered(tmp_path / "out")[0].startswith("[system] be brief\n[user] 1+1?\n")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("source", ["base", "s1"])
def test_tokenizer_source_of_the_same_vocabulary_gives_mergekits_tensors_and_tokenizer(
        source, arch, families, tmp_path):
    f = families[arch]
    config = ties_recipe(f, tokenizer_source=source if source == "base" else f[source], dtype="float32")
    result = merge_config(config, tmp_path, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    theirs = mergekit_folder(config, tmp_path / "mk")
    assert_same_tensors(folder_tensors(tmp_path / "out"), folder_tensors(theirs))
    ours_tok, their_tok = (AutoTokenizer.from_pretrained(d) for d in (tmp_path / "out", theirs))
    assert ours_tok.get_vocab() == their_tok.get_vocab()
    assert ours_tok("1+1=2")["input_ids"] == their_tok("1+1=2")["input_ids"]


def test_tokenizer_source_model_gives_that_models_tokenizer_files(families, tmp_path):
    f = families["llama"]
    chatty = tmp_path / "chatty"  # s1 with a chat template of its own: the same vocabulary
    shutil.copytree(f["s1"], chatty)
    tok = AutoTokenizer.from_pretrained(chatty)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(chatty)
    config = ties_recipe(f, tokenizer_source=str(chatty))
    config["models"][1]["model"] = str(chatty)
    result = merge_config(config, tmp_path, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert rendered(tmp_path / "out") == rendered(mergekit_folder(config, tmp_path / "mk"))
    assert rendered(tmp_path / "out")[0].startswith("<system>be brief<user>1+1?")


def test_tokenizer_source_union_is_refused(families, tmp_path):
    result = merge_config(ties_recipe(families["llama"], tokenizer_source="union"), tmp_path, tmp_path / "out")
    assert_refused(result, "tokenizer_source: union: mergesearch does not build merged vocabularies "
                           "('union'); use tokenizer_source: base", tmp_path)


def test_tokenizer_section_with_tokens_is_refused(families, tmp_path):
    config = ties_recipe(families["llama"], tokenizer={"source": "base", "tokens": {"<s>": {"source": "base"}}})
    result = merge_config(config, tmp_path, tmp_path / "out")
    assert_refused(result, "tokenizer.tokens: mergekit sets token embeddings there and mergesearch "
                           "does not; use tokenizer_source: base", tmp_path)


def test_tokenizer_section_without_a_source_is_refused_as_a_union(families, tmp_path):
    config = ties_recipe(families["llama"], tokenizer={"pad_to_multiple_of": None})
    assert_refused(merge_config(config, tmp_path, tmp_path / "out"),
                   "tokenizer.source: union: mergesearch does not build merged vocabularies", tmp_path)


def test_tokenizer_section_with_a_source_reads_as_tokenizer_source(families):
    recipe = from_mergekit(ties_recipe(families["llama"], tokenizer={"source": "base"}))
    assert recipe.tokenizer_source == "base"


def test_tokenizer_source_outside_the_merge_is_refused(families, tmp_path):
    f = families["llama"]
    result = merge_config(ties_recipe(f, tokenizer_source=f["s2"]), tmp_path, tmp_path / "out")
    assert_refused(result, f"tokenizer_source: {f['s2']} is not a model of this merge", tmp_path)


def test_tokenizer_source_with_more_embedding_rows_than_tokens_is_refused(families, tmp_path):
    padded = tmp_path / "padded"
    shutil.copytree(families["llama"]["s0"], padded)
    model = AutoModelForCausalLM.from_pretrained(padded)
    model.resize_token_embeddings(64)  # mergekit would cut the embeddings to the 51 tokens
    model.save_pretrained(padded)
    config = {"merge_method": "passthrough", "tokenizer_source": "base",
              "models": [{"model": str(padded)}]}
    assert_refused(merge_config(config, tmp_path, tmp_path / "out"),
                   f"tokenizer_source: {padded}'s tokenizer has 51 tokens and its embeddings 64 rows",
                   tmp_path)


def test_a_mergekit_template_we_do_not_ship_is_refused_by_name(families, tmp_path):
    result = merge_config(ties_recipe(families["llama"], chat_template="mistral"), tmp_path, tmp_path / "out")
    assert_refused(result, "chat_template: mergesearch does not ship mergekit's 'mistral' template "
                           "(it has chatml, llama3); give the template's Jinja text", tmp_path)


def test_a_chat_template_for_a_base_without_tokenizer_is_refused(families, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(families["llama"]["base"], bare)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    config = {"merge_method": "passthrough", "chat_template": "chatml", "models": [{"model": str(bare)}]}
    assert_refused(merge_config(config, tmp_path, tmp_path / "out"),
                   f"chat_template: {bare} has no tokenizer to carry it", tmp_path)


def test_tokenizer_fields_are_exported_and_read_back(families):
    recipe = from_mergekit(ties_recipe(families["llama"], tokenizer_source="base", chat_template="chatml"))
    exported = yaml.safe_load(to_mergekit_yaml(recipe))
    assert (exported["tokenizer_source"], exported["chat_template"]) == ("base", "chatml")
    assert from_mergekit(exported) == recipe
    assert Recipe.from_dict(yaml.safe_load(recipe.to_json())) == recipe


def test_recipes_without_the_new_fields_keep_their_hash(families):
    recipe = from_mergekit(ties_recipe(families["llama"]))
    for key in ("tokenizer_source", "chat_template", "slice_ranges"):
        assert key not in recipe.canonical_json()
    assert recipe.model_copy(update={"chat_template": "chatml"}).hash() != recipe.hash()


# ---- 4. exports of random methods -----------------------------------------------------------


def dare_recipe(f: dict) -> dict:
    return {"method": "dare_ties", "base_model": f["base"], "seed": 3, "parameters": {"density": 0.6},
            "models": [{"model": f["s0"], "parameters": {"weight": 0.5}},
                       {"model": f["s1"], "parameters": {"weight": 0.5}}]}


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_a_random_methods_mergekit_yaml_starts_by_saying_mergekit_builds_another_model(method, families):
    recipe = Recipe.from_dict({**dare_recipe(families["llama"]), "method": method})
    text = to_mergekit_yaml(recipe)
    assert text.startswith(f"# mergekit draws {method}'s random masks itself, unseeded, so this config\n")
    assert "# run `mergesearch merge recipe.json OUT` (or export with --save-model).\n" in text
    assert yaml.safe_load(text) == to_mergekit(recipe)


def test_a_deterministic_methods_mergekit_yaml_has_no_such_comment(families):
    assert not to_mergekit_yaml(from_mergekit(ties_recipe(families["llama"]))).startswith("#")


@pytest.fixture
def dare_run(families, tmp_path):
    """A run whose only trial is a DARE recipe, scored."""
    config = config_for(families, tmp_path)
    study = create_or_load(config)
    trial = study.ask()
    trial.set_user_attr("recipe", dare_recipe(families["llama"]))
    trial.set_user_attr("scores", {"c": 0.25})
    study.tell(trial, 0.25)
    return config.run_dir


def test_exporting_a_dare_trial_prints_that_its_mergekit_yaml_builds_another_model(dare_run, tmp_path):
    result = CliRunner().invoke(app, ["export", str(dare_run), "--trial", "0", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    note = [line for line in result.stdout.splitlines() if line.startswith("note:")]
    assert note == ["note: mergekit draws dare_ties's random masks itself, unseeded, so this config "
                    "builds a different model from this recipe's. To rebuild this recipe's weights "
                    "run `mergesearch merge recipe.json OUT` (or export with --save-model)."]
    assert (tmp_path / "x" / "mergekit.yaml").read_text().startswith("# mergekit draws dare_ties's")


# ---- 5. mergekit-yaml habits ---------------------------------------------------------------


def test_merge_takes_the_output_folder_positionally_as_mergekit_yaml_does(families, tmp_path):
    f = families["llama"]
    result = merge_config(ties_recipe(f), tmp_path, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    expected = expected_tensors(f, ties_recipe(f))
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_merge_refuses_an_output_folder_given_both_ways(families, tmp_path):
    result = merge_config(ties_recipe(families["llama"]), tmp_path, tmp_path / "out", "--out", tmp_path / "o2")
    assert_refused(result, f"give the output folder once: OUT ({tmp_path / 'out'}) or --out ({tmp_path / 'o2'})",
                   tmp_path)


def test_merge_without_an_output_folder_is_refused(families, tmp_path):
    assert_refused(merge_config(ties_recipe(families["llama"]), tmp_path),
                   "no output folder: give OUT (mergesearch merge RECIPE OUT) or --out", tmp_path)


def card_of(folder: Path) -> tuple[dict, str]:
    _, front, body = (folder / "README.md").read_text().split("---\n", 2)
    return yaml.safe_load(front), body


def test_merge_writes_a_model_card_naming_method_models_and_knobs(families, tmp_path):
    f = families["llama"]
    result = merge_config(ties_recipe(f), tmp_path, tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    front, body = card_of(tmp_path / "out")
    assert front == {"base_model": f["base"], "tags": ["mergesearch", "merge"], "library_name": "transformers"}
    assert f"`ties` with `{f['base']}` as the base." in body
    assert f"- `{f['s0']}`: weight 0.6\n- `{f['s1']}`: weight [0.2, 0.8]\n" in body
    assert "## Knobs\n\n- density: 0.5\n" in body


def test_export_with_the_model_writes_a_card_with_the_trial_and_its_scores(dare_run, tmp_path):
    result = CliRunner().invoke(app, ["export", str(dare_run), "--trial", "0", "--out", str(tmp_path / "x"),
                                      "--save-model"])
    assert result.exit_code == 0, result.output
    front, body = card_of(tmp_path / "x" / "model")
    assert front["tags"] == ["mergesearch", "merge"]
    assert "## Search\n\nTrial 0 of a mergesearch study.\n\n- c: 0.25\n" in body
    assert "`dare_ties` with" in body
