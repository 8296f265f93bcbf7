"""dynkv: long documents through a local LLM with a small, fixed DynamicKV-compressed KV cache."""

from .budget import Budget, parse_budget
from .config import CompressionSettings, GenerationSettings, RetentionSettings
from .engine import Answer, CompressedDocument, CompressStats, Engine, Progress
from .errors import DynkvError
from .model import LoadedModel, load_model
from .prompt import TaskPrompt

__version__ = "0.1.0"

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
    "RetentionSettings",
    "TaskPrompt",
    "load_model",
    "parse_budget",
]
