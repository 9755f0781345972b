"""Iso-C and Iso-CTS (isotropic merging), one weight matrix at a time.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, "No Task Left Behind: Isotropic
Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv:2502.04959; authors' code
https://github.com/danielm1405/iso-merging (``src/utils/iso.py``: ``iso_c``, ``iso_cts``; the same
functions are ported to fusion-bench, ``fusion_bench/method/isotropic_merging/iso_utils.py``).
Task vectors D_t = W_t - W_0 (d_out x d_in, rows are outputs), r = min(d_out, d_in).

**Iso-C** (isotropic merging in the common subspace)

1. task arithmetic          Delta = sum_t D_t = U S V^T
2. isotropic spectrum       sigmabar = (1/r) sum_i sigma_i (the mean over all r values)
3. merge                    W = W_0 + alpha sigmabar U V^T

**Iso-CTS** (common and task-specific subspaces)

1. common subspace          the top k triplets (U_c, S_c, V_c) of Delta,
                            k from ``common_space_fraction`` (default 0.8), adjusted so
                            that r - k splits evenly over the T tasks
                            (:func:`common_space_size`)
2. task-specific subspaces  Dbar_t = D_t - U_cU_c^T D_t (the common subspace projected
                            out of the output side); its top s = (r-k)/T triplets
                            (u_t, s_t, v_t)
3. orthogonalisation        U_perp = polar([U_c, u_1 ... u_T]),
                            V_perp = polar([V_c, v_1 ... v_T])
4. isotropic spectrum       sigmabar = the mean of the r values S_c, s_1 ... s_T
5. merge                    W = W_0 + alpha sigmabar U_perp V_perp^T

Weights that are not 2-D and input embeddings get W_0 + alpha mean_t D_t
(``methods/_shared.py``; the authors' code averages every non-matrix parameter the same way).

Paper and code. The code the paper's numbers come from (``danielm1405/iso-merging``) sums the
task vectors (``new_vector *= len(tvs)`` after the mean); a port in the TSV repository
(``AntoAndGar/task_singular_vectors``, ``compute_iso_c_task_vector``) decomposes their *mean*,
which makes sigmabar T times smaller (the same as alpha/T): this follows the sum. The common-subspace size is
the code's, ``int(r * fraction)`` then rounded so that the task-specific part divides by T
(Python's ``round``); where that rounding would need more than r dimensions the per-task size is
rounded down instead (the code would slice with a negative index). Alpha: the authors select it
on validation data (their ``config/config.yaml``: ``specify_lambda: None``, a 31-point search
with early stopping); there is no data-free value, and 1.0 is fusion-bench's default and this
package's. As in :mod:`.tsv_m`, directions with a zero singular value (rank-deficient
Delta or Dbar_t) are left out instead of keeping LAPACK's arbitrary null-space
vectors; sigmabar still divides by r, as the code's ``S.mean()`` does.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from mergekit_ace.rules.checks import check_inputs, check_parameter
from mergekit_ace.rules.linalg import row_chunks
from mergekit_ace.rules.spectral import (
    AUTO,
    RANK_RTOL,
    Triplets,
    check_route,
    polar_factor_,
    run_svd_rule,
    settle_svd_budget,
    top_singular_triplets,
)
from mergekit_ace.rules.task_vectors import (
    SVD_STRATEGIES,
    WHOLE_MATRIX,
    TaskVectors,
    check_strategy,
    task_vector,
)

DEFAULTS_C = dict(alpha=1.0)
DEFAULTS_CTS = dict(alpha=1.0, common_space_fraction=0.8)


# --------------------------------------------------------------------------- shared steps
def task_arithmetic_sum(base: torch.Tensor, experts: Sequence[torch.Tensor], dtype: torch.dtype,
                        row_chunk: int | None = None) -> torch.Tensor:
    """Delta = sum_t D_t (a new d_out x d_in tensor in ``dtype``)."""
    tv = TaskVectors(base, experts, dtype, row_chunk)
    out = torch.empty(base.shape, dtype=dtype, device=base.device)
    for rows in tv.chunks():
        out[rows] = tv.weighted_sum(rows, [1.0] * len(experts), dtype)
    return out


def isotropic_value(singular_values: torch.Tensor, r: int) -> float:
    """sigmabar = (1/r) sum_i sigma_i: the mean over all r = min(d_out, d_in) singular
    values (those left out as zero count as zero, as in the code's ``S.mean()``)."""
    return float(singular_values.sum()) / r if r > 0 else 0.0


def _isotropic_merge(base, P_left, right, sigma_bar, alpha, dt, row_chunk):
    """W_0 + alpha sigmabar P_left * right one row block at a time (``right`` is
    None when ``P_left`` already is the whole product, as in Iso-C)."""
    d_out, d_in = base.shape
    W = torch.empty(d_out, d_in, dtype=dt, device=base.device)
    factor = alpha * sigma_bar
    for rows in row_chunks(d_out, row_chunk):
        block = P_left[rows] @ right if right is not None else P_left[rows].clone()
        block *= factor
        block += base[rows]
        W[rows] = block
    return W


# --------------------------------------------------------------------------- Iso-C
@dataclass
class IsoDiagnostics:
    sigma_bar: float
    #: Iso-CTS: size k of the common subspace and s per task (Iso-C: k = r, s = 0)
    common_size: int
    per_task: int
    #: directions kept (r unless a matrix is rank-deficient)
    rank: int
    #: route of each decomposition ("gram" or "svd")
    routes: list[str] = field(default_factory=list)
    #: the dtype the decompositions ran in ("float32" where the precision contract allowed it)
    precision: str = "float64"


def iso_c_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    alpha: float = DEFAULTS_C["alpha"],
    name: str | None = None,
    ids: Sequence[Hashable] | None = None,
    compute_dtype: torch.dtype = torch.float64,
    route: str = AUTO,
    strategy: str = WHOLE_MATRIX,
    row_chunk: int | None = None,
    return_diagnostics: bool = False,
    matmul_dtype=None,
    output_dtype: torch.dtype | None = None,
):
    """Merge one 2-D weight by Iso-C; returns W_0 + alpha sigmabar UV^T in ``compute_dtype``
    (module docstring). ``route``: "auto" (Gram route where exact, else SVD) or "svd".
    ``matmul_dtype="auto"``: the whole rule in float32 where the precision contract for
    ``output_dtype`` allows it, else in ``compute_dtype`` (as :func:`.tsv_m.tsv_m_merge`)."""
    check_inputs(base, experts, name=name, ids=ids, matrix_rule="Iso-C")
    check_parameter(name, "alpha", alpha)
    check_strategy(strategy, name, SVD_STRATEGIES)
    check_route(route)
    return run_svd_rule(lambda dt, budget: _iso_c(base, experts, alpha, route, row_chunk, dt, budget),
                        base, experts, alpha, matmul_dtype=matmul_dtype, compute_dtype=compute_dtype,
                        output_dtype=output_dtype, name=name, label="Iso-C", return_diagnostics=return_diagnostics)


def _iso_c(base, experts, alpha, route, row_chunk, dt, budget):
    """Iso-C in ``dt``; ``budget``: the contract a float32 attempt is held to."""
    r = min(base.shape)
    delta = task_arithmetic_sum(base, experts, dt, row_chunk)
    P, S, used = polar_factor_(delta, route=route, row_chunk=row_chunk, budget=budget)
    del delta
    sigma_bar = isotropic_value(S, r)
    W = _isotropic_merge(base, P, None, sigma_bar, alpha, dt, row_chunk)
    settle_svd_budget(budget, W, base, alpha)
    return W, IsoDiagnostics(sigma_bar=sigma_bar, common_size=r, per_task=0, rank=int(S.numel()), routes=[used],
                             precision=str(dt).replace("torch.", ""))


# --------------------------------------------------------------------------- Iso-CTS
def common_space_size(r: int, n_tasks: int, fraction: float) -> int:
    """Size k of the common subspace: the authors' ``int(r * fraction)``, then
    ``r - round((r - k) / T) * T`` so that the task-specific remainder splits evenly over the
    tasks; if that remainder would exceed r (possible for tiny r), one dimension per task fewer."""
    k = int(r * fraction)
    specific = round((r - k) / n_tasks) * n_tasks
    if specific > r:
        specific -= n_tasks
    return r - specific


def common_subspace(delta: torch.Tensor, k: int, route: str = AUTO, row_chunk: int | None = None,
                    budget=None) -> Triplets:
    """Step 1: the top-k singular triplets of Delta = sum_t D_t."""
    return top_singular_triplets(delta, k, route=route, row_chunk=row_chunk, budget=budget)


def project_out_(delta_t: torch.Tensor, U_c: torch.Tensor, row_chunk: int | None = None) -> torch.Tensor:
    """Step 2 (in place): D_t <- D_t - U_c (U_c^T D_t), one row block at a time."""
    if U_c.shape[1]:
        coefficients = U_c.T @ delta_t
        for rows in row_chunks(delta_t.shape[0], row_chunk):
            delta_t[rows] -= U_c[rows] @ coefficients
    return delta_t


def task_specific_subspace(delta_t: torch.Tensor, U_c: torch.Tensor, s: int, zero_below: float,
                           route: str = AUTO, row_chunk: int | None = None, budget=None) -> Triplets:
    """Step 2: the top-s triplets of (I - U_cU_c^T) D_t (``delta_t`` is overwritten);
    singular values at or below ``zero_below`` (noise of a task vector that lies in the common
    subspace) are left out."""
    return top_singular_triplets(project_out_(delta_t, U_c, row_chunk), s, zero_below=zero_below, route=route,
                                 row_chunk=row_chunk, budget=budget)


def iso_cts_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    alpha: float = DEFAULTS_CTS["alpha"],
    common_space_fraction: float = DEFAULTS_CTS["common_space_fraction"],
    name: str | None = None,
    ids: Sequence[Hashable] | None = None,
    compute_dtype: torch.dtype = torch.float64,
    route: str = AUTO,
    strategy: str = WHOLE_MATRIX,
    row_chunk: int | None = None,
    return_diagnostics: bool = False,
    matmul_dtype=None,
    output_dtype: torch.dtype | None = None,
):
    """Merge one 2-D weight by Iso-CTS; returns W_0 + alpha sigmabar U_perp V_perp^T in
    ``compute_dtype`` (module docstring). ``route``: "auto" (Gram route where exact, else SVD) or "svd".
    ``matmul_dtype``, ``output_dtype``: as for :func:`iso_c_merge`."""
    check_inputs(base, experts, name=name, ids=ids, matrix_rule="Iso-CTS")
    check_parameter(name, "alpha", alpha)
    check_parameter(name, "common_space_fraction", common_space_fraction, low=0.0, high=1.0)
    check_strategy(strategy, name, SVD_STRATEGIES)
    check_route(route)
    return run_svd_rule(
        lambda dt, budget: _iso_cts(base, experts, alpha, common_space_fraction, route, row_chunk, dt, budget),
        base, experts, alpha, matmul_dtype=matmul_dtype, compute_dtype=compute_dtype, output_dtype=output_dtype,
        name=name, label="Iso-CTS", return_diagnostics=return_diagnostics)


def _iso_cts(base, experts, alpha, common_space_fraction, route, row_chunk, compute_dtype, budget):
    """Iso-CTS in ``compute_dtype``; ``budget``: the contract a float32 attempt is held to."""
    T = len(experts)
    r = min(base.shape)
    k = common_space_size(r, T, common_space_fraction)
    s = (r - k) // T
    routes: list[str] = []

    # Step 1: the common subspace, written into the first columns of the stacked bases.
    d_out, d_in = base.shape
    U_stack = torch.empty(d_out, r, dtype=compute_dtype, device=base.device)
    V_stack = torch.empty(d_in, r, dtype=compute_dtype, device=base.device)
    S_all = torch.empty(r, dtype=compute_dtype, device=base.device)
    delta = task_arithmetic_sum(base, experts, compute_dtype, row_chunk)
    common = common_subspace(delta, k, route, row_chunk, budget)
    del delta
    filled = common.rank
    U_stack[:, :filled], V_stack[:, :filled], S_all[:filled] = common.U, common.V, common.S
    routes.append(common.route)
    del common
    U_c = U_stack[:, :filled]
    # Step 2: each task's top-s triplets outside the common subspace.
    for t in range(T if s > 0 else 0):
        D = task_vector(experts[t], base, compute_dtype)
        zero_below = RANK_RTOL * float(torch.linalg.matrix_norm(D))
        specific = task_specific_subspace(D, U_c, s, zero_below, route, row_chunk, budget)
        del D
        cols = slice(filled, filled + specific.rank)
        U_stack[:, cols], V_stack[:, cols], S_all[cols] = specific.U, specific.V, specific.S
        filled += specific.rank
        routes.append(specific.route)
        del specific
    del U_c
    # Steps 3-4: orthogonalisation (in place where the Gram route is taken), isotropic value.
    S_all = S_all[:filled]
    sigma_bar = isotropic_value(S_all, r)
    U_perp, _, route_u = polar_factor_(U_stack[:, :filled], route=route, row_chunk=row_chunk, budget=budget)
    V_perp, _, route_v = polar_factor_(V_stack[:, :filled], route=route, row_chunk=row_chunk, budget=budget)
    routes += [route_u, route_v]
    del U_stack, V_stack
    W = _isotropic_merge(base, U_perp, V_perp.T.contiguous(), sigma_bar, alpha, compute_dtype, row_chunk)
    settle_svd_budget(budget, W, base, alpha)
    return W, IsoDiagnostics(sigma_bar=sigma_bar, common_size=k, per_task=s, rank=int(S_all.numel()),
                             routes=routes, precision=str(compute_dtype).replace("torch.", ""))
