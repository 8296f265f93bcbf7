"""GGUF model files: check them, dequantize them once, keep the result as safetensors.

A ``.gguf`` file holds a model's weights (usually quantized), its configuration and its tokenizer in
one file. transformers reads it (``gguf_file=``) and dequantizes every tensor to a float dtype, which
takes a while (about 20 s for a 135M model on a 2-core CPU). dynkv does that once per file and keeps
the result as a plain model folder (``config.json``, ``model.safetensors``, tokenizer files) under
``<cache dir>/models/<sha256 of the file>/``, so later loads read safetensors in about a second.

    info = inspect_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # header only: architecture, layers, ...
    folder, sha256 = dequantized_folder(info.path)          # converts on first use, then reused

The cache dir is ``DYNKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/dynkv``, else ``~/.cache/dynkv``. Every
check a user can trip (not a GGUF file, truncated, an architecture or quantization type that cannot
be loaded, no tokenizer) raises :class:`ModelLoadError` with one line saying what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ModelLoadError

MAGIC = b"GGUF"
#: GGUF architectures dynkv runs: decoder-only, rotary positions, full attention in every layer, and
#: read by transformers' GGUF loader.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
#: Tensor types that can be dequantized (besides the ones ``gguf.quants`` implements).
PLAIN_TYPES = ("F32", "F16")
#: Marks a finished conversion; written last, inside the temporary folder, before the rename.
SOURCE_FILE = "dynkv-gguf-source.json"


@dataclass
class GGUFInfo:
    """What a GGUF file's header says (read without loading any tensor)."""

    path: Path
    file_size: int
    architecture: str
    name: str
    layers: int
    heads: int
    kv_heads: int
    context_length: int
    vocab_size: int
    tensor_types: dict[str, int] = field(default_factory=dict)  # type name -> tensor count

    @property
    def quantization(self) -> str:
        """The most common tensor type (what the file is called by: Q4_1, Q8_0, ...)."""
        return max(self.tensor_types, key=self.tensor_types.get) if self.tensor_types else "?"


def cache_dir() -> Path:
    """``DYNKV_CACHE_DIR``, else ``$XDG_CACHE_HOME/dynkv``, else ``~/.cache/dynkv``."""
    if os.environ.get("DYNKV_CACHE_DIR"):
        return Path(os.environ["DYNKV_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dynkv"


def models_dir() -> Path:
    return cache_dir() / "models"


def is_gguf(path: Path) -> bool:
    """True when ``path`` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def find_gguf(folder: Path) -> Path | None:
    """The one ``.gguf`` file in ``folder`` (not recursive), None if there is none."""
    found = sorted(p for p in folder.glob("*.gguf") if p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ModelLoadError(f"{folder} holds several GGUF files ({names}); pass --model with the one to use")
    return found[0] if found else None


def _field(reader, key: str, default=None):
    from gguf import GGUFValueType

    f = reader.fields.get(key)
    if f is None or not f.data:
        return default
    if f.types and f.types[0] == GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode("utf-8", errors="replace")
    if f.types and f.types[0] == GGUFValueType.ARRAY:
        return len(f.data)
    return f.parts[f.data[0]].tolist()[0]


def _dequantizable() -> set[str]:
    from gguf import quants

    return {t.name for t in quants._type_traits} | set(PLAIN_TYPES)


def inspect_gguf(path: str | os.PathLike) -> GGUFInfo:
    """Read and check a GGUF file's header: a loadable architecture, tensor types and a tokenizer.

    Raises :class:`ModelLoadError` for a file that is not GGUF, is truncated, has an architecture or
    tensor type transformers cannot load into a model dynkv runs, or carries no tokenizer.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    if not is_gguf(path):
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model file")
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - a dependency of dynkv
        raise ModelLoadError("reading GGUF files needs the `gguf` package: pip install gguf") from e
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader fails in many ways on a broken file
        raise ModelLoadError(
            f"{path} is truncated or damaged ({type(e).__name__} reading its header); download it again"
        ) from None
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise ModelLoadError(f"{path} is truncated ({size:,} bytes, its tensors need {end:,}); download it again")
    arch = _field(reader, "general.architecture", "")
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch or '(none)'!r} is not supported; dynkv loads GGUF models of "
            f"architecture {', '.join(ARCHITECTURES)} (or give a model folder made by save_pretrained)"
        )
    types = Counter(t.tensor_type.name for t in reader.tensors)
    bad = sorted(set(types) - _dequantizable())
    if bad:
        raise ModelLoadError(
            f"{path}: tensor type(s) {', '.join(bad)} cannot be dequantized by the gguf package; use a file "
            f"quantized as one of {', '.join(sorted(_dequantizable()))}"
        )
    if _field(reader, "tokenizer.ggml.model") is None or _field(reader, "tokenizer.ggml.tokens") is None:
        raise ModelLoadError(
            f"{path} carries no tokenizer (no tokenizer.ggml.* fields); use a GGUF file with its tokenizer"
        )
    heads = int(_field(reader, f"{arch}.attention.head_count", 0) or 0)
    return GGUFInfo(
        path=path,
        file_size=size,
        architecture=arch,
        name=_field(reader, "general.name", "") or path.stem,
        layers=int(_field(reader, f"{arch}.block_count", 0) or 0),
        heads=heads,
        kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads) or heads),
        context_length=int(_field(reader, f"{arch}.context_length", 0) or 0),
        vocab_size=int(_field(reader, f"{arch}.vocab_size", 0) or _field(reader, "tokenizer.ggml.tokens", 0) or 0),
        tensor_types=dict(types),
    )


# ---- the file's identity ----------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    """Write JSON through a temporary file and a rename (a crash never leaves half a file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    """The file's sha256, remembered in ``<cache>/models/hashes.json`` by (path, size, mtime)."""
    path = path.resolve()
    st = path.stat()
    memo_path = models_dir() / "hashes.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        memo = {}
    seen = memo.get(str(path))
    if seen and seen.get("size") == st.st_size and seen.get("mtime_ns") == st.st_mtime_ns:
        return seen["sha256"]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    memo[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(memo_path, memo)
    except OSError:
        pass  # a read-only cache only costs the hash next time
    return digest


# ---- dequantize once ----------------------------------------------------------------------------------


def cached_folder(sha256: str) -> Path | None:
    """The finished conversion of the GGUF file with this sha256, or None."""
    folder = models_dir() / sha256
    return folder if (folder / SOURCE_FILE).is_file() else None


def dequantized_folder(path: str | os.PathLike, note: Callable[[str], None] | None = None) -> tuple[Path, str]:
    """A model folder with the GGUF file's weights as fp32 safetensors, and the file's sha256.

    A file seen before (same sha256) is not read again. A new one is checked (:func:`inspect_gguf`)
    and converted (``note`` is told, since it takes a while) into a temporary folder that is renamed
    into place when complete, so an interrupted conversion leaves nothing half-written.
    """
    path = Path(path)
    if not is_gguf(path):
        inspect_gguf(path)  # raises the right message (missing, not GGUF)
    sha = file_sha256(path)
    done = cached_folder(sha)
    if done is not None:
        return done, sha
    info = inspect_gguf(path)
    if note:
        note(
            f"dequantizing {info.path.name} ({info.quantization}, {info.file_size / 2**20:,.0f} MiB) once; "
            f"later loads read {models_dir() / sha}"
        )
    t0 = time.perf_counter()
    root = models_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(_tempdir(root, sha))
    except OSError as e:
        raise ModelLoadError(f"cannot write the model cache {root}: {e.strerror}; set DYNKV_CACHE_DIR") from e
    try:
        _convert(info, tmp)
        _write_json(
            tmp / SOURCE_FILE,
            {
                "gguf": str(info.path.resolve()),
                "sha256": sha,
                "file_size": info.file_size,
                "architecture": info.architecture,
                "name": info.name,
                "quantization": info.quantization,
                "dequantize_seconds": round(time.perf_counter() - t0, 2),
            },
        )
        target = root / sha
        if target.exists():  # another process finished first, or a stale unfinished folder
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except OSError as e:
        raise ModelLoadError(
            f"cannot write the model cache {root}: {e.strerror}; free space or set DYNKV_CACHE_DIR"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target, sha


def _tempdir(root: Path, sha: str) -> str:
    import tempfile

    return tempfile.mkdtemp(prefix=f".{sha[:12]}-", dir=root)


def _convert(info: GGUFInfo, out: Path) -> None:
    """Dequantize with transformers and save config, fp32 safetensors and the tokenizer to ``out``."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(info.path.parent), info.path.name
    try:  # transformers draws its own progress bar on stderr while dequantizing: dynkv's note says it instead
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, NotImplementedError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{info.path}: transformers cannot load this GGUF file: {str(e).splitlines()[0]}") from e
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights below are plain fp32
    type(model.config).from_dict(config).save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
