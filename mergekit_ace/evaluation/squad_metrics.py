"""SQuAD exact match and F1, for lm-eval tasks that import them from transformers.

lm-eval 0.4.13's ``xquad`` task (and a few others) does
``import transformers.data.metrics.squad_metrics``; transformers 5 removed that module. These are
the same functions (the official SQuAD v2.0 evaluation script's normalisation, token-overlap F1
and exact match, as transformers 4 shipped them); :func:`install` registers this module under
the old name when transformers lacks it, so the stock task scores unchanged.
"""

from __future__ import annotations

import collections
import importlib
import re
import string
import sys
import types

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = frozenset(string.punctuation)
LEGACY_NAME = "transformers.data.metrics.squad_metrics"


def normalize_answer(s: str) -> str:
    """Lower case, remove punctuation, articles and extra whitespace."""
    text = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def get_tokens(s: str) -> list[str]:
    if not s:
        return []
    return normalize_answer(s).split()


def compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = get_tokens(a_gold)
    pred_toks = get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def install() -> bool:
    """Make ``import transformers.data.metrics.squad_metrics`` work; True if a shim was added."""
    try:
        importlib.import_module(LEGACY_NAME)
        return False
    except ImportError:
        pass
    import transformers.data as data_pkg

    parent = sys.modules.get("transformers.data.metrics")
    if parent is None:
        parent = types.ModuleType("transformers.data.metrics")
        parent.__path__ = []  # a package, so the submodule import resolves
        sys.modules["transformers.data.metrics"] = parent
        data_pkg.metrics = parent
    module = sys.modules[__name__]
    sys.modules[LEGACY_NAME] = module
    parent.squad_metrics = module
    return True
