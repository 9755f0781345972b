"""``merge_method: tsv_m`` -- TSV-M (Gargiulo et al., CVPR 2025) as a mergekit method."""

from typing import Optional

import torch
from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup, merge_method

from mergekit_ace.methods._shared import base_required, merge_group
from mergekit_ace.rules.tsv_m import tsv_m_merge


@base_required
@merge_method(
    name="tsv_m",
    pretty_name="TSV-M (Task Singular Vectors: Merge)",
    reference_url="https://arxiv.org/abs/2412.00081",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def tsv_m(
    group: TensorGroup,
    alpha: float = 1.0,
    sv_reduction: Optional[float] = None,
    merge_embeddings: bool = False,
    scope: str = "default",
    average_from_dim: int = 0,
) -> torch.Tensor:
    """TSV-M on every 2-D weight; the experts' average on the rest and on input embeddings
    (``scope`` / ``average_from_dim`` change which: docs/methods.md, "Scope")."""
    return merge_group(
        group,
        tsv_m_merge,
        "TSV-M",
        scale=alpha,
        scale_name="alpha",
        merge_embeddings=merge_embeddings, scope=scope, average_from_dim=average_from_dim,
        sv_reduction=sv_reduction,
    )
