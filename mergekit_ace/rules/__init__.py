"""The merge rules as pure tensor functions, one module per rule (no mergekit glue here)."""

from mergekit_ace.errors import MergeInputError
from mergekit_ace.rules.ace import ace_merge
from mergekit_ace.rules.actmat import actmat_merge
from mergekit_ace.rules.iso import iso_c_merge, iso_cts_merge
from mergekit_ace.rules.tsv_m import tsv_m_merge
from mergekit_ace.rules.wudi import wudi_merge

__all__ = ["ace_merge", "actmat_merge", "tsv_m_merge", "iso_c_merge", "iso_cts_merge", "wudi_merge", "MergeInputError"]
