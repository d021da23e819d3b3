"""Model references: a folder relative to the config, a hub id as is, `<scheme>:<name>`
through the installed entry points; and the search never imports the demo to resolve one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mergesearch.errors import ConfigError
from mergesearch.merging.references import ENTRY_POINT_GROUP, reference_schemes, resolve_reference


def test_a_folder_is_taken_relative_to_the_configs_root(tmp_path):
    (tmp_path / "models" / "base").mkdir(parents=True)
    assert resolve_reference("models/base", tmp_path) == str((tmp_path / "models" / "base").resolve())


def test_a_hub_id_is_kept_as_it_is(tmp_path):
    assert resolve_reference("org/some-model", tmp_path) == "org/some-model"


def test_an_unknown_scheme_is_refused_naming_the_reference(tmp_path):
    with pytest.raises(ConfigError, match=r"^models: 'nosuch:thing': unknown model reference scheme 'nosuch' "
                                          r"\(known: demo:[,)]"):
        resolve_reference("nosuch:thing", tmp_path)


def test_the_demo_is_registered_as_an_entry_point():
    assert reference_schemes()["demo"].value == "mergesearch.demo:resolve_model"
    assert reference_schemes()["demo"].group == ENTRY_POINT_GROUP


def test_an_unknown_demo_model_is_refused_by_the_demos_resolver(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown demo model 'demo:nope'"):
        resolve_reference("demo:nope", tmp_path)


def test_the_search_does_not_import_the_demo():
    code = "import sys, mergesearch.search, mergesearch.cli; assert 'mergesearch.demo' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
