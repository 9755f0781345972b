"""``merge_method: wudi`` -- WUDI-Merging (Cheng et al., ICML 2025) as a mergekit method."""

from typing import Optional

import torch
from mergekit.merge_methods import BasePolicy, InputContract, TensorGroup, merge_method

from mergekit_ace.methods._shared import base_required, merge_group
from mergekit_ace.rules.wudi import ADAM, ADAM_ITERATIONS, ADAM_LR, wudi_merge


@base_required
@merge_method(
    name="wudi",
    pretty_name="WUDI-Merging",
    reference_url="https://arxiv.org/abs/2503.08099",
    contract=InputContract(base=BasePolicy.REQUIRED, min_non_base=1),
)
def wudi(
    group: TensorGroup,
    scale: float = 1.0,
    solver: str = "closed_form",
    solve: str = "exact",
    rcond: Optional[float] = None,
    lr: float = ADAM_LR,
    iterations: int = ADAM_ITERATIONS,
    merge_embeddings: bool = False,
    scope: str = "default",
    average_from_dim: int = 0,
) -> torch.Tensor:
    """WUDI on every 2-D weight (closed form, or ``solver: adam``, the official optimiser); the
    experts' average on the rest and on input embeddings (``scope`` / ``average_from_dim`` change
    which: docs/methods.md, "Scope")."""
    return merge_group(
        group,
        wudi_merge,
        "WUDI",
        scale=scale,
        merge_embeddings=merge_embeddings,
        scope=scope,
        average_from_dim=average_from_dim,
        rule_kind="wudi_adam" if solver == ADAM else "wudi",
        solver=solver,
        solve=solve,
        rcond=rcond,
        lr=lr,
        iterations=iterations,
    )
