"""Tiny causal language models made locally: a byte-level BPE tokenizer trained in memory and a
Llama or OLMo-3 model built from a config. Used by the tests and the demo; nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

DEFAULT_CORPUS = (
    "the quick brown fox jumps over the lazy dog",
    "12 + 34 = 46. 7 * 8 = 56. def add(a, b): return a + b",
    "Question: what is 2 + 2? Answer: 4",
    "print('hello world') if x > 0 else None",
    "la casa es grande. el perro come. 你好 世界 xin chào",
)


def train_tokenizer(texts: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 320, individual_digits: bool = False):
    """Train a byte-level BPE tokenizer in memory; return a ``PreTrainedTokenizerFast``.

    Special tokens: ``<|bos|>``, ``<|eos|>``, ``<|pad|>``. Byte-level, so any text encodes.
    ``individual_digits`` splits every digit into its own pre-token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if individual_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=2048,
    )


def tiny_config(
    arch: str = "llama",
    vocab_size: int = 320,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 512,
    tie_word_embeddings: bool = False,
):
    """A transformers config for a tiny ``LlamaForCausalLM`` or ``Olmo3ForCausalLM``."""
    from transformers import LlamaConfig, Olmo3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch in ("olmo3", "olmo-3"):
        return Olmo3Config(**common)
    raise ValueError(f"unknown tiny architecture {arch!r}; expected 'llama' or 'olmo3'")


def make_model(config, seed: int = 0):
    """A freshly initialised causal LM (float32) for ``config``, seeded."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    return model.float().eval()


def perturbed_copy(model, seed: int, scale: float = 0.02, skip: Sequence[str] = ()):
    """A copy of ``model`` whose floating parameters get i.i.d. Gaussian updates of std ``scale``
    (an "expert" for merge tests). Names containing any of ``skip`` are left unchanged."""
    import copy

    import torch

    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in out.named_parameters():
            if any(s in name for s in skip):
                continue
            param.add_(torch.randn(param.shape, generator=gen) * scale)
    return out


def save_pretrained(model, tokenizer, path: os.PathLike, dtype: Optional[str] = None) -> Path:
    """Save model (safetensors) and tokenizer to ``path``; return the absolute path."""
    import torch

    path = Path(path).resolve()
    path.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def train_digit_tokenizer(texts: Iterable[str], vocab_size: int = 512):
    """Like :func:`train_tokenizer`, but every digit is its own pre-token, so numbers are never
    merged into multi-digit tokens (tiny models learn arithmetic digit by digit). Used by the demo.
    """
    return train_tokenizer(texts, vocab_size, individual_digits=True)
