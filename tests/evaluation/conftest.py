"""Fixtures for the lm-eval wrapper tests: offline environment, fixture data, tiny models."""

import os
import sys
import tempfile
from pathlib import Path

# Offline, before datasets/huggingface_hub read their configuration at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_CACHE = Path(tempfile.mkdtemp(prefix="mergekit-ace-eval-tests-"))
os.environ.setdefault("HF_DATASETS_CACHE", str(_CACHE / "datasets"))
os.environ.setdefault("MERGEKIT_ACE_NLTK_DATA", str(_CACHE / "nltk_data"))

import pytest  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE / "data"
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))  # for `import standin`



@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE tokenizer, saved as a HF model directory."""
    from mergekit_ace.fixtures import toymodels

    tokenizer = toymodels.train_tokenizer()
    config = toymodels.tiny_config("llama", max_position_embeddings=2048)
    model = toymodels.make_model(config, seed=0)
    return toymodels.save_pretrained(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def standins(tmp_path_factory):
    """``{mode: directory}`` for the stand-in lm-eval model (see standin.py)."""
    import standin  # registers "mergekit-ace-standin" with lm-eval

    root = tmp_path_factory.mktemp("standins")
    return {m: standin.make_standin(root / m, m) for m in ("oracle", "wrong", "loop", "even", "crash")}


@pytest.fixture
def subprocess_env():
    """Environment for `python -m mergekit_ace.cli`: this checkout first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env
