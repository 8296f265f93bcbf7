"""The user's defaults: ``<config dir>/config.yaml`` and ``DYNKV_MODEL``.

The config dir is ``DYNKV_CONFIG_DIR``, else ``$XDG_CONFIG_HOME/dynkv``, else ``~/.config/dynkv``.
Example ``config.yaml``::

    model: ~/models/Qwen2.5-7B-Instruct   # used when --model and DYNKV_MODEL are not given
                                          # (a folder or a .gguf file; else the default model)
    device: cuda
    dtype: bf16
    trust_remote_code: false
    max_cache: 4GiB                       # the largest cache a budget may make (--max-cache; off: no limit)
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
    max_cache: str | None = None


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
    if data.get("max_cache") is False:  # YAML reads `max_cache: off` as false
        data["max_cache"] = "off"
    for k in ("model", "device", "dtype", "max_cache"):
        if data.get(k) is not None:
            data[k] = str(data[k])
    if not isinstance(data.get("trust_remote_code", False), bool):
        raise UsageError(f"{path}: trust_remote_code must be true or false")
    return UserConfig(**data)


def resolve_model(flag: str | None, config: UserConfig | None = None) -> str:
    """The model to use: ``--model``, else ``DYNKV_MODEL``, else the config file, else the default model."""
    return resolve_model_origin(flag, config)[0]


def resolve_model_origin(flag: str | None, config: UserConfig | None = None) -> tuple[str, str]:
    """``(model, where it came from)``: ``--model``, ``DYNKV_MODEL``, ``config`` or ``default``.

    The default is SmolLM2-135M-Instruct when the package carrying it is installed
    (:func:`catalog.default_model_file`); with none of them a usage error says how to get one.
    """
    from .catalog import DEFAULT_NAME, INSTALL_DEFAULT, default_model_file

    if flag:
        return flag, "--model"
    if os.environ.get("DYNKV_MODEL"):
        return os.environ["DYNKV_MODEL"], "DYNKV_MODEL"
    config = config or load_user_config()
    if config.model:
        return (str(Path(config.model).expanduser()) if config.model.startswith("~") else config.model), "config"
    default = default_model_file()
    if default is not None:
        return str(default), "default"
    raise UsageError(
        f"no model given and the default model ({DEFAULT_NAME}) is not installed: run `{INSTALL_DEFAULT}`, "
        f"or pass --model PATH (a .gguf file or a model folder), set DYNKV_MODEL, or write `model: PATH` in "
        f"{config_path()}"
    )
