"""``merge_method: ace`` -- ACE-Merging (Xu et al., CVPR 2026) as a mergekit method."""

import torch
from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup, merge_method

from mergekit_ace.methods._shared import base_required, merge_group
from mergekit_ace.rules.ace import DEFAULTS, ace_merge


@base_required
@merge_method(
    name="ace",
    pretty_name="ACE-Merging",
    reference_url="https://arxiv.org/abs/2603.02945",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def ace(
    group: TensorGroup,
    epsilon: float = DEFAULTS["epsilon"],
    tau: float = DEFAULTS["tau"],
    k_frac: float = DEFAULTS["k_frac"],
    scale: float = DEFAULTS["scale"],
    refinement: str = DEFAULTS["refinement"],
    merge_embeddings: bool = False,
    scope: str = "default",
    average_from_dim: int = 0,
) -> torch.Tensor:
    """ACE on every 2-D weight; the experts' average on the rest and on input embeddings
    (``scope`` / ``average_from_dim`` change which: docs/methods.md, "Scope").
    ``refinement``: ``add`` (Eq. 19 as published), ``rescale`` or ``none`` (rules/ace.py)."""
    return merge_group(
        group,
        ace_merge,
        "ACE",
        scale=scale,
        merge_embeddings=merge_embeddings, scope=scope, average_from_dim=average_from_dim,
        epsilon=epsilon,
        tau=tau,
        k_frac=k_frac,
        refinement=refinement,
    )
