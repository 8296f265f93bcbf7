"""End-to-end CLI tests on a tiny local model: every command, help, JSON output, config and profiles."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cli_helpers import FAST, invoke, jsonl, one_error_line, tiny_model, write_docs


@pytest.fixture
def docs(tmp_path):
    return write_docs(tmp_path / "docs", n=2)


COMMANDS = ["summarize", "qa", "rag", "compress", "info", "batch", "profile", "profiles", "profiles show"]


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_shows_an_example(command):
    r = invoke([*command.split(), "--help"])
    assert r.exit_code == 0, r.stderr
    assert "Examples:" in r.stdout or "Example:" in r.stdout
    assert "dynkv " in r.stdout.split("Example")[-1]


def test_summarize_prints_the_answer_only_on_stdout(model, docs):
    r = invoke(["summarize", docs[0], "--model", model, *FAST])
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip()
    assert r.stderr == ""  # no progress bars when stderr is not a terminal


def test_summarize_json_several_files(model, docs):
    r = invoke(["summarize", *docs, "--model", model, "--json", *FAST])
    assert r.exit_code == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["source"] for rec in records] == [str(d) for d in docs]
    for rec in records:
        assert rec["task"] == "summarize" and rec["profile"] == "summarize" and rec["error"] is None
        assert rec["doc_tokens"] > 0 and rec["bytes_used"] < rec["full_kv_bytes"]
        assert len(rec["kept_per_layer"]) == 4
        assert rec["answers"][0]["tokens"] <= 3


def test_summarize_to_file(model, docs, tmp_path):
    out = tmp_path / "summary.txt"
    r = invoke(["summarize", docs[0], "--model", model, "-o", out, *FAST])
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "" and out.read_text().strip()


def test_qa_shared_and_separate_questions(model, docs):
    base = ["qa", docs[0], "-q", "What is the pass key?", "-q", "Who?", "--model", model, "--json", *FAST]
    shared = json.loads(invoke(base).stdout)
    assert [a["question"] for a in shared["answers"]] == ["What is the pass key?", "Who?"]
    assert shared["passes"] == 1  # the qa profile shares one compressed document
    separate = invoke([*base, "--separate"])
    assert separate.exit_code == 0, separate.stderr
    assert json.loads(separate.stdout)["passes"] == 2


def test_qa_text_output_and_stdin(model, docs):
    r = invoke(["qa", "-", "-q", "What is the pass key?", "--model", model, *FAST], input=docs[0].read_text())
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() and not r.stdout.startswith("Q:")
    r2 = invoke(["qa", docs[0], "-q", "a?", "-q", "b?", "--model", model, *FAST])
    assert r2.stdout.startswith("Q: a?\n") and "\nQ: b?\n" in r2.stdout


def test_flags_override_the_profile(model, docs):
    r = invoke(["qa", docs[0], "-q", "k?", "--model", model, "--budget", "16", "--method", "snapkv", "--json", *FAST])
    rec = json.loads(r.stdout)
    assert rec["budget"] == "16" and rec["method"] == "snapkv" and rec["budget_tokens"] == 16
    assert max(rec["kept_per_layer"]) == 16


def test_rag_marks_passages_with_their_sources(model, docs):
    r = invoke(["rag", docs[0].parent, "-q", "Which document has key 4712?", "--model", model, "--json", *FAST])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["task"] == "rag" and rec["sources"] == [str(d) for d in docs]
    assert "cited_sources" in rec["answers"][0]


def test_rag_cited_sources_are_mapped_back():
    from dynkv_cli.engine import Answer
    from dynkv_cli.tasks import TaskResult

    result = TaskResult(source="2 documents", task="rag", profile="rag", sources=["a.txt", "b.pdf"])
    answer = Answer("q", "It is in [2], also [1][2] and [7].", [], "eos", 0, 0.0, 0.0)
    assert result.cited(answer) == ["b.pdf", "a.txt"]


def test_rag_skips_a_bad_passage_with_a_warning(model, docs, tmp_path):
    bad = docs[0].parent / "empty.txt"
    bad.write_text("")
    r = invoke(["rag", docs[0].parent, "-q", "k?", "--model", model, "--json", *FAST])
    assert r.exit_code == 0, r.stderr
    assert "warning: skipped: " in r.stderr and "empty.txt is empty" in r.stderr
    assert len(json.loads(r.stdout)["sources"]) == 2


def test_compress_then_info_then_qa_from_the_cache(model, docs, tmp_path):
    dkv = tmp_path / "doc.dkv"
    r = invoke(["compress", docs[0], "-o", dkv, "--model", model, "--chunk-size", "128"])
    assert r.exit_code == 0, r.stderr
    assert dkv.is_file() and r.stdout == "" and "compressed" in r.stderr
    info = invoke(["info", dkv])
    assert info.exit_code == 0, info.stderr
    assert "dynamickv" in info.stdout and "kept tokens per layer" in info.stdout and str(docs[0]) in info.stdout
    header = json.loads(invoke(["info", dkv, "--json"]).stdout)
    assert header["format"] == "dynkv-cache/2" and header["stats"]["doc_tokens"] > 0
    qa = invoke(["qa", dkv, "-q", "What is the pass key?", "--model", model, "--json", "--max-new-tokens", "3"])
    assert qa.exit_code == 0, qa.stderr
    rec = json.loads(qa.stdout)
    assert rec["source"] == str(docs[0]) and rec["passes"] == 0 and len(rec["answers"]) == 1


def test_cache_from_another_model_is_refused(model, docs, tmp_path, tmp_path_factory):
    other = tiny_model(tmp_path_factory, "dynkv-cli-model-2layers", layers=2)
    dkv = tmp_path / "doc.dkv"
    assert invoke(["compress", docs[0], "-o", dkv, "--model", model, *FAST]).exit_code == 0
    r = invoke(["qa", dkv, "-q", "k?", "--model", other, *FAST])
    assert r.exit_code == 1
    assert "was compressed with model" in one_error_line(r)


def test_info_on_a_file_that_is_not_a_cache(docs):
    r = invoke(["info", docs[0]])
    assert r.exit_code == 1
    assert "not a readable dynkv cache file" in one_error_line(r)


def test_profile_report(model, docs):
    r = invoke(["profile", docs[0], "--model", model, "--methods", "dynamickv,snapkv", "--budget", "10%", *FAST])
    assert r.exit_code == 0, r.stderr
    out = r.stdout
    assert "full KV cache" in out and "compression ratio" in out and "kept tokens per layer" in out
    assert "dynamickv" in out and "snapkv" in out and "█" in out
    data = json.loads(invoke(["profile", docs[0], "--model", model, "--json", *FAST]).stdout)
    assert [m["method"] for m in data["methods"]] == ["dynamickv", "snapkv"]
    for m in data["methods"]:
        assert len(m["kept_per_layer"]) == data["num_layers"] == 4
        assert m["bytes_used"] < m["full_kv_bytes"] and m["prefill_tokens_per_s"] > 0


def test_profiles_list_and_show():
    r = invoke(["profiles"])
    assert r.exit_code == 0
    for name in ("summarize", "qa", "rag", "code", "needle"):
        assert name in r.stdout
    show = invoke(["profiles", "show", "rag"])
    assert show.exit_code == 0 and "passage_header" in show.stdout and "retention:" in show.stdout
    assert json.loads(invoke(["profiles", "show", "qa", "--json"]).stdout)["questions"] == "shared"
    bad = invoke(["profiles", "show", "nope"])
    assert bad.exit_code == 2 and "unknown profile 'nope'; available: code, needle, qa, rag" in one_error_line(bad)


def test_user_profile_from_config_dir(model, docs, isolated_config):
    folder = isolated_config / "profiles"
    folder.mkdir(parents=True)
    (folder / "terse.yaml").write_text(
        "extends: qa\ndescription: Mine.\nbudget: 12\ngeneration:\n  max_new_tokens: 2\n"
    )
    assert "terse" in invoke(["profiles"]).stdout
    r = invoke(["qa", docs[0], "-q", "k?", "--model", model, "--profile", "terse", "--json", "--chunk-size", "128"])
    assert r.exit_code == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["profile"] == "terse" and rec["budget"] == "12" and rec["answers"][0]["tokens"] <= 2


def test_model_from_env_and_config_file(model, docs, isolated_config, monkeypatch):
    from dynkv_cli import catalog

    monkeypatch.setattr(catalog, "default_model_file", lambda: None)  # as if SmolLM2 were not installed
    r = invoke(["qa", docs[0], "-q", "k?", *FAST])
    assert r.exit_code == 2 and "no model given" in one_error_line(r)
    monkeypatch.setenv("DYNKV_MODEL", str(model))
    assert invoke(["qa", docs[0], "-q", "k?", *FAST]).exit_code == 0
    monkeypatch.delenv("DYNKV_MODEL")
    isolated_config.mkdir(parents=True)
    (isolated_config / "config.yaml").write_text(f"model: {model}\ndevice: cpu\n")
    assert invoke(["qa", docs[0], "-q", "k?", *FAST]).exit_code == 0
    (isolated_config / "config.yaml").write_text(f"model: {model}\nmodle: x\n")
    bad = invoke(["qa", docs[0], "-q", "k?", *FAST])
    assert bad.exit_code == 2 and "unknown key(s) modle; valid keys: device, dtype, max_cache, model" in one_error_line(bad)


def test_entry_point_usage_error_is_one_line(tmp_path):
    """The installed `dynkv` script (a subprocess): a click usage error is one line, exit code 2."""
    doc = tmp_path / "a.txt"
    doc.write_text("hello")
    env = {**os.environ, "DYNKV_CONFIG_DIR": str(tmp_path)}
    cmd = [sys.executable, "-c", "from dynkv_cli.cli import main; main()"]
    r = subprocess.run([*cmd, "qa", str(doc)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: Missing option '--question'")
    v = subprocess.run([*cmd, "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert v.returncode == 0 and v.stdout.startswith("dynkv ")


def test_batch_workers_without_ray_says_how_to_install(model, docs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: `import ray` fails
    out = tmp_path / "results.jsonl"
    r = invoke(["batch", docs[0].parent, "--out", out, "--model", model, "--workers", "2", *FAST])
    assert r.exit_code == 2
    assert "pip install 'dynkv[ray]'" in one_error_line(r)
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--gpus-per-worker", "1"], "need --workers N or --ray-address"),
        (["--cpus-per-worker", "2"], "need --workers N or --ray-address"),
        (["--workers", "0"], "--workers 0: give at least 1"),
        (["--workers", "2", "--gpus-per-worker", "-1"], "--gpus-per-worker -1.0: give 0 or more"),
    ],
)
def test_batch_worker_options_are_checked_first(model, docs, tmp_path, extra, says):
    out = tmp_path / "results.jsonl"
    r = invoke(["batch", docs[0].parent, "--out", out, "--model", model, *extra, *FAST])
    assert r.exit_code == 2
    assert says in one_error_line(r)
    assert not out.exists()


def test_batch_in_process_does_not_import_ray(model, docs, tmp_path):
    code = (
        "import sys; from dynkv_cli.cli import main; sys.argv = ['dynkv'] + sys.argv[1:]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "assert 'ray' not in sys.modules, 'ray imported'"
    )
    out = tmp_path / "results.jsonl"
    r = subprocess.run(
        [sys.executable, "-c", code, "batch", str(docs[0].parent), "--out", str(out), "--model", str(model),
         "--quiet", *map(str, FAST)],  # fmt: skip
        capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert len(jsonl(out)) == len(docs)


def test_batch_over_a_folder(model, docs, tmp_path):
    out = tmp_path / "results.jsonl"
    r = invoke(
        ["batch", docs[0].parent, "--task", "qa", "-q", "What is the pass key?", "--out", out, "--model", model, *FAST]
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout == ""
    records = jsonl(out)
    assert [rec["source"] for rec in records] == [str(d) for d in docs]
    for rec in records:
        for key in ("answer", "doc_tokens", "kept_tokens", "bytes_used", "prefill_seconds", "seconds", "error"):
            assert key in rec
        assert rec["error"] is None and rec["task"] == "qa"
