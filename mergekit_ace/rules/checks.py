"""Input checks shared by the rules: what a merge refuses, and how it names the culprit.

Every check raises :class:`mergekit_ace.errors.MergeInputError` naming the tensor (and the expert
or parameter); nothing here copies or modifies its inputs."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import torch

from mergekit_ace.errors import MergeInputError


def describe(name: str | None) -> str:
    return repr(name) if name else "<unnamed tensor>"


def check_inputs(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    name: str | None = None,
    ids: Sequence[Hashable] | None = None,
    base_id: Hashable | None = None,
    matrix_rule: str | None = None,
) -> None:
    """Raise :class:`MergeInputError` unless base and experts are finite, same-shaped tensors and
    there is at least one expert (and, when ``matrix_rule`` names a rule, the weight is 2-D).
    Nothing is copied or modified."""
    where = describe(name)
    if base is None:
        raise MergeInputError(f"{where}: this rule needs a base model (task vectors are W_t - W_0)")
    if len(experts) == 0:
        raise MergeInputError(f"{where}: at least one expert (non-base model) is required")
    if matrix_rule is not None and base.ndim != 2:
        raise MergeInputError(f"{where}: {matrix_rule}'s rule applies to 2-D weights, got {tuple(base.shape)}")
    ids = list(ids) if ids is not None else [f"expert {i}" for i in range(len(experts))]
    base_label = base_id if base_id is not None else "base"
    for label, tensor in [(base_label, base), *zip(ids, experts)]:
        if tensor.shape != base.shape:
            raise MergeInputError(
                f"{where}: shape mismatch: model {label} has {tuple(tensor.shape)}, "
                f"base has {tuple(base.shape)}"
            )
        if tensor.is_floating_point() and not is_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            raise MergeInputError(
                f"{where}: model {label} has {bad} non-finite value(s) (NaN or Inf); "
                "refusing to merge it"
            )


def is_finite(tensor: torch.Tensor) -> bool:
    """Whether every element is finite. ``aminmax`` propagates NaN and shows infinities, and is
    ~30x faster than ``isfinite(...).all()`` on bfloat16 CPU tensors (measured)."""
    if tensor.numel() == 0:
        return True
    lo, hi = torch.aminmax(tensor)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_finite_output(result: torch.Tensor, name: str | None, rule: str) -> torch.Tensor:
    if not is_finite(result):
        raise MergeInputError(
            f"{describe(name)}: the {rule} rule produced non-finite values; the inputs are "
            "numerically degenerate for this weight (check the experts' updates and epsilon)"
        )
    return result



def check_nonzero_task_vectors(
    traces: Sequence[float], name: str | None, ids: Sequence[Hashable] | None = None
) -> None:
    """The rules divide by (or regress on) each expert's update: an all-zero update cannot take
    part. Raise naming the tensor and the expert."""
    ids = list(ids) if ids is not None else [f"expert {i}" for i in range(len(traces))]
    zero = [str(i) for i, tr in zip(ids, traces) if tr == 0.0]
    if zero:
        raise MergeInputError(
            f"{describe(name)}: expert(s) {', '.join(zero)} are identical to the base for this "
            "weight (zero task vector), so the covariance rule cannot use them; drop that expert "
            "or merge this weight with another method"
        )


def check_parameter(name: str | None, parameter: str, value, *, low=None, high=None) -> None:
    """Refuse a parameter outside its range (or not finite), naming it and the tensor."""
    v = float(value)
    if not math.isfinite(v) or (low is not None and v < low) or (high is not None and v > high):
        bounds = f"in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise MergeInputError(f"{describe(name)}: parameter {parameter}={value!r} must be finite and {bounds}")
