"""dynkv: long documents through a local LLM with a small, fixed DynamicKV-compressed KV cache.

The names below load on first use (PEP 562), so ``import dynkv_cli`` and ``dynkv --help`` do not import
torch or transformers; ``from dynkv_cli import Engine`` works as before.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the submodule that defines it
_EXPORTS = {
    "Budget": "budget",
    "parse_budget": "budget",
    "CompressionSettings": "config",
    "GenerationSettings": "config",
    "Answer": "engine",
    "CompressedDocument": "engine",
    "CompressStats": "engine",
    "Engine": "engine",
    "Progress": "engine",
    "DynkvError": "errors",
    "LoadedModel": "model",
    "load_model": "model",
    "TaskPrompt": "prompt",
}

__all__ = [
    "Answer",
    "Budget",
    "CompressStats",
    "CompressedDocument",
    "CompressionSettings",
    "DynkvError",
    "Engine",
    "GenerationSettings",
    "LoadedModel",
    "Progress",
    "TaskPrompt",
    "load_model",
    "parse_budget",
]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # for type checkers and editors; nothing is imported at run time
    from .budget import Budget, parse_budget
    from .config import CompressionSettings, GenerationSettings
    from .engine import Answer, CompressedDocument, CompressStats, Engine, Progress
    from .errors import DynkvError
    from .model import LoadedModel, load_model
    from .prompt import TaskPrompt
