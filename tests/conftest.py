"""Shared fixtures: tiny local models (tokenizer trained in memory, weights from a config)."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BIN = Path(sys.executable).parent


def build_family(root: Path, arch: str, scales=(0.01, 0.03, 0.1), tie=False, skip=()):
    """Save a tiny base and one perturbed expert per scale under root; return absolute paths."""
    from mergekit_ace.fixtures.toymodels import (
        make_model,
        perturbed_copy,
        save_pretrained,
        tiny_config,
        train_tokenizer,
    )

    tok = train_tokenizer()
    base = make_model(tiny_config(arch, tie_word_embeddings=tie), seed=0)
    paths = {"base": save_pretrained(base, tok, root / "base")}
    for i, s in enumerate(scales):
        expert = perturbed_copy(base, seed=i + 1, scale=s, skip=skip)
        paths[f"expert{i}"] = save_pretrained(expert, tok, root / f"expert{i}")
    return paths


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def olmo_family(tmp_path_factory):
    return build_family(tmp_path_factory.mktemp("olmo3"), "olmo3")


@pytest.fixture(scope="session")
def small_demo_cache(tmp_path_factory):
    """A cache directory holding the demo's ``small`` models (trained once per session, on first
    use; ``mergekit-ace demo --cache`` and ``ensure_trained`` reuse it)."""
    from mergekit_ace.demo.train import CONFIGS, ensure_trained

    cache = tmp_path_factory.mktemp("demo-cache")
    ensure_trained(CONFIGS["small"], cache, log=lambda message: None)
    return cache
