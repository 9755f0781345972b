"""``merge_method: actmat`` -- ACTMat (Abdel Hameed et al.) as a mergekit method."""

from typing import Optional

import torch
from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup, merge_method

from mergekit_ace.methods._shared import base_required, merge_group
from mergekit_ace.rules.actmat import DEFAULTS, actmat_merge


@base_required
@merge_method(
    name="actmat",
    pretty_name="ACTMat",
    reference_url="https://arxiv.org/abs/2604.01329",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def actmat(
    group: TensorGroup,
    scale: float = DEFAULTS["scale"],
    keep_base: bool = DEFAULTS["keep_base"],
    rcond: Optional[float] = DEFAULTS["rcond"],
    solve: str = DEFAULTS["solve"],
    merge_embeddings: bool = False,
    scope: str = "default",
    average_from_dim: int = 0,
) -> torch.Tensor:
    """ACTMat on every 2-D weight; the experts' average on the rest and on input embeddings
    (``scope`` / ``average_from_dim`` change which: docs/methods.md, "Scope")."""
    return merge_group(
        group,
        actmat_merge,
        "ACTMat",
        scale=scale,
        merge_embeddings=merge_embeddings, scope=scope, average_from_dim=average_from_dim,
        keep_base=keep_base,
        rcond=rcond,
        solve=solve,
    )
