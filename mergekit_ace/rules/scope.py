"""Which weights a method's rule applies to (docs/methods.md, "Scope").

A rule merges 2-D weights; input embeddings, weights of other ranks and whatever the ``scope``
parameter says get the experts' average or the base's values instead."""

from __future__ import annotations

import re
from collections.abc import Sequence

from mergekit_ace.errors import MergeInputError
from mergekit_ace.rules.checks import describe

# Input-embedding tensors: their "inputs" are one-hot token indicators, so a covariance proxy over
# the hidden dimension says nothing about them. Output heads (lm_head, embed_out) are ordinary
# linear layers and take the rule.
_OUTPUT_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output|score|classifier)(\.|$)")
_INPUT_EMBEDDING = re.compile(
    r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in|embeddings|embedding|wpe"
    r"|position_embeddings|token_type_embeddings)(\.|$)"
)


def is_input_embedding(name: str | None, vocabulary_axis: int | None = None) -> bool:
    """True for token/position embedding tables (by mergekit's vocabulary metadata or name)."""
    if not name:
        return False
    if _OUTPUT_HEAD.search(name):
        return False
    if vocabulary_axis is not None:
        return True
    return bool(_INPUT_EMBEDDING.search(name))


# --------------------------------------------------------------------------- scope
#: What a weight gets (docs/methods.md, "Scope"): the method's rule, the experts' average
#: ``W_0 + scale * mean_t D_t``, or the base's values unchanged.
RULE, AVERAGE, BASE = "rule", "average", "base"
#: Values of the ``scope`` parameter; ``default`` is the treatment without the parameter.
SCOPES = ("default", RULE, AVERAGE, BASE)


def weight_scope(
    name: str | None,
    shape: Sequence[int],
    scope: str = "default",
    *,
    merge_embeddings: bool = False,
    average_from_dim: int = 0,
    vocabulary_axis: int | None = None,
) -> str:
    """Which of ``rule`` / ``average`` / ``base`` one weight takes.

    ``default``: the rule on 2-D weights except input embeddings (unless ``merge_embeddings``), the
    average on the rest. ``rule``: the rule on a 2-D weight (input embeddings included), the
    average on a weight of another rank (the rules are defined on matrices). ``average`` and
    ``base`` are taken as written. Afterwards a weight bound for the rule with any dimension
    ``>= average_from_dim`` (when that is > 0) is averaged instead: ACTMat's code scope,
    ``max(shape) < 20000`` for the rule (docs/methods.md, "Scope")."""
    if not isinstance(scope, str) or scope not in SCOPES:
        raise MergeInputError(
            f"{describe(name)}: parameter scope={scope!r} must be one of {', '.join(SCOPES)}"
        )
    if isinstance(average_from_dim, bool) or int(average_from_dim) != average_from_dim or average_from_dim < 0:
        raise MergeInputError(
            f"{describe(name)}: parameter average_from_dim={average_from_dim!r} must be an integer >= 0 "
            "(0 = off)"
        )
    if scope in (AVERAGE, BASE):
        return scope
    matrix = len(shape) == 2
    if scope == RULE:
        takes_rule = matrix
    else:
        takes_rule = matrix and (merge_embeddings or not is_input_embedding(name, vocabulary_axis))
    if takes_rule and average_from_dim > 0 and max(int(d) for d in shape) >= average_from_dim:
        takes_rule = False
    return RULE if takes_rule else AVERAGE
