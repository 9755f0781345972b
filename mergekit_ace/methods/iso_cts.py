"""``merge_method: iso_cts`` -- Iso-CTS (Marczak et al., ICML 2025) as a mergekit method."""

import torch
from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup, merge_method

from mergekit_ace.methods._shared import base_required, merge_group
from mergekit_ace.rules.iso import iso_cts_merge


@base_required
@merge_method(
    name="iso_cts",
    pretty_name="Iso-CTS (isotropic merging in common and task-specific subspaces)",
    reference_url="https://arxiv.org/abs/2502.04959",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def iso_cts(
    group: TensorGroup,
    alpha: float = 1.0,
    common_space_fraction: float = 0.8,
    merge_embeddings: bool = False,
    scope: str = "default",
    average_from_dim: int = 0,
) -> torch.Tensor:
    """Iso-CTS on every 2-D weight; the experts' average on the rest and on input embeddings
    (``scope`` / ``average_from_dim`` change which: docs/methods.md, "Scope")."""
    return merge_group(group, iso_cts_merge, "Iso-CTS", scale=alpha, scale_name="alpha",
                       merge_embeddings=merge_embeddings, scope=scope, average_from_dim=average_from_dim,
                       common_space_fraction=common_space_fraction)
