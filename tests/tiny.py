"""Tiny random models with a locally trained tokenizer, saved to and loaded from a folder (never downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = (
    "the a of and to in is was for on that with as by at from report lease repair tenant owner year month "
    "river stone cloud paper window garden market letter number answer question document summary key value"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS) for _ in range(12)) + f" {rnd.randint(0, 9999)}." for _ in range(n)]


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def make_config(arch: str, max_pos: int = 2048, layers: int = 4, vocab: int = 400):
    from transformers import LlamaConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        initializer_range=0.3,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=16, use_sliding_window=False)
    if arch == "phi3":
        common.pop("tie_word_embeddings")
        return Phi3Config(**common, original_max_position_embeddings=max_pos)
    raise ValueError(arch)


def make_model(path: Path, arch: str = "llama", max_pos: int = 2048, layers: int = 4, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    tok = make_tokenizer()
    config = make_config(arch, max_pos=max_pos, layers=layers, vocab=len(tok))
    model = AutoModelForCausalLM.from_config(config)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def text_of(n_words: int, seed: int = 1) -> str:
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) if i % 9 else str(rnd.randint(0, 999)) for i in range(n_words))
