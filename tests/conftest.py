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
