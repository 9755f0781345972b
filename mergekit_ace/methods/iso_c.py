"""``merge_method: iso_c`` -- Iso-C (Marczak et al., ICML 2025) as a mergekit method."""

import torch
from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup, merge_method

from mergekit_ace.methods._shared import base_required, merge_group
from mergekit_ace.rules.iso import iso_c_merge


@base_required
@merge_method(
    name="iso_c",
    pretty_name="Iso-C (isotropic merging in the common subspace)",
    reference_url="https://arxiv.org/abs/2502.04959",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def iso_c(
    group: TensorGroup,
    alpha: float = 1.0,
    merge_embeddings: bool = False,
    scope: str = "default",
    average_from_dim: int = 0,
) -> torch.Tensor:
    """Iso-C on every 2-D weight; the experts' average on the rest and on input embeddings
    (``scope`` / ``average_from_dim`` change which: docs/methods.md, "Scope")."""
    return merge_group(group, iso_c_merge, "Iso-C", scale=alpha, scale_name="alpha",
                       merge_embeddings=merge_embeddings, scope=scope, average_from_dim=average_from_dim)
