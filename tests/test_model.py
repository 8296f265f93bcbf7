"""Model loading: local folders only from safetensors, clear errors for folders that are not models."""

from __future__ import annotations

import pytest
import torch
from tiny import make_model

from dynkv_cli import load_model
from dynkv_cli.errors import ModelLoadError, UsageError
from dynkv_cli.model import pick_dtype


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(tmp_path)
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model(str(tmp_path / "missing"))


def test_pickle_weights_refused(tmp_path):
    src = make_model(tmp_path / "m", "llama", layers=1)
    for f in src.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_model(src)


def test_offline_hub_id_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="local folder"):
        load_model("some-org/not-cached-model")


def test_loads_with_defaults_and_overrides(tmp_path):
    lm = load_model(make_model(tmp_path / "m", "qwen3", layers=1), dtype="bf16")
    assert lm.dtype == torch.bfloat16 and lm.device.type == "cpu"
    assert lm.model.config._attn_implementation == "dynkv"
    assert lm.shape.num_kv_heads == 2 and lm.shape.head_dim == 16
    assert pick_dtype(None, torch.device("cpu")) == torch.float32
    with pytest.raises(UsageError, match="dtype"):
        pick_dtype("int3", torch.device("cpu"))


def test_sliding_window_models_are_refused(tmp_path):
    import json

    src = make_model(tmp_path / "m", "mistral", layers=1)
    cfg = json.loads((src / "config.json").read_text())
    cfg["sliding_window"] = 64
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="sliding-window"):
        load_model(src)
