"""TSV-M (Task Singular Vectors: Merge), one weight matrix at a time.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, "Task Singular Vectors: Reducing
Task Interference in Model Merging", CVPR 2025, arXiv:2412.00081; authors' code
https://github.com/AntoAndGar/task_singular_vectors (``src/utils/TSVM_utils.py``,
``compute_and_sum_svd_mem_reduction``, the method ``TSVM`` the paper's tables come from).
Task vectors D_t = W_t - W_0 (d_out x d_in), T experts, r = min(d_out, d_in):

1. task singular vectors (TSV-C)   D_t ~ U_t S_t V_t^T, the top
                                    k = floor(r * sv_reduction) triplets,
                                    sv_reduction = 1/T by default (the per-task rank budget)
2. concatenation                    U^ = [U_1 ... U_T], S^ = diag(S_1 ... S_T),
                                    V^ = [V_1 ... V_T]
3. interference removal             U_perp = polar(U^), V_perp = polar(V^)
                                    (Procrustes: U^ = PDQ^T => U_perp = PQ^T, the
                                    closest matrix with orthonormal columns)
4. merge                            W = W_0 + alpha U_perp S^ V_perp^T

Weights that are not 2-D and input embeddings get W_0 + alpha mean_t D_t
(``methods/_shared.py``; the authors' code averages every non-matrix parameter the same way).

Paper and code. Step 3 is the orthogonal polar factor: the code computes it by the SVD
(Procrustes, U^ = PDQ^T => PQ^T); whitening U^(U^^T U^)^-1/2
is the same matrix, computed here through the Gram matrix where that is exact (:mod:`.spectral`).
The code's ``k = int(s.shape[0] * (1 / T))`` is kept literally (with
``sv_reduction`` given: ``int(r * sv_reduction)``). The repository also has ``TSVM_2``, an
eigendecomposition variant that sorts the singular values and adds 1e-12 to the eigenvalues'
roots; this follows ``TSVM``, the README's TSV-Merge command and the function fusion-bench ports.
Alpha: the authors' evaluation selects it on validation data (``specify_lambda: None`` in their
``config/config.yaml``), so the paper has no data-free value; fusion-bench's TSV-M defaults to
1.0, as does this package. One deliberate difference: where a task matrix has
rank below k, the code keeps the zero singular values' arbitrary singular vectors in
U^, V^ (they change the orthogonalisation of everything else); here they are left
out (:mod:`.spectral`, "Zero singular values"). For full-rank task matrices the two agree.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from mergekit_ace.rules.checks import check_inputs, check_parameter
from mergekit_ace.rules.linalg import row_chunks
from mergekit_ace.rules.spectral import (
    AUTO,
    Triplets,
    check_route,
    polar_factor_,
    run_svd_rule,
    settle_svd_budget,
    top_singular_triplets,
)
from mergekit_ace.rules.task_vectors import SVD_STRATEGIES, WHOLE_MATRIX, check_strategy, task_vector

DEFAULTS = dict(sv_reduction=None, alpha=1.0)


# --------------------------------------------------------------------------- step 1
def per_task_rank(r: int, n_tasks: int, sv_reduction: float | None = None) -> int:
    """The per-task rank budget k: ``int(r * sv_reduction)`` with ``sv_reduction = 1/T`` by
    default (the authors' ``int(s.shape[0] * (1 / len(task_vectors)))``, floating point as written)."""
    fraction = 1.0 / n_tasks if sv_reduction is None else float(sv_reduction)
    return int(r * fraction)


def task_singular_vectors(delta: torch.Tensor, k: int, route: str = AUTO,
                          row_chunk: int | None = None, budget=None) -> Triplets:
    """Step 1 (TSV-C): the top-k singular triplets of one task matrix (zero singular values left out)."""
    return top_singular_triplets(delta, k, route=route, row_chunk=row_chunk, budget=budget)


# --------------------------------------------------------------------------- steps 2-3
def orthogonalise_(stacked: torch.Tensor, route: str = AUTO, row_chunk: int | None = None, budget=None):
    """Step 3: polar(U^), the orthonormal matrix closest to the concatenated
    singular vectors. Overwrites ``stacked`` where the Gram route is taken; returns ``(P, route)``."""
    P, _, used = polar_factor_(stacked, route=route, row_chunk=row_chunk, budget=budget)
    return P, used


# --------------------------------------------------------------------------- the rule
@dataclass
class TSVMDiagnostics:
    k: int
    #: kept triplets per expert (k, or fewer where a task matrix has lower rank)
    ranks: list[int]
    #: route of each SVD ("gram" or "svd"): the T task SVDs, then polar(U), polar(V)
    routes: list[str] = field(default_factory=list)
    #: the dtype the decompositions ran in ("float32" where the precision contract allowed it)
    precision: str = "float64"


def tsv_m_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    sv_reduction: float | None = DEFAULTS["sv_reduction"],
    alpha: float = DEFAULTS["alpha"],
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
    """Merge one 2-D weight by TSV-M; returns W_0 + alpha U_perp S^ V_perp^T in
    ``compute_dtype`` (module docstring). ``route`` = "auto" (Gram route where exact, else SVD) or
    "svd"; ``row_chunk`` = rows per block of the products (memory, not the result). Inputs are
    never modified; an expert identical to the base contributes nothing (no error).
    ``matmul_dtype="auto"``: the whole rule in float32 where the precision contract for
    ``output_dtype`` allows it (every decomposition's estimated error charged to it), else in
    ``compute_dtype`` (:mod:`mergekit_ace.rules.precision`)."""
    check_inputs(base, experts, name=name, ids=ids, matrix_rule="TSV-M")
    check_parameter(name, "alpha", alpha)
    if sv_reduction is not None:
        check_parameter(name, "sv_reduction", sv_reduction, low=0.0, high=1.0)
    check_strategy(strategy, name, SVD_STRATEGIES)
    check_route(route)
    return run_svd_rule(lambda dt, budget: _tsv_m(base, experts, sv_reduction, alpha, route, row_chunk, dt, budget),
                        base, experts, alpha, matmul_dtype=matmul_dtype, compute_dtype=compute_dtype,
                        output_dtype=output_dtype, name=name, label="TSV-M", return_diagnostics=return_diagnostics)


def _tsv_m(base, experts, sv_reduction, alpha, route, row_chunk, compute_dtype, budget):
    """The rule in ``compute_dtype``; ``budget``: the contract a float32 attempt is held to."""
    T = len(experts)
    d_out, d_in = base.shape
    k = per_task_rank(min(d_out, d_in), T, sv_reduction)

    # Steps 1-2: each task's top-k triplets, written straight into the concatenated bases.
    U_hat = torch.empty(d_out, T * k, dtype=compute_dtype, device=base.device)
    V_hat = torch.empty(d_in, T * k, dtype=compute_dtype, device=base.device)
    S_hat = torch.empty(T * k, dtype=compute_dtype, device=base.device)
    ranks, routes, filled = [], [], 0
    for t in range(T):
        D = task_vector(experts[t], base, compute_dtype)
        trip = task_singular_vectors(D, k, route, row_chunk, budget)
        del D
        cols = slice(filled, filled + trip.rank)
        U_hat[:, cols], V_hat[:, cols], S_hat[cols] = trip.U, trip.V, trip.S
        filled += trip.rank
        ranks.append(trip.rank)
        routes.append(trip.route)
        del trip
    U_hat, V_hat, S_hat = U_hat[:, :filled], V_hat[:, :filled], S_hat[:filled]
    # Step 3: interference removal (in place where the Gram route is taken).
    U_perp, route_u = orthogonalise_(U_hat, route, row_chunk, budget)
    V_perp, route_v = orthogonalise_(V_hat, route, row_chunk, budget)
    routes += [route_u, route_v]
    del U_hat, V_hat

    # Step 4: W = W0 + alpha U_perp S V_perp^T, one row block at a time.
    W = torch.empty(d_out, d_in, dtype=compute_dtype, device=base.device)
    right = V_perp.T.contiguous()
    scaled = S_hat * alpha
    for rows in row_chunks(d_out, row_chunk):
        block = (U_perp[rows] * scaled) @ right
        block += base[rows]
        W[rows] = block
    settle_svd_budget(budget, W, base, alpha)
    return W, TSVMDiagnostics(k=k, ranks=ranks, routes=routes, precision=str(compute_dtype).replace("torch.", ""))
