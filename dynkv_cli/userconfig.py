"""The user's defaults: ``<config dir>/config.yaml`` and ``DYNKV_MODEL``.

The config dir is ``DYNKV_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/dynkv``, else ``~/.config/dynkv``.
Example ``config.yaml``::

    model: ~/models/Qwen2.5-7B-Instruct   # used when --model and DYNKV_MODEL are not given
    device: cuda
    dtype: bf16
    trust_remote_code: false
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from .errors import UsageError
from .profiles import config_dir


@dataclass
class UserConfig:
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False


def config_path() -> Path:
    return config_dir() / "config.yaml"


def load_user_config() -> UserConfig:
    """Read ``config.yaml`` (missing file: defaults). Unknown keys are an error naming the valid ones."""
    path = config_path()
    if not path.is_file():
        return UserConfig()
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f"{path} is not readable YAML ({str(e).splitlines()[0]}); fix or remove it") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} must be a mapping like `model: PATH`; fix or remove it")
    names = {f.name for f in fields(UserConfig)}
    unknown = sorted(str(k) for k in set(data) - names)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(names))}")
    for k in ("model", "device", "dtype"):
        if data.get(k) is not None:
            data[k] = str(data[k])
    if not isinstance(data.get("trust_remote_code", False), bool):
        raise UsageError(f"{path}: trust_remote_code must be true or false")
    return UserConfig(**data)


def resolve_model(flag: str | None, config: UserConfig | None = None) -> str:
    """The model to use: ``--model``, else ``DYNKV_MODEL``, else the config file; a usage error if none."""
    if flag:
        return flag
    if os.environ.get("DYNKV_MODEL"):
        return os.environ["DYNKV_MODEL"]
    config = config or load_user_config()
    if config.model:
        return str(Path(config.model).expanduser()) if config.model.startswith("~") else config.model
    raise UsageError(
        f"no model given: pass --model PATH_OR_HUB_ID, set DYNKV_MODEL, or write `model: PATH` in {config_path()}"
    )
