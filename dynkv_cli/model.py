"""Load a model and tokenizer from a local folder, a GGUF file (or a hub id when online), safely.

Weights only from safetensors or GGUF (dequantized once, see :mod:`ggufmodel`), no
``trust_remote_code`` unless asked, works with ``HF_HUB_OFFLINE=1``. The model runs with dynkv's
registered attention (exact per-layer masks, see :mod:`attention`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from . import attention
from .cache import ModelShape
from .errors import ModelLoadError, UsageError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    name: str
    shape: ModelShape
    max_positions: int
    inv_freq: torch.Tensor  # [rot_dim / 2] RoPE frequencies, for re-rotating kept keys
    gguf: str | None = None  # the GGUF file the weights came from, if any

    @property
    def config(self):
        return self.model.config

    def cache_bytes_per_token(self) -> int:
        """Bytes one document token costs in the compressed cache, all layers and KV heads together."""
        es = torch.empty(0, dtype=self.dtype).element_size()
        return self.shape.num_layers * self.shape.num_kv_heads * (2 * self.shape.head_dim * es + 8 + 4)

    def full_kv_bytes(self, tokens: int) -> int:
        """Bytes a plain (uncompressed) KV cache of ``tokens`` tokens takes (keys and values only)."""
        es = torch.empty(0, dtype=self.dtype).element_size()
        return tokens * self.shape.num_layers * self.shape.num_kv_heads * 2 * self.shape.head_dim * es


def pick_device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UsageError(f"device {device!r} is not a device; use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {device!r} asked for, but no CUDA GPU is available; use --device cpu")
    return dev


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is not one of {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


def model_shape(config, name: str = "", weights: str = "") -> ModelShape:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        config.model_type, config.num_hidden_layers, kv, head_dim, heads, config.vocab_size, name, weights
    )


def folder_weights_id(path: Path) -> str:
    """A cheap identity of a folder's safetensors weights: names, sizes, first and last MiB of each file.

    Two folders with the same architecture but other weights get other ids (so a saved cache made with
    one is refused by the other) without reading gigabytes.
    """
    h = hashlib.sha256()
    for f in sorted(path.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            if size > 2 << 20:
                fh.seek(size - (1 << 20))
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:32]


def rope_inv_freq(model: torch.nn.Module) -> torch.Tensor | None:
    """The model's RoPE frequencies ``[rot_dim / 2]`` (fp32 copy), or None for a model without rotary positions."""
    for buf_name, buf in model.named_buffers():
        if buf_name.endswith("inv_freq"):
            return buf.detach().float().clone()
    return None


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise ModelLoadError(f"{path}: not a folder; point --model at a folder made by save_pretrained")
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"{path} is not a model folder (no config.json, no .gguf file); point --model at a .gguf file or a "
            "folder with config.json, *.safetensors and tokenizer files"
        )
    has_st = any(path.glob("*.safetensors"))
    if not has_st:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise ModelLoadError(
                f"{path} has only pickle weights (.bin/.pt), which dynkv does not load; "
                "convert them to safetensors (save_pretrained(safe_serialization=True))"
            )
        raise ModelLoadError(f"{path} has no *.safetensors weights; save the model with save_pretrained")


def load_model(
    name_or_path: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    note: Callable[[str], None] | None = None,
) -> LoadedModel:
    """Load a decoder-only causal LM with rotary positions and its tokenizer.

    ``name_or_path`` is a folder made by ``save_pretrained``, a ``.gguf`` file (or a folder holding
    exactly one), or a hub id; None is the default model (SmolLM2-135M-Instruct, when installed). A GGUF file is dequantized once and kept as safetensors
    (:func:`ggufmodel.dequantized_folder`); ``note`` is told when that happens.

    Raises :class:`ModelLoadError` with what to do when the folder is not a model, the weights are
    not safetensors or GGUF, the model is not cached while offline, or the architecture is not supported.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from . import catalog, ggufmodel

    if name_or_path is None:
        name_or_path = catalog.default_model_file()
        if name_or_path is None:
            raise ModelLoadError(
                f"the default model ({catalog.DEFAULT_NAME}) is not installed: run `{catalog.INSTALL_DEFAULT}` "
                "or name a model (a .gguf file or a model folder)"
            )
    name = str(name_or_path)
    path = Path(name).expanduser()
    local = path.exists() or name.startswith((".", "/", "~")) or os.sep in name.strip("/") and path.exists()
    gguf_file = None
    if path.is_file():
        if not ggufmodel.is_gguf(path):
            if path.suffix.lower() == ".gguf":
                ggufmodel.inspect_gguf(path)  # raises: says why it is not a GGUF file
            raise ModelLoadError(f"{path} is not a model: give a folder made by save_pretrained or a .gguf model file")
        gguf_file = path
    elif path.is_dir() and not (path / "config.json").is_file():
        gguf_file = ggufmodel.find_gguf(path)
    if gguf_file is not None:
        folder, weights = ggufmodel.dequantized_folder(gguf_file, note)
        if broken_weights(folder) is not None:  # a damaged conversion: made again, once
            folder, weights = _convert_again(gguf_file, folder, note)
        src = str(folder)
    elif path.exists():
        _check_folder(path)
        src = str(path)
        weights = folder_weights_id(path)
    elif name.startswith((".", "/", "~")):
        raise ModelLoadError(f"{name}: no such model folder or GGUF file")
    else:
        src = name  # a hub id
        weights = ""
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - many exception types, one message
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = (
            "it is not a local folder and the hub is offline (HF_HUB_OFFLINE=1)"
            if offline and not local
            else str(e).splitlines()[0]
        )
        raise ModelLoadError(f"cannot load model {name!r}: {hint}; give a local folder made by save_pretrained") from e
    layer_types = getattr(config, "layer_types", None) or []
    if "sliding_attention" in layer_types or (
        config.model_type == "mistral" and getattr(config, "sliding_window", None)
    ):
        raise ModelLoadError(
            f"{name}: sliding-window attention layers are not supported by dynkv (its cache keeps tokens from the "
            "whole document); use a model with full attention in every layer"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ModelLoadError(f"{name}: encoder-decoder models are not supported; use a decoder-only causal LM")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {str(e).splitlines()[0]}") from e
    try:
        model = AutoModelForCausalLM.from_pretrained(
            src,
            dtype=dt,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=attention.ATTN_NAME,
        )
    except Exception as e:  # noqa: BLE001 - a broken weights file raises SafetensorError, OSError, ...
        broken = broken_weights(Path(src)) if Path(src).is_dir() else None
        if broken is not None:
            raise ModelLoadError(damaged_weights(*broken, gguf=gguf_file)) from e
        if isinstance(e, (ValueError, OSError)):
            raise ModelLoadError(f"cannot load model {name!r}: {str(e).splitlines()[0]}") from e
        raise
    model.to(dev).eval()
    inv_freq = rope_inv_freq(model)
    if inv_freq is None:
        raise ModelLoadError(
            f"{name}: model type {config.model_type!r} has no rotary positions; dynkv supports decoder-only "
            "models with RoPE (Llama, Mistral, Qwen2, Qwen3, Phi-3, ...)"
        )
    max_pos = int(getattr(config, "max_position_embeddings", 0) or getattr(tokenizer, "model_max_length", 0) or 2**31)
    shape = model_shape(config, name, weights)
    gguf = str(gguf_file) if gguf_file is not None else None
    return LoadedModel(model, tokenizer, dev, dt, name, shape, max_pos, inv_freq.to(dev), gguf)


def broken_weights(folder: Path) -> tuple[Path, str] | None:
    """The first ``*.safetensors`` file in ``folder`` whose header or size is wrong, and why; None if all open.

    safetensors checks the header and that the file holds every byte its header names (a truncated file
    fails); bytes overwritten inside the tensors are not detected.
    """
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                fh.keys()
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
            return f, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return None


def damaged_weights(path: Path, why: str, gguf: Path | None = None) -> str:
    if gguf is not None:
        return (
            f"{path} is damaged or truncated ({why}) although it was just converted from {gguf}; "
            f"delete {path.parent} and check the disk (free space?) and the GGUF file"
        )
    return f"{path} is damaged or truncated ({why}); download or save the model again"


def _convert_again(gguf_file: Path, folder: Path, note: Callable[[str], None] | None) -> tuple[Path, str]:
    """Delete a damaged dequantized conversion and convert the GGUF file again (once)."""
    import shutil

    from . import ggufmodel

    broken, why = broken_weights(folder)
    try:
        shutil.rmtree(folder)
    except OSError as e:
        raise ModelLoadError(
            f"{broken} is damaged or truncated ({why}) and cannot be deleted ({e.strerror}); delete {folder} "
            f"and run again (it is converted again from {gguf_file})"
        ) from e
    if note:
        note(f"{broken} was damaged or truncated ({why}); deleted {folder}, converting {gguf_file.name} again")
    folder, weights = ggufmodel.dequantized_folder(gguf_file, note)
    again = broken_weights(folder)
    if again is not None:
        raise ModelLoadError(damaged_weights(*again, gguf=gguf_file))
    return folder, weights


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Apply RoPE by ``delta`` positions (rotate-half convention) to keys already rotated once.

    Args:
        keys: ``[1, G, n, d]``; delta: ``[G, n]`` integer position change; inv_freq: ``[r/2]`` (``r <= d``).
    """
    r = inv_freq.numel() * 2
    angle = delta.to(torch.float32)[..., None] * inv_freq.to(keys.device)[None, None, :]  # [G, n, r/2]
    emb = torch.cat([angle, angle], dim=-1)
    cos, sin = emb.cos()[None], emb.sin()[None]
    k = keys.to(torch.float32)
    kr = k[..., :r]
    half = r // 2
    rot_half = torch.cat([-kr[..., half:], kr[..., :half]], dim=-1)
    out = torch.cat([kr * cos + rot_half * sin, k[..., r:]], dim=-1)
    return out.to(keys.dtype)
