"""The merge rules as pure tensor functions, one module per rule (no mergekit glue here)."""

from mergekit_ace.rules.ace import ace_merge
from mergekit_ace.rules.actmat import actmat_merge
from mergekit_ace.rules.common import MergeInputError

__all__ = ["ace_merge", "actmat_merge", "MergeInputError"]
