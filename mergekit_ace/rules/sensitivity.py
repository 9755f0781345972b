"""How far a merge's exact result moves when its inputs move by their storage rounding.

A checkpoint stored in bfloat16 is the fine-tuned weight rounded to 8 significant bits. The exact
(float64) merge of those stored inputs differs from the exact merge of the weights before their
rounding, and no precision of the merge's own arithmetic can remove that difference. This module
measures it, per weight, in units the user knows: the rounding error of storing the merged weight
itself (``docs/methods.md``, "Sensitivity to the checkpoints' rounding").

Rounding model (round to nearest, the error uniform within half a unit in the last place):

    half_ulp(x) = u * 2^floor(log2 |x|)        (u * smallest normal below it; 0 for x = 0)
    rounding error of x ~ half_ulp(x) * U(-1, 1),   u = 2^-8 bf16, 2^-11 fp16, 2^-24 fp32, 2^-53 fp64

so the expected rounding error of storing W in a format with unit roundoff u_out is

    rho_out(W) = sqrt( sum_ij half_ulp_out(W_ij)^2 / 3 )

(for weights with log-uniformly spread significands this is about 0.42 u_out ||W||_F; the cruder
``u_out ||W||_F / sqrt 3`` overstates it by ~1.36x, so the element-wise sum is used).

Sensitivity of a rule at inputs X = (W_0, W_1..W_T):

    kappa_store = E_E || merge(X + E) - merge(X) ||_F / rho_out(merge(X))

with E the inputs' own rounding statistics (each element of each input moved by
half_ulp_in(x) * U(-1, 1) of its storage dtype). A value of 10 means the exact answer is fixed
by the inputs the user has only to ~10x its own storage rounding. It is estimated by ``samples``
random rounding-like perturbations of the stored inputs, each merged exactly (float64 inputs,
float64 products) by the rule's own code, and the change norms averaged. To first order the
change is linear in E, so a random E of the rounding's statistics moves the result by as much as
the real rounding did; at the full rounding size the finite difference also keeps the
second-order terms (e.g. the noise's own Gram ``E^T E`` in a covariance) that a linearisation
would drop. ``tests/test_sensitivity.py`` checks the estimate, which sees only the rounded
inputs, against the truth: the float64 merge of the unrounded inputs against that of the
rounded ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mergekit_ace.rules import precision

#: The floating formats with a rounding model here.
STORAGE_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)

DEFAULT_SAMPLES = 2
#: Elements per block of rows in the element-wise passes (32 MiB of float64 temporaries).
BLOCK_ELEMENTS = 1 << 22

DTypeLike = torch.dtype | str | None


def resolve_dtype(dtype: DTypeLike, what: str = "dtype") -> torch.dtype:
    """A floating torch dtype from a dtype or its name ("bfloat16", "float16", "float32", "float64")."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if dtype not in STORAGE_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in STORAGE_DTYPES)
        raise ValueError(f"{what} must be one of {names}, got {dtype!r}")
    return dtype


def unit_roundoff(dtype: DTypeLike) -> float:
    """``u`` of a storage format: 2^-8 (bfloat16), 2^-11 (float16), 2^-24 (float32), 2^-53 (float64)."""
    return precision.unit_roundoff(resolve_dtype(dtype))


def half_ulp(x: torch.Tensor, dtype: DTypeLike) -> torch.Tensor:
    """Largest rounding error of each element of ``x`` stored in ``dtype`` (float64):
    u 2^floor(log_2|x|), with the subnormal spacing below the smallest normal
    number and 0 where x = 0 (an exact zero stays zero)."""
    dtype = resolve_dtype(dtype)
    u = precision.unit_roundoff(dtype)
    a = x.detach().double().abs()
    _, exponent = torch.frexp(a)  # a = m 2^e, m in [0.5, 1): 2^floor(log2 a) = 2^(e - 1)
    scale = torch.ldexp(torch.ones_like(a), exponent - 1)
    scale = scale.clamp_min(torch.finfo(dtype).smallest_normal)
    return torch.where(a > 0, u * scale, torch.zeros_like(a))


def _row_blocks(x: torch.Tensor):
    rows = x.shape[0] if x.ndim else 1
    step = max(1, BLOCK_ELEMENTS // max(1, x[0].numel() if x.ndim else 1))
    for start in range(0, rows, step):
        yield slice(start, min(rows, start + step))


def expected_rounding_error(W: torch.Tensor, dtype: DTypeLike) -> float:
    """rho(W) = sqrt sum_ij half_ulp(W_ij)^2 / 3: the expected Frobenius
    norm of ``W.to(dtype) - W`` when each element's error is uniform within half an ulp."""
    if W.ndim == 0:
        return float(half_ulp(W, dtype)) / math.sqrt(3.0)
    total = sum(float(half_ulp(W[rows], dtype).square().sum()) for rows in _row_blocks(W))
    return math.sqrt(total / 3.0)


def rounding_perturbation(x: torch.Tensor, dtype: DTypeLike, generator: torch.Generator) -> torch.Tensor:
    """A random perturbation with the statistics of storing ``x`` in ``dtype``:
    E_ij = half_ulp(x_ij) U(-1, 1) (float64, independent elements)."""
    h = half_ulp(x, dtype)
    noise = torch.rand(h.shape, generator=generator, dtype=torch.float64, device=h.device)
    return h.mul_(noise.mul_(2.0).sub_(1.0))


def perturbed_copy(x: torch.Tensor, dtype: DTypeLike, generator: torch.Generator) -> torch.Tensor:
    """x + E, E from :func:`rounding_perturbation`, one block of rows at a time. Held in
    float32 where the storage format has at most 11 significant bits (bf16, fp16: float32 keeps
    the perturbation to 2^-13 of its size, at half the memory of float64), else float64."""
    dtype = resolve_dtype(dtype)
    hold = torch.float32 if precision.unit_roundoff(dtype) >= 2.0 ** -11 else torch.float64
    out = torch.empty(x.shape, dtype=hold, device=x.device)
    if x.ndim == 0:
        return out.copy_(x.double() + rounding_perturbation(x, dtype, generator))
    for rows in _row_blocks(x):
        out[rows] = x[rows].double() + rounding_perturbation(x[rows], dtype, generator)
    return out


@dataclass
class StorageSensitivity:
    """Result of :func:`storage_sensitivity`.

    ``value`` = mean of ``changes`` / ``output_rounding``; ``changes`` = the Frobenius norm of the
    merged weight's move under each sampled perturbation; ``output_rounding`` = rho_out of the
    unperturbed float64 merge; ``merged_norm`` = its Frobenius norm."""

    value: float
    changes: list[float] = field(default_factory=list)
    output_rounding: float = 0.0
    merged_norm: float = 0.0
    input_dtypes: list[str] = field(default_factory=list)
    output_dtype: str = ""


def storage_sensitivity(
    rule: Callable[..., torch.Tensor],
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    input_dtype: DTypeLike = None,
    output_dtype: DTypeLike = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    merged: torch.Tensor | None = None,
    **rule_params,
) -> StorageSensitivity:
    """Estimate kappa_store = E||merge(X+E) - merge(X)||_F / rho_out(merge(X)) (module
    docstring) for one weight.

    ``rule(base, experts, **rule_params)`` is a public rule function (``ace_merge``,
    ``actmat_merge``, ``tsv_m_merge``, ``iso_c_merge``, ...); it is called with
    ``compute_dtype=torch.float64`` (and, where the caller passes none, products in float64), so
    that what is measured is the inputs' rounding, not the computation's. The perturbed inputs
    are held in float32 for bf16/fp16 storage (:func:`perturbed_copy`), else in float64.
    ``input_dtype``: the storage format of the inputs (None: each tensor's own dtype);
    ``output_dtype``: the format the merged weight is stored in (None: the base's dtype). ``merged``: the float64
    merge of the unperturbed inputs with the same rule and parameters, if the caller has it (saves one merge).
    ``samples`` perturbations, drawn from ``seed``; inputs are never modified.
    """
    if not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if rule_params.get("compute_dtype", torch.float64) != torch.float64:
        raise ValueError("storage_sensitivity merges in float64: leave compute_dtype out")
    if rule_params.get("matmul_dtype") not in (None, torch.float64, "float64"):
        raise ValueError("storage_sensitivity needs float64 products: leave matmul_dtype out")
    rule_params["compute_dtype"] = torch.float64
    tensors = [base, *experts]
    in_dtypes = [resolve_dtype(input_dtype, "input_dtype") if input_dtype is not None
                 else resolve_dtype(t.dtype, "the input's dtype") for t in tensors]
    out_dtype = resolve_dtype(output_dtype if output_dtype is not None else base.dtype, "output_dtype")
    if merged is None:
        merged = rule(base, list(experts), **rule_params)
    merged = merged.double()
    rho = expected_rounding_error(merged, out_dtype)
    changes: list[float] = []
    for s in range(samples):
        g = torch.Generator(device=base.device).manual_seed(seed * 1000003 + s)
        moved = [perturbed_copy(x.detach(), d, g) for x, d in zip(tensors, in_dtypes)]
        result = rule(moved[0], moved[1:], **rule_params)
        del moved
        changes.append(float(torch.linalg.vector_norm(result.double().sub_(merged))))
        del result
    mean = sum(changes) / len(changes)
    value = mean / rho if rho > 0 else (0.0 if mean == 0 else math.inf)
    return StorageSensitivity(
        value=value, changes=changes, output_rounding=rho, merged_norm=float(torch.linalg.vector_norm(merged)),
        input_dtypes=[_name(d) for d in in_dtypes], output_dtype=_name(out_dtype),
    )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
