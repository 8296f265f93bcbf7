"""Random-weight models for speed benchmarks, built from config presets (nothing is downloaded).

Presets are Llama-shaped configs: ``tiny`` (tests), ``mid`` (a CPU-sized model that reads 8k tokens in
minutes), ``1b`` (Llama-3.2-1B shape), ``8b`` (Llama-3-8B shape). A path to a ``config.json`` or to a
model folder holding one is accepted too; only its config is read, the weights are random.

Weights are allocated without the (slow) default initialisation and then filled with a seeded normal
draw (norm weights with ones), so the same preset, seed, dtype and device always give the same model.
Speed does not depend on weight values; the draw only has to keep activations finite.

The model has no end-of-sequence token, so every decode runs its full number of tokens, and
``max_position_embeddings`` is raised to 2M positions so a 1M-token document never needs compact
positions (which would add work the full-KV reference does not do).
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from dynkv_cli.model import LoadedModel, model_shape, rope_inv_freq

#: Position limit given to every preset (and to configs read from disk), see the module docstring.
MAX_POSITIONS = 1 << 21

PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        rope_theta=10000.0,
    ),
    # ~43M parameters (17M of them in embedding and head); Llama-3 proportions: GQA 4, head dim 64.
    "mid": dict(
        hidden_size=512,
        intermediate_size=1792,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=16384,
        rope_theta=500000.0,
    ),
    # Llama-3.2-1B: 16 layers, hidden 2048, 32 heads, 8 KV heads, head dim 64, tied embeddings.
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
    ),
    # Llama-3-8B: 32 layers, hidden 4096, 32 heads, 8 KV heads, head dim 128.
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        rope_theta=500000.0,
    ),
}

#: Standard deviation of the random weights per preset (tiny: large, so greedy tokens have clear winners).
INIT_STD = {"tiny": 0.3}
DEFAULT_STD = 0.02


class SpeedTokenizer:
    """A stand-in tokenizer: each whitespace-separated word maps to one id (CRC32 mod vocab), deterministically.

    Speed runs feed token ids for the document; the engine only needs a tokenizer for the short prompt
    text around it (question / probe). No BOS, no EOS, no chat template.
    """

    bos_token_id = None
    eos_token_id = None
    pad_token_id = None
    chat_template = None

    def __init__(self, vocab_size: int):
        self.vocab_size = int(vocab_size)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [zlib.crc32(w.encode()) % self.vocab_size for w in text.split()]

    def __call__(self, text: str, add_special_tokens: bool = False, **kwargs) -> dict:
        return {"input_ids": self.encode(text)}

    def decode(self, ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return " ".join(f"<{int(i)}>" for i in ids)


@dataclass
class PresetInfo:
    """What was built: preset name (or config path), parameter count, weight bytes."""

    name: str
    params: int
    weight_bytes: int
    config: dict


def preset_config(preset: str, vocab_size: int | None = None):
    """A transformers config for ``preset`` (a preset name, a ``config.json`` or a model folder)."""
    from transformers import AutoConfig, LlamaConfig

    if preset in PRESETS:
        kw = dict(PRESETS[preset])
        config = LlamaConfig(
            **kw,
            max_position_embeddings=MAX_POSITIONS,
            bos_token_id=None,
            eos_token_id=None,
            pad_token_id=None,
        )
    else:
        path = Path(preset).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"{preset!r} is not a preset ({', '.join(PRESETS)}) nor a config.json / model folder with one"
            )
        data = json.loads(path.read_text())
        config = AutoConfig.for_model(**data)
        config.max_position_embeddings = max(int(getattr(config, "max_position_embeddings", 0) or 0), MAX_POSITIONS)
        config.eos_token_id = None
        config.bos_token_id = None
    if vocab_size:
        config.vocab_size = int(vocab_size)
    config.use_cache = True
    return config


def _fill_random(model: torch.nn.Module, std: float, seed: int, device: torch.device) -> None:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if "norm" in name:
                    p.fill_(1.0)
                else:
                    p.zero_()
            else:
                p.normal_(0.0, std, generator=gen)


def build_model(
    preset: str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "dynkv",
    seed: int = 0,
    vocab_size: int | None = None,
) -> tuple[LoadedModel, PresetInfo]:
    """Build a random-weight model for ``preset`` on ``device`` and wrap it as the engine's ``LoadedModel``.

    ``attn_implementation``: ``"dynkv"`` for the engine, ``"sdpa"`` for the plain reference (the same
    weights either way; switch later with ``model.set_attn_implementation``).
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from dynkv_cli import attention  # registers the "dynkv" attention function

    dev = torch.device(device)
    config = preset_config(preset, vocab_size)
    if attn_implementation == "dynkv":
        attn_implementation = attention.ATTN_NAME
    with torch.device(dev), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # skipped with the default initialisation
    _fill_random(model, INIT_STD.get(preset, DEFAULT_STD), seed, dev)
    model.eval()
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = None
        model.generation_config.bos_token_id = None
        model.generation_config.pad_token_id = None
    inv_freq = rope_inv_freq(model)
    if inv_freq is None:
        raise ValueError(f"{preset}: model type {config.model_type!r} has no rotary positions")
    name = f"random:{preset}"
    lm = LoadedModel(
        model,
        SpeedTokenizer(config.vocab_size),
        dev,
        dtype,
        name,
        model_shape(config, name),
        int(config.max_position_embeddings),
        inv_freq.to(dev),
    )
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    keys = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "model_type",
    )
    cfg = {k: getattr(config, k, None) for k in keys}
    cfg["head_dim"] = lm.shape.head_dim
    return lm, PresetInfo(preset, params, weight_bytes, cfg)


def linear_params(lm: LoadedModel) -> tuple[int, int]:
    """(parameters in the decoder layers' matrices, parameters in the output head) for FLOP counts."""
    body = 0
    for name, p in lm.model.named_parameters():
        if p.dim() == 2 and ".layers." in name:
            body += p.numel()
    head = lm.model.get_output_embeddings().weight.numel()
    return body, head
