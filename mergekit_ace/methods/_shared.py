"""What the methods share: unpacking a mergekit TensorGroup and the non-rule weights."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from mergekit.merge_methods import TensorGroup
from mergekit.merge_methods.base import FunctionalGroupMergeMethod

from mergekit_ace.errors import MergeInputError
from mergekit_ace.execution.cache import cached_execute_rule
from mergekit_ace.rules.checks import check_finite_output, check_inputs, check_parameter, describe
from mergekit_ace.rules.scope import BASE, RULE, weight_scope
from mergekit_ace.rules.task_vectors import average_task_vectors

#: Internal precision of the covariance algebra (docs/methods.md, "Numerics").
COMPUTE_DTYPE = torch.float64


def merge_group(
    group: TensorGroup,
    rule: Callable[..., torch.Tensor],
    rule_name: str,
    *,
    scale: float,
    merge_embeddings: bool,
    scope: str = "default",
    average_from_dim: int = 0,
    scale_name: str = "scale",
    rule_kind: Optional[str] = None,
    **rule_parameters,
) -> torch.Tensor:
    """Apply ``rule`` to a 2-D weight, or the experts' average to anything else.

    Input token embeddings are averaged unless ``merge_embeddings``; ``scope`` (per tensor through
    mergekit's filters) and ``average_from_dim`` override that choice: rules/scope.py
    ``weight_scope``, docs/methods.md "Scope" (``base`` returns the base's values). The result is
    returned in the dtype mergekit handed the inputs in (mergekit casts to its ``out_dtype``
    afterwards). ``scale``
    multiplies the merged task vector of both; the rule takes it as ``scale_name`` ("scale" for
    ace/actmat, "alpha" for the SVD methods, after their papers). The execution layer knows the
    rule as ``rule_kind``, by default ``rule_name`` lower-cased with "-" as "_" (ace, actmat, wudi,
    tsv_m, iso_c, iso_cts; wudi's Adam solver: wudi_adam).
    """
    name: Optional[str] = group.metadata.name
    if group.base is None:
        raise MergeInputError(f"{describe(name)}: {rule_name} requires a base model (set base_model)")
    base = group.base.tensor
    experts = [entry.tensor for entry in group.non_base]
    ids = [entry.id for entry in group.non_base]
    check_inputs(base, experts, name=name, ids=_labels(ids), base_id=_label(group.base.id))
    check_parameter(name, scale_name, scale)
    out_dtype = base.dtype if base.is_floating_point() else torch.float32
    treatment = weight_scope(name, base.shape, scope, merge_embeddings=merge_embeddings,
                             average_from_dim=average_from_dim, vocabulary_axis=group.metadata.vocabulary_axis)
    if treatment == BASE:
        return base.to(out_dtype, copy=True)
    if treatment == RULE:
        # Memory planning, OOM retry and CPU fallback: mergekit_ace.execution (docs/execution.md);
        # with MERGEKIT_ACE_CACHE_DIR set, kept for a rerun after a kill (execution/cache.py).
        # out_dtype also sets the precision contract (docs/execution.md, "Precision").
        merged = cached_execute_rule(
            rule_kind or rule_name.lower().replace("-", "_"),
            rule,
            base,
            experts,
            name=name,
            out_dtype=out_dtype,
            ids=_labels(ids),
            compute_dtype=COMPUTE_DTYPE,
            **{scale_name: scale},
            **rule_parameters,
        )
    else:
        merged = check_finite_output(
            average_task_vectors(base, experts, scale, COMPUTE_DTYPE, out_dtype=out_dtype), name, rule_name
        )
    return merged.to(out_dtype)


def _label(model_id) -> str:
    """A readable name for a mergekit ModelReference (or any other input id)."""
    model = getattr(model_id, "model", None)
    path = getattr(model, "path", None)
    return str(path) if path is not None else str(model_id)


def _labels(ids):
    return [_label(i) for i in ids]


class BaseRequiredMethod(FunctionalGroupMergeMethod):
    """A functional group method whose missing-base error tells the user what to add.

    mergekit checks the input contract while it plans the merge, before any tensor is loaded;
    this only rewrites that check's message."""

    def validate_inputs(self, input_ids, base_id=None, *, group_name=None):
        if base_id is None or base_id not in input_ids:
            raise ValueError(
                f"merge_method {self.spec.name!r} needs a base model: its rule works on task "
                "vectors W_t - W_0. Add `base_model: <path or Hub id>` to the config "
                "(the model the experts were fine-tuned from)."
            )
        super().validate_inputs(input_ids, base_id, group_name=group_name)


def base_required(method) -> BaseRequiredMethod:
    """Rebuild a method made by mergekit's ``merge_method`` decorator as a BaseRequiredMethod."""
    return BaseRequiredMethod(method.spec, method.implementation)
