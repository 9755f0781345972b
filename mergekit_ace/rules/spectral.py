"""Singular-value building blocks of the SVD-based rules (TSV-M, Iso-C, Iso-CTS).

Two operations, each with an exact cheap route and a full-SVD route:

* :func:`top_singular_triplets` -- the k largest singular triplets (U_k, S_k, V_k) of X;
* :func:`polar_factor_` -- the orthogonal polar factor UV^T of X = USV^T (the
  closest matrix with orthonormal columns/rows, "Procrustes orthogonalisation") and X's singular
  values.

**Gram route.** Both follow from the eigendecomposition of X's smaller Gram matrix
(X^TX for tall X, XX^T for wide): X^TX = V S^2 V^T, U = XVS^-1,
UV^T = X (X^TX)^-1/2. That is mathematically exact and costs a Gram matrix, one
symmetric eigendecomposition (on the CPU ``precision.top_eigenpairs``: LAPACK ``syevr`` for few pairs,
``syevd`` for a quarter or more) and one product,
against a Householder bidiagonalisation for the SVD (about 2-4x the flops). But forming the Gram
squares the condition number: in float64 its eigenvalues carry an absolute error of about
sqrt(d) u lambda_max (u = 2^-53, d the summed dimension), so a direction with a small
singular value, or a top-k boundary with a small gap, is resolved less accurately than by the SVD.

**The check** (``route="auto"``, the default). After the eigendecomposition the error the Gram
route adds is estimated -- sqrt(d) u lambda_1/(lambda_k- lambda_k+1) for the top-k
subspace (Davis-Kahan), sqrt(d) u lambda_max/lambda_min for the polar factor
(the inverse square root of the Gram amplifies its error by kappa(X)^2) -- and if it
exceeds :data:`GRAM_TOLERANCE` the full SVD is computed instead (``torch.linalg.svd``). Rank-
deficient or nearly rank-deficient inputs always take the SVD. ``route="svd"`` skips the Gram
route (the authors' code path; tests and benchmarks use it to compare).

**Zero singular values.** Singular vectors of a zero singular value are an arbitrary completion
(LAPACK returns some orthonormal basis of the null space). The authors' code keeps them, which
makes TSV-M and Iso-C/Iso-CTS results on rank-deficient task matrices depend on LAPACK's choice.
Here directions with sigma <= ``zero_below`` (default :data:`RANK_RTOL` times the
largest singular value) are left out; for full-rank inputs (every real fine-tune) nothing changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mergekit_ace.rules.checks import check_finite_output
from mergekit_ace.rules.linalg import PINV_RTOL, add_gram_, row_chunks, symmetrize_gram_
from mergekit_ace.rules.precision import (
    ErrorBudget,
    extreme_eigenvalues,
    run_with_fallback,
    top_eigenpairs,
    unit_roundoff,
)
from mergekit_ace.rules.task_vectors import TaskVectors

#: Unit roundoff of float64.
UNIT_ROUNDOFF_FLOAT64 = 2.0 ** -53
#: Largest estimated relative error accepted from the Gram route (100x under the 1e-6 the tests
#: hold the rules to against full-SVD references).
GRAM_TOLERANCE = 1e-8
#: Singular values at or below this fraction of the largest count as zero (no defined vectors).
RANK_RTOL = PINV_RTOL
#: ``route`` values: the Gram route where its estimated error allows it, else the SVD; or the SVD.
AUTO, SVD = "auto", "svd"
ROUTES = (AUTO, SVD)
#: Gram matrices at least this large get the cheap pre-check before their eigendecomposition
#: (:func:`_clearly_ill_conditioned`); below it the eigendecomposition costs less than the check's
#: 40 small factorisations (measured: 0.2 s per tiny weight in a busy mergekit-yaml process).
PRECHECK_MIN_SIZE = 512
#: Row (or column) block of the in-place products.
BLOCK = 2048


@dataclass
class Triplets:
    """Singular triplets X ~ U diag(S) V^T, largest first (U: p x r, S: r,
    V: q x r); ``route`` says which route computed them ("gram" or "svd")."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor
    route: str

    @property
    def rank(self) -> int:
        return int(self.S.numel())


def check_route(route: str) -> str:
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    return route


def smaller_gram(X: torch.Tensor, row_chunk: int | None = None) -> tuple[torch.Tensor, bool]:
    """``(G, tall)``: G = X^TX if X is tall (p >= q) else XX^T, only the upper
    block triangle computed (:func:`~mergekit_ace.rules.linalg.add_gram_`)."""
    p, q = X.shape
    tall = p >= q
    gram = torch.zeros((q, q) if tall else (p, p), dtype=X.dtype, device=X.device)
    if tall:
        for rows in row_chunks(p, row_chunk):
            add_gram_(gram, X[rows])
    else:
        add_gram_(gram, X.T)
    return symmetrize_gram_(gram), tall


def gram_error(lam_top: float, denominator: float, summed_dim: int, unit: float = UNIT_ROUNDOFF_FLOAT64) -> float:
    """sqrt(d) u lambda_1 / denominator: the estimated relative error of a
    quantity that the Gram route resolves against ``denominator`` (a gap or the smallest
    eigenvalue); infinite when the denominator is not positive. ``unit``: the Gram's unit roundoff."""
    if not denominator > 0 or not lam_top > 0:
        return math.inf
    return math.sqrt(summed_dim) * unit * lam_top / denominator


def svd_error(sigma_top: float, denominator: float, summed_dim: int, unit: float) -> float:
    """sqrt(d) u sigma_1 / denominator: the same for the SVD route (a singular
    subspace turns by its backward error over the singular-value gap, Wedin; a polar factor by
    u sigma_1/sigma_min)."""
    if not denominator > 0 or not sigma_top > 0:
        return math.inf
    return math.sqrt(summed_dim) * unit * sigma_top / denominator


def svd_budget(base: torch.Tensor, experts, alpha: float, output_dtype: torch.dtype | None) -> ErrorBudget:
    """The precision contract of a checked float32 attempt of an SVD rule: ``||W||`` taken as
    ||W_0|| and the merged update's norm as sqrt(sum_t||D_t||^2) until
    :func:`settle_svd_budget` knows them."""
    energies = TaskVectors(base, experts, torch.float32).energies_and_means(torch.float64, means=False)[0]
    return ErrorBudget(output_dtype, float(torch.linalg.vector_norm(base, dtype=torch.float64)), alpha,
                       math.sqrt(sum(energies)))


def run_svd_rule(step, base: torch.Tensor, experts, alpha: float, *, matmul_dtype, compute_dtype: torch.dtype,
                 output_dtype: torch.dtype | None, name: str | None, label: str, return_diagnostics: bool):
    """An SVD rule under the precision contract: ``step(dtype, budget) -> (W, diagnostics)`` run by
    ``precision.run_with_fallback`` (a float32 attempt gets :func:`svd_budget`, the float64 pass
    none), the result checked finite (``label`` names the rule in the message)."""
    W, diag = run_with_fallback(
        lambda dt, check: step(dt, svd_budget(base, experts, alpha, output_dtype) if check else None),
        matmul_dtype, compute_dtype, name, output_dtype)
    check_finite_output(W, name, label)
    return (W, diag) if return_diagnostics else W


def settle_svd_budget(budget: ErrorBudget | None, W: torch.Tensor, base: torch.Tensor, alpha: float) -> None:
    """Charge a float32 attempt's estimates again at the true norms of W and of its update."""
    if budget is None:
        return
    update = float(torch.linalg.vector_norm(W.double() - base.double()))
    budget.settle(float(torch.linalg.vector_norm(W, dtype=torch.float64)),
                  update / abs(alpha) if alpha else 0.0, "float32 decompositions")


def _charge(budget: ErrorBudget | None, error: float, what: str) -> None:
    """A checked (float32) attempt spends ``error`` (relative) of the contract's budget, or gives up."""
    if budget is not None:
        budget.charge(error, what)


def top_singular_triplets(X: torch.Tensor, k: int, *, zero_below: float | None = None, route: str = AUTO,
                          row_chunk: int | None = None, budget: ErrorBudget | None = None) -> Triplets:
    """The k largest singular triplets of X, leaving out those with sigma <= ``zero_below``
    (default: :data:`RANK_RTOL` times sigma_1). X is not modified.

    Gram route: the top k+1 eigenpairs of the smaller Gram (k+1: the gap after the k-th, which
    the check needs), then U_k = XV_kS_k^-1 (or V_k = X^TU_kS_k^-1).

    ``budget`` (a checked float32 attempt, X in float32): each route's estimated error is charged
    to the precision contract, the Gram route taken where it is within what remains, and
    :class:`~mergekit_ace.rules.precision.NeedsFloat64` raised where even the SVD's is not."""
    p, q = X.shape
    k = max(0, min(int(k), p, q))
    if k == 0:
        return _empty(X, "gram")
    unit = unit_roundoff(X.dtype)
    tolerance = GRAM_TOLERANCE if budget is None else budget.remaining_relative()
    if check_route(route) == AUTO:
        gram, tall = smaller_gram(X, row_chunk)
        count = k + 1 if k < min(p, q) else k
        lam, vecs = top_eigenpairs(gram, count)
        del gram
        lam = lam.to(X.dtype).clamp_min(0)
        vecs = vecs.to(X.dtype)
        following = float(lam[k]) if count > k else 0.0
        error = gram_error(float(lam[0]), float(lam[k - 1]) - following, p if tall else q, unit)
        S = lam[:k].sqrt()
        # every wanted direction resolved, and none of them at or below the zero cutoff (those
        # are the SVD's to leave out)
        if error <= tolerance and float(S[-1]) > _cutoff(S, zero_below):
            _charge(budget, error, f"the top-{k} singular subspace (Gram route)")
            vecs = vecs[:, :k]
            other = (X @ vecs) if tall else (X.T @ vecs)
            other /= S
            return Triplets(U=other, S=S, V=vecs, route="gram") if tall else \
                Triplets(U=vecs, S=S, V=other, route="gram")
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    cutoff = _cutoff(S, zero_below)
    keep = S[:k] > cutoff
    if budget is not None and k < min(p, q) and float(S[k - 1]) > cutoff:
        _charge(budget, svd_error(float(S[0]), float(S[k - 1] - S[k]), max(p, q), unit),
                f"the top-{k} singular subspace (SVD)")
    return Triplets(U=U[:, :k][:, keep], S=S[:k][keep], V=Vh[:k].T[:, keep], route="svd")


def polar_factor_(X: torch.Tensor, *, zero_below: float | None = None, route: str = AUTO,
                  row_chunk: int | None = None,
                  budget: ErrorBudget | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(P, S, route)``: the orthogonal polar factor P = U_rV_r^T of X = USV^T
    over the directions with sigma > ``zero_below`` (default :data:`RANK_RTOL`
    sigma_1), and those singular values (largest first). **Overwrites X** with P where
    the Gram route is taken (P = X(X^TX)^-1/2 formed block by block in X's storage);
    otherwise P is a new tensor and X is left as it was. ``budget``: as for
    :func:`top_singular_triplets`."""
    p, q = X.shape
    unit = unit_roundoff(X.dtype)
    tolerance = GRAM_TOLERANCE if budget is None else budget.remaining_relative()
    if check_route(route) == AUTO and min(p, q) > 0:
        gram, tall = smaller_gram(X, row_chunk)
        summed = p if tall else q
        if gram.shape[0] >= PRECHECK_MIN_SIZE and _clearly_ill_conditioned(gram, summed, unit, tolerance):
            del gram
            return _polar_by_svd(X, zero_below, budget)
        lam, Q = torch.linalg.eigh(gram)  # ascending
        del gram
        error = gram_error(float(lam[-1]), float(lam[0]), summed, unit)
        if error <= tolerance and float(lam[0]) > _cutoff(lam.flip(0).clamp_min(0).sqrt(), zero_below) ** 2:
            _charge(budget, error, "a polar factor (Gram route)")
            K = (Q * lam.rsqrt()) @ Q.T  # (X^T X)^{-1/2} or (X X^T)^{-1/2}
            del Q
            if tall:
                for rows in row_chunks(p, row_chunk or BLOCK):
                    X[rows] = X[rows] @ K
            else:
                for cols in row_chunks(q, row_chunk or BLOCK):
                    X[:, cols] = K @ X[:, cols]
            return X, lam.flip(0).sqrt(), "gram"
    if min(p, q) == 0:
        return X, X.new_zeros(0), "svd"
    return _polar_by_svd(X, zero_below, budget)


def _polar_by_svd(X: torch.Tensor, zero_below: float | None, budget: ErrorBudget | None = None):
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    keep = S > _cutoff(S, zero_below)
    if budget is not None and bool(keep.any()):
        kept = S[keep]
        _charge(budget, svd_error(float(kept[0]), float(kept[-1]), max(X.shape), unit_roundoff(X.dtype)),
                "a polar factor (SVD)")
    return U[:, keep] @ Vh[keep], S[keep], "svd"


def _clearly_ill_conditioned(gram: torch.Tensor, summed_dim: int, unit: float = UNIT_ROUNDOFF_FLOAT64,
                             tolerance: float = GRAM_TOLERANCE) -> bool:
    """Whether the Gram route of the polar factor is bound to fail its check, decided before the
    eigendecomposition: the Cholesky factorisation fails (singular), or the condition number
    estimated by a few power iterations (:func:`~mergekit_ace.rules.precision.extreme_eigenvalues`,
    ~0.1 s for 2048; it errs towards a smaller condition number) already gives too large an error."""
    L, info = torch.linalg.cholesky_ex(gram)
    if int(info) != 0:
        return True
    lam_min, lam_max = extreme_eigenvalues(gram, L, dtype=gram.dtype)
    return gram_error(lam_max, lam_min, summed_dim, unit) > tolerance


def _cutoff(S: torch.Tensor, zero_below: float | None) -> float:
    if zero_below is not None:
        return float(zero_below)
    return RANK_RTOL * float(S[0]) if S.numel() else 0.0


def _empty(X: torch.Tensor, route: str) -> Triplets:
    p, q = X.shape
    return Triplets(U=X.new_zeros(p, 0), S=X.new_zeros(0), V=X.new_zeros(q, 0), route=route)
