"""ACE-Merging, one weight matrix at a time.

Xu et al., "ACE-Merging: Data-Free Model Merging with Adaptive Covariance Estimation", CVPR 2026,
arXiv:2603.02945 (Algorithm 1, Eqs. 5-16). The method statement, with every detail where the code
differs from the paper or the authors' code, is docs/methods.md, "ACE-Merging". Notation: base
W_0 (d_out x d_in, rows are outputs), experts W_1..W_T, task vectors D_t = W_t - W_0; 1 is the
all-ones column, so 1 c^T adds the row c to every row.

  step                  formula                                                  computed by
1. heterogeneity      gamma = Var_t[l_t] / (E_t[l_t]^2 + 1e-12),               _branch_decision
                      l_t = log(||D_t||_F^2 + 1e-12); het = gamma > tau
2. centring           C_t = D_t - 1 mu_t^T,  mu_t = mean of D_t's rows          _proxies
3. proxies            S_t = C_t^T C_t, s_t = tr S_t + 1e-12;                    _proxies
                      het: S~_t = S_t/s_t, eps_t = eps/s_t; else S~_t = S_t, eps_t = eps;
                      R_t = S~_t + eps_t I
4. collective prior   c = column-mean of sum_t S~_t                             _prior_solver
                      (het: / (mean_t ||D_t||^2 + 1e-12))
5. closed form        P = N A^-1,  A = sum_t R_t + 1 c^T,  N = sum_t C_t R_t    _prior_solver, _solve
6. refinement (het)   F = P + sum_t D_t (S~_t - Sbar),  Sbar = mean_t R_t;      _refine_step
                      P += sigma_iso U_k V_k^T,  sigma_iso = mean(sigma_1..k),
                      k = floor(k_frac min(d_out, d_in))
                      (``refinement="add"``, Eq. 19 as published; ``"rescale"``: P's own top-k
                      singular values set to their mean; ``"none"``: P as it is)
7. result             W = W_0 + scale P                                         _result

Null directions (singular value zero, e.g. low-rank / LoRA-like task vectors) get no refinement:
an eigenvalue of the Gram counts as zero when it is at most ``max(d_out, d_in) * eps * lambda_max``
in the Gram's precision. The authors' code adds arbitrary unit vectors for them.

Every function here is pure (inputs are never modified). :func:`ace_merge` is the whole rule; it
streams over experts and row blocks so that its working memory is the experts' d_in x d_in
proxies plus one block of rows (``row_chunk``), never T full-size float64 task vectors. The
parameters and their defaults (the paper's) are :class:`ACEParameters`, the only place they are
written.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from mergekit_ace.rules.checks import (
    check_finite_output,
    check_inputs,
    check_nonzero_task_vectors,
    check_parameter,
    describe,
)
from mergekit_ace.rules.linalg import (
    PINV_RTOL,
    add_gram_,
    add_left_product_,
    cholesky_right_solve,
    cholesky_solve,
    output_gram,
    row_chunks,
    symmetrize_gram_,
)
from mergekit_ace.rules.precision import (
    TRACE_SLACK,
    ErrorBudget,
    NeedsFloat64,
    RunningConditionBound,
    condition_number,
    expert_order,
    null_decision_is_clear,
    refinement_error_estimate,
    run_with_fallback,
    solve_error_estimate,
    top_eigenpairs,
)
from mergekit_ace.rules.task_vectors import (
    ACE_STRATEGIES,
    EXPERT_STREAMED,
    OUTPUT_GRAM,
    ROW_CHUNKED,
    ROW_RECOMPUTED,
    TaskVectors,
    check_strategy,
)

LOG = logging.getLogger(__name__)

#: Constant added in several of ACE's denominators and logarithms (part of the rule as published:
#: docs/methods.md, "ACE").
TINY = 1e-12

@dataclass(frozen=True)
class ACEParameters:
    """ACE's parameters, with the paper's defaults (Xu et al., Table 9; docs/methods.md, "ACE").
    This is the one place they are written: :data:`DEFAULTS`, the mergekit method, ``inspect`` and
    the demo take theirs from here."""

    epsilon: float = 1e-5  # the ridge of step 3
    tau: float = 0.3  # the branch threshold of step 1
    k_frac: float = 0.3  # step 6's rank: k = floor(k_frac min(d_out, d_in))
    scale: float = 1.0  # step 7
    refinement: str = "add"  # step 6's variant (REFINEMENTS)

    def check(self, name: str | None, strategy: str) -> str:
        """Refuse a parameter out of range, or an unknown ``strategy`` or ``refinement``, naming the
        tensor; returns the strategy."""
        check_parameter(name, "epsilon", self.epsilon, low=0.0)
        check_parameter(name, "tau", self.tau, low=0.0)
        check_parameter(name, "k_frac", self.k_frac, low=0.0, high=1.0)
        check_parameter(name, "scale", self.scale)
        strategy = check_strategy(strategy, name, ACE_STRATEGIES)
        check_refinement(name, self.refinement)
        return strategy


#: ACE's defaults as keyword arguments (``ace_merge``, ``merge_method: ace``).
DEFAULTS = asdict(ACEParameters())

#: Step 6 variants: ``add`` (Eq. 19 as published: P + sigma_iso U_k V_k^T of F), ``rescale`` (the
#: top-k singular values of P itself replaced by their mean, its singular vectors kept) and
#: ``none`` (the preliminary solution P).
REFINEMENTS = ("add", "rescale", "none")


def check_refinement(name: str | None, refinement) -> str:
    """Refuse an unknown ``refinement``, naming the tensor."""
    if refinement not in REFINEMENTS:
        from mergekit_ace.errors import MergeInputError

        raise MergeInputError(f"{describe(name)}: parameter refinement={refinement!r} must be one of "
                              f"{', '.join(REFINEMENTS)}")
    return refinement


# --------------------------------------------------------------------------- step 1
def heterogeneity(traces: Sequence[float] | torch.Tensor) -> float:
    """Eq. 7: gamma = Var_t[l_t] / (E_t[l_t]^2 + 1e-12) with
    l_t = log(||D_t||_F^2 + 1e-12) and the unbiased variance.

    ``traces`` are the uncentred energies ||D_t||_F^2. Returns NaN for T = 1, where gamma
    is undefined (:func:`is_heterogeneous` then selects the homogeneous branch).
    """
    tr = torch.as_tensor(traces, dtype=torch.float64).flatten()
    if tr.numel() < 2:
        return float("nan")
    logs = torch.log(tr + TINY)
    return float(logs.var(unbiased=True) / (logs.mean() ** 2 + TINY))


def is_heterogeneous(gamma: float, tau: float) -> bool:
    """The branch switch ``gamma > tau`` (False when gamma is undefined, i.e. T = 1)."""
    return not math.isnan(gamma) and gamma > tau


# --------------------------------------------------------------------------- steps 2-3
def proxy_sum_trace_bound(traces: Sequence[float], mus: Sequence[torch.Tensor], d_out: int, d_in: int,
                          heterogeneous: bool, epsilon: float) -> float:
    """An upper bound on tr M = sum_t tr S~_t + d_in sum_t eps_t
    from step 1's energies, before any proxy exists (for :func:`precision.condition_lower_bound`).
    tr S_t = ||C_t||^2 = ||D_t||^2 - d_out||mu_t||^2; heterogeneous:
    tr S~_t <= 1, eps_t = eps/||C_t||^2; else
    tr S~_t <= ||D_t||^2, eps_t = eps; with
    ``TRACE_SLACK`` for the Grams' rounding. Infinite (no bound) where centring cancels more than
    half of an energy (the difference would be inaccurate)."""
    T = len(traces)
    if not heterogeneous:
        return TRACE_SLACK * sum(float(t) for t in traces) + d_in * T * epsilon
    centred = [float(t) - d_out * float(mu.double().square().sum()) for t, mu in zip(traces, mus)]
    if any(c <= 0.5 * float(t) for c, t in zip(centred, traces)):
        return math.inf
    return TRACE_SLACK * T + d_in * sum(TRACE_SLACK * epsilon / c for c in centred)


# --------------------------------------------------------------------------- step 4
def collective_prior(S_tilde_sum: torch.Tensor, traces: Sequence[float], heterogeneous: bool) -> torch.Tensor:
    """Step 4 (Eqs. 11-13): c = the mean of the rows of sum_t S~_t;
    in the heterogeneous branch divided by taubar + 1e-12, the mean uncentred energy.
    The prior itself is C_agg = 1 c^T (c added to every row)."""
    c = S_tilde_sum.mean(dim=0)
    if heterogeneous:
        c = c / (sum(float(t) for t in traces) / len(traces) + TINY)
    return c


# --------------------------------------------------------------------------- step 5
@dataclass
class PriorSolver:
    """Right-division by A = M + 1 c^T with M = sum_t R_t SPD.

    Cholesky of M plus the Sherman-Morrison rank-one correction (exact, no explicit inverse):
    N A^-1 = X - (X 1) z^T / (1 + c^T M^-1 1),
    X = N M^-1, z = M^-1c. If M is not positive definite (only possible with
    epsilon = 0 and a rank-deficient proxy sum) A is pseudo-inverted instead
    (docs/methods.md, "ACE-Merging", step 5).
    """

    M: torch.Tensor
    c: torch.Tensor
    name: str | None = None
    ridge: float = 1.0  # sum_t eps_t; with a positive ridge M is SPD by construction
    solve_dtype: torch.dtype | None = None  # precision of the triangular solves (default M's)
    pseudo_inverse_fallback: bool = True  # False: a singular M is only reported (``singular``)
    _chol: torch.Tensor | None = field(init=False, default=None)
    _z: torch.Tensor | None = field(init=False, default=None)
    _y: torch.Tensor | None = field(init=False, default=None)
    _denom: float = field(init=False, default=1.0)
    _pinv: torch.Tensor | None = field(init=False, default=None)
    cholesky_factor: torch.Tensor | None = field(init=False, default=None)  # of M, in M's dtype
    _singular: bool = field(init=False, default=False)

    def __post_init__(self):
        L, info = torch.linalg.cholesky_ex(self.M)
        if int(info) == 0 and (self.ridge > 0 or _well_conditioned(L)):
            ones = torch.ones(self.M.shape[0], 1, dtype=self.M.dtype, device=self.M.device)
            y = cholesky_solve(ones, L)[:, 0]
            z = cholesky_solve(self.c[:, None], L)[:, 0]
            denom = 1.0 + float(self.c @ y)
            if abs(denom) > PINV_RTOL:
                sd = self.solve_dtype or L.dtype
                self._chol, self._y, self._z, self._denom = L.to(sd), y.to(sd), z.to(sd), denom
                self.cholesky_factor = L
                return
        self._singular = True
        if not self.pseudo_inverse_fallback:
            return
        LOG.warning("%s: the covariance sum is singular; using the pseudo-inverse of A", describe(self.name))
        A = self.M + self.c[None, :]  # 1 c^T adds c to every row
        self._pinv = torch.linalg.pinv(A, rtol=PINV_RTOL)

    def solve(self, N: torch.Tensor) -> torch.Tensor:
        """N A^-1 for a block of rows N (rows x d_in)."""
        if self._pinv is not None:
            return N @ self._pinv
        N = N.to(self._chol.dtype)
        X = cholesky_right_solve(N, self._chol)
        return X - torch.outer(N @ self._y, self._z) / self._denom

    @property
    def singular(self) -> bool:
        return self._singular

    def sherman_morrison_amplification(self) -> float:
        """How much the rank-one correction can magnify errors:
        (1+|c^TM^-1 1 |)/|1+c^TM^-1 1 |."""
        return (1.0 + abs(self._denom - 1.0)) / abs(self._denom)


def _well_conditioned(L: torch.Tensor) -> bool:
    """Cholesky of a numerically singular PSD matrix can "succeed" with tiny pivots; treat pivots
    below ``PINV_RTOL`` of the largest (squared) as singular (used when there is no ridge)."""
    pivots = torch.diagonal(L).square()
    return bool(pivots.min() > PINV_RTOL * pivots.max())


def closed_form(
    N: torch.Tensor, M: torch.Tensor, c: torch.Tensor, name: str | None = None, ridge: float = 1.0
) -> torch.Tensor:
    """Step 5: P = N (M + 1 c^T)^-1."""
    return PriorSolver(M, c, name, ridge).solve(N)


# --------------------------------------------------------------------------- step 6
def spectral_refinement(P: torch.Tensor, residual: torch.Tensor, k_frac: float,
                        allowed_error: float = 0.0) -> torch.Tensor:
    """Step 6 (Eqs. 14-16, 19): P + sigma_iso U_k V_k^T where
    F = P + Res = USV^T, k = floor(k_frac min(d_out, d_in)),
    sigma_iso = mean of the top-k singular values. Only the top-k pairs are computed
    (eigendecomposition of the smaller Gram of F where its estimated error is within
    ``allowed_error``, absolute; else a full SVD). Null directions (zero singular value) have no
    defined singular vectors and get no term (:func:`gram_null_mask`)."""
    F = P + residual
    k = int(math.floor(k_frac * min(F.shape)))
    refined = P.clone()
    if k > 0:
        _refine(refined, lambda rows: F[rows], k, F.dtype, allowed_error=allowed_error)
    return refined


def spectral_rescaling(P: torch.Tensor, k_frac: float, allowed_error: float = 0.0) -> torch.Tensor:
    """Step 6, ``refinement="rescale"``: with P = USV^T,
    P - U_k S_k V_k^T + sigmabar_k U_k V_k^T, sigmabar_k = mean of P's top-k
    singular values (null ones count as zero and keep no term): the top-k singular values are
    replaced by their mean, the singular vectors kept (the step as the paper's text describes it).
    Pairs as in :func:`spectral_refinement`."""
    k = int(math.floor(k_frac * min(P.shape)))
    rescaled = P.clone()
    if k > 0:
        _refine(rescaled, lambda rows: rescaled[rows], k, P.dtype, allowed_error=allowed_error, mode="rescale")
    return rescaled


def gram_null_mask(eigenvalues: torch.Tensor, lambda_max: float, inner_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Which eigenvalues of a Gram X^TX (or XX^T) belong to non-null directions:
    lambda > m eps lambda_max, with m the Gram's inner dimension (the length of
    the dot products) and eps the unit roundoff of the Gram's precision: below it an
    eigenvalue is indistinguishable from the rounding of a zero one. Cutting on
    sigma = sqrt lambda at n eps sigma_max instead would keep the null
    directions, whose computed sigma is about sqrt(eps) sigma_max."""
    cutoff = inner_dim * torch.finfo(dtype).eps * max(float(lambda_max), 0.0)
    return eigenvalues > cutoff


def _iso_and_inverse(eigenvalues: torch.Tensor, lambda_max: float, inner_dim: int,
                     dtype: torch.dtype) -> tuple[float, torch.Tensor, torch.Tensor]:
    """From the top-k Gram eigenvalues: sigma_iso = mean of the top-k singular values (null ones
    counted as zero), 1/sigma with zero for null directions, and the non-null mask (float64)."""
    keep = gram_null_mask(eigenvalues, lambda_max, inner_dim, dtype)
    sigma = torch.where(keep, eigenvalues.double().clamp_min(0).sqrt(), torch.zeros((), dtype=torch.float64))
    sigma_iso = float(sigma.mean()) if sigma.numel() else 0.0
    inv = torch.where(keep, 1.0 / sigma.clamp_min(1e-300), torch.zeros((), dtype=torch.float64))
    return sigma_iso, inv, keep.double()


def _gram_of_F(F_rows, d_out: int, d_in: int, dtype, device, row_chunk: int | None) -> torch.Tensor:
    """F^T F (tall F, accumulated over row blocks) or F F^T (wide F, whole) in ``dtype``; only the
    upper blocks are computed."""
    if d_out < d_in:
        return output_gram(torch.cat([F_rows(rows).to(dtype) for rows in row_chunks(d_out, row_chunk)]))
    gram = torch.zeros(d_in, d_in, dtype=dtype, device=device)
    for rows in row_chunks(d_out, row_chunk):
        block = F_rows(rows).to(dtype)
        add_gram_(gram, block)
        del block
    return symmetrize_gram_(gram)


def _refine(P: torch.Tensor, F_rows, k: int, gram_dtype: torch.dtype, row_chunk: int | None = None,
            allowed_error: float = 0.0, mode: str = "add") -> tuple[float, str]:
    """Step 6 in place on P, from the top-k singular triplets of a matrix X given by row blocks
    ``F_rows(rows)`` (it may read the unrefined ``P[rows]``: each block of P is refined only after
    it was read), X = U S V^T:

    * ``mode="add"`` (X = F): P += sigma_iso U_k V_k^T;
    * ``mode="rescale"`` (X = P): P += U_k(sigma_iso - S_k)V_k^T.

    Both are P += X V_k diag(c) V_k^T (tall X) or
    U_k diag(c) U_k^TX (wide X) with c = sigma_iso/sigma (add) or
    sigma_iso/sigma - 1 (rescale), and c = 0 on null directions.

    The pairs come from the eigendecomposition of X's smaller Gram, in ``gram_dtype``; where the
    error that route adds (:func:`precision.refinement_error_estimate`) exceeds ``allowed_error``
    (absolute, Frobenius; what the precision contract leaves), from a full SVD of X instead, whose
    singular vectors are accurate to u sigma_1/gap rather than
    u sigma_1^2/(sigma gap); also where a top-k eigenvalue is too close to the
    Gram's null floor to tell a small direction from a null one
    (:func:`precision.null_decision_is_clear`). Returns ``(sigma_iso, route)``, route being the
    Gram's precision or ``"svd"``."""
    d_out, d_in = P.shape
    count = k + 1 if k < min(d_out, d_in) else k  # one more pair: the gap after the k-th
    gram = _gram_of_F(F_rows, d_out, d_in, gram_dtype, P.device, row_chunk)
    lam, vecs = top_eigenpairs(gram, count)
    del gram
    # The null-direction cutoff, in the Gram's precision (its inner dimension is the longer side).
    sigma_iso, inv, keep = _iso_and_inverse(lam[:k], float(lam[0]) if lam.numel() else 0.0,
                                            max(d_out, d_in), gram_dtype)
    coef = sigma_iso * inv - (keep if mode == "rescale" else 0.0)
    if (not null_decision_is_clear(lam, k, max(d_out, d_in), gram_dtype)
            or refinement_error_estimate(lam, int(keep.sum()), sigma_iso, coef, gram_dtype) > allowed_error):
        return _refine_by_svd(P, F_rows, k, row_chunk, mode), "svd"
    vecs = vecs[:, :k]
    if d_out >= d_in:
        # Tall: vecs are right singular vectors V_k; row block by row block.
        scaled = coef.to(vecs.dtype)
        for rows in row_chunks(d_out, row_chunk):
            P[rows] += ((F_rows(rows).to(vecs.dtype) @ vecs) * scaled) @ vecs.T
    else:
        # Wide: vecs are left singular vectors U_k (V_k^T = S_k^-1 U_k^T X).
        X = torch.cat([F_rows(rows).to(P.dtype) for rows in row_chunks(d_out, row_chunk)])
        U = vecs.to(P.dtype)
        P += U @ ((U.T @ X) * coef.to(P.dtype)[:, None])
    return sigma_iso, str(gram_dtype).replace("torch.", "")


def _refine_by_svd(P: torch.Tensor, F_rows, k: int, row_chunk: int | None, mode: str) -> float:
    """:func:`_refine` from a full SVD of X (in P's precision): P += U_k
    diag(S_k c) V_k^T. A singular value counts as null at or below ``PINV_RTOL`` (1e-10)
    sigma_1, the package's cutoff for rank decisions: X's own rounding (from the products
    and the solve that formed it) puts its null singular values above the SVD's resolution."""
    d_out, d_in = P.shape
    X = torch.cat([F_rows(rows).to(P.dtype) for rows in row_chunks(d_out, row_chunk)])
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    del X
    top = S[:k].double()
    keep = top > PINV_RTOL * (float(S[0]) if S.numel() else 0.0)
    kept = torch.where(keep, top, torch.zeros((), dtype=torch.float64))
    sigma_iso = float(kept.mean()) if kept.numel() else 0.0
    # the term is U_k diag(new - old) V_k^T: sigma_iso on kept pairs (add), sigma_iso - S_k (rescale)
    change = torch.where(keep, sigma_iso - (top if mode == "rescale" else 0.0), torch.zeros((), dtype=torch.float64))
    P += (U[:, :k] * change.to(P.dtype)) @ Vh[:k]
    return sigma_iso


# --------------------------------------------------------------------------- the rule
def _output_gram_step(tv, t: int, mu: torch.Tensor, het: bool, S_sum: torch.Tensor, w: torch.Tensor,
                      Q: torch.Tensor, kappa_bound: RunningConditionBound, row_chunk: int | None) -> float:
    """Steps 2-3 for expert t without its d_in x d_in proxy (strategy ``output_gram``, for wide
    weights): with C~ = C_t/sqrt(s_t) (het; else C_t), S~_t =
    C~^T C~ goes into the upper blocks of ``S_sum`` (symmetrised after the last expert),
    S~_t mu_t = C~^T(C~ mu_t) into ``w``, and
    D_t S~_t = C_t S~_t + 1 (S~_t mu_t)^T into ``Q``, its first term
    from the d_out x d_out Gram as sqrt(s_t) (C~ C~^T) C~. The bound sees
    C~ C~^T, whose nonzero eigenvalues are those of S~_t. Returns
    s_t = ||C_t||_F^2 + 1e-12 (the trace of S_t)."""
    C = tv.whole(t, mu)
    s = float(torch.linalg.vector_norm(C, dtype=torch.float64) ** 2) + TINY
    root = math.sqrt(s) if het else 1.0
    if het:
        C.div_(root)
    K = output_gram(C)
    kappa_bound.add(K)
    add_gram_(S_sum, C)
    s_mu = C.T @ (C @ mu.to(C.dtype))
    w += s_mu.to(w.dtype)
    add_left_product_(Q, K, C, alpha=root, row_chunk=row_chunk)
    Q += s_mu.to(Q.dtype)
    return s


@dataclass
class ACEDiagnostics:
    """Per-weight quantities a user may want to see (``mergekit-ace inspect``)."""

    traces: list[float]
    gamma: float
    heterogeneous: bool
    eps_over_s: list[float]
    k: int
    sigma_iso: float | None = None
    #: the step-6 variant that ran: "add", "rescale", or "none" (also when no refinement applies)
    refinement: str = "add"
    #: precision of the products, and where the refinement's pairs came from:
    #: "float32", "float64", "float64 (SVD of F)" (or "of P" with rescale)
    precision: str = "float64"


def ace_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    epsilon: float = DEFAULTS["epsilon"],
    tau: float = DEFAULTS["tau"],
    k_frac: float = DEFAULTS["k_frac"],
    scale: float = DEFAULTS["scale"],
    refinement: str = DEFAULTS["refinement"],
    name: str | None = None,
    ids: Sequence[Hashable] | None = None,
    compute_dtype: torch.dtype = torch.float64,
    row_chunk: int | None = None,
    return_diagnostics: bool = False,
    strategy: str = ROW_CHUNKED,
    matmul_dtype=None,
    output_dtype: torch.dtype | None = None,
):
    """Merge one 2-D weight by ACE-Merging; returns W_0 + scale P in ``compute_dtype``.

    Memory, not the result, depends on ``row_chunk`` (rows of task vector processed at once) and
    ``strategy``:

    * ``"row_chunked"``: the experts' proxies S~_t (T x d_in^2) are kept and the task vectors
      stream through them block by block (for tall matrices);
    * ``"expert_streamed"``: one proxy at a time; the products are accumulated into one full-size
      Q = sum_t D_t S~_t (for wide matrices);
    * ``"row_recomputed"``: as ``"row_chunked"``, but F is recomputed for the refinement instead of
      kept (least memory);
    * ``"output_gram"``: as ``"expert_streamed"``, but no proxy is formed whole: each centred task
      vector's d_out x d_out Gram gives C_t S~_t = (C_t C_t^T) C_t / s_t (fewer flops for wide
      matrices, d_out < d_in / 2), and its upper blocks go straight into sum_t S~_t.

    All use N = sum_t C_t R_t = Q - 1 w^T + sum_t eps_t C_t with w = sum_t S~_t mu_t, and
    Res = Q - (sum_t D_t) Sbar.

    ``refinement`` selects step 6 in the heterogeneous branch: ``"add"`` (default; Eq. 19 as
    published and in the authors' code: P + sigma_iso U_k V_k^T with U, V of F), ``"rescale"``
    (P - U_k S_k V_k^T + mean(S_k) U_k V_k^T with U, S, V of P itself, the rescaling the paper's
    text describes) or ``"none"`` (the preliminary solution P).

    ``matmul_dtype`` is the precision of the O(d_out d_in^2) products (proxies, D_t S~_t, the Gram
    of F): ``None`` = ``compute_dtype``; ``"auto"`` = float32 where the precision contract for
    ``output_dtype`` (the dtype the caller stores the result in; ``None``: float64) holds, checked
    as the rule goes, float64 otherwise (:mod:`mergekit_ace.rules.precision`). The same contract
    decides whether the refinement's pairs come from a Gram or a full SVD. The factorisations, the
    solve's factor and every accumulation across experts stay in ``compute_dtype``. Inputs are
    never modified. With ``return_diagnostics`` returns ``(W, ACEDiagnostics)``.
    """
    check_inputs(base, experts, name=name, ids=ids, matrix_rule="ACE")
    params = ACEParameters(epsilon, tau, k_frac, scale, refinement)
    strategy = params.check(name, strategy)
    run = _Run(name, ids, compute_dtype, row_chunk, strategy, output_dtype)
    attempt = lambda mt, check: _ace(base, experts, params, replace(run, matmul_dtype=mt, check=check))  # noqa: E731
    W, diag = run_with_fallback(attempt, matmul_dtype, compute_dtype, name, output_dtype)
    return (W, diag) if return_diagnostics else W


@dataclass(frozen=True)
class _Run:
    """How one attempt of the rule runs (everything but the method's parameters)."""

    name: str | None
    ids: Sequence[Hashable] | None
    compute_dtype: torch.dtype  # the solve, the accumulators across experts, P
    row_chunk: int | None
    strategy: str
    output_dtype: torch.dtype | None  # what the caller stores W in: sets the precision contract
    matmul_dtype: torch.dtype | None = None  # the O(d_out d_in^2) products (run_with_fallback's choice)
    check: bool = False  # raise NeedsFloat64 where float32 products would break the contract

    @property
    def streamed(self) -> bool:
        """One proxy at a time, products summed into a full-size Q."""
        return self.strategy in (EXPERT_STREAMED, OUTPUT_GRAM)

    @property
    def gram_space(self) -> bool:
        return self.strategy == OUTPUT_GRAM

    @property
    def keep_F(self) -> bool:
        """F = P + Res kept for the refinement (else recomputed row block by row block)."""
        return self.strategy != ROW_RECOMPUTED

    @property
    def work_dtype(self) -> torch.dtype:
        """The d_in x d_in algebra (sums, M, its Cholesky factor) and the row-block accumulators:
        float64, or float32 while float32 products are being checked (their rounding, the factor's
        backward error u ||M||, is of the order of the float32 Grams', which the estimates cover)."""
        return self.matmul_dtype if self.check else self.compute_dtype


def _ace(base: torch.Tensor, experts: Sequence[torch.Tensor], params: ACEParameters, run: _Run):
    """The rule with products in ``run.matmul_dtype``, step by step; with ``run.check`` it raises
    NeedsFloat64 where those products are not accurate enough. Returns ``(W, ACEDiagnostics)``."""
    tv = TaskVectors(base, experts, run.matmul_dtype, run.row_chunk)
    branch = _branch_decision(tv, params, run)
    # The precision contract: ||W|| ~ ||W_0||, ||P|| ~ sqrt(sum_t ||D_t||^2) until they are known.
    budget = ErrorBudget(run.output_dtype, float(torch.linalg.vector_norm(base, dtype=torch.float64)), params.scale,
                         math.sqrt(sum(branch.traces)))
    proxies = _proxies(tv, branch, params.epsilon, run, budget)
    solver, S_bar = _prior_solver(proxies, branch, run, budget)
    rows = _RowProducts(tv, proxies, S_bar, run)
    P, F_all = _solve(tv, rows, proxies, solver, branch, run)
    del solver
    if run.keep_F or not branch.add:
        rows.release()
    sigma_iso, precision = _refine_step(P, F_all, rows, branch, run, budget)
    F_all = None
    rows.release()
    W = _result(P, base, params.scale, run, budget)
    diag = ACEDiagnostics(
        traces=branch.traces,
        gamma=branch.gamma,
        heterogeneous=branch.heterogeneous,
        eps_over_s=[params.epsilon / s for s in proxies.s_vals],
        k=branch.k,
        sigma_iso=sigma_iso,
        precision=precision,
        refinement=branch.refinement,
    )
    return W, diag


# --------------------------------------------------------------------------- the rule's steps
@dataclass(frozen=True)
class _Branch:
    """Step 1's outcome: the experts' energies ||D_t||_F^2 and row means mu_t, and the branch."""

    traces: list[float]
    mus: list[torch.Tensor]
    gamma: float
    heterogeneous: bool
    k: int  # the refinement's rank (0 in the homogeneous branch)
    refinement: str  # the step-6 variant that runs: "add", "rescale" or "none"

    @property
    def refine(self) -> bool:
        return self.refinement != "none"

    @property
    def add(self) -> bool:
        """Step 6 needs F = P + Res ("rescale" decomposes P itself)."""
        return self.refinement == "add"


def _branch_decision(tv: TaskVectors, params: ACEParameters, run: _Run) -> _Branch:
    """Step 1 (a cheap first pass): uncentred energies, row means, gamma and the branch."""
    traces, mus = tv.energies_and_means(run.compute_dtype)
    check_nonzero_task_vectors(traces, run.name, run.ids)
    gamma = heterogeneity(traces)
    het = is_heterogeneous(gamma, params.tau)
    k = int(math.floor(params.k_frac * min(tv.d_out, tv.d_in))) if het else 0
    refine = het and k > 0 and params.refinement != "none"
    if run.check and refine:
        # F's top-k subspace lies in its noise bulk for fine-tune-like updates: float32's error of F
        # can turn it by more than the contract allows (0.35 to ~10x the bf16 rounding measured,
        # docs/execution.md) and nothing before F tells which weights, so float64 at once.
        raise NeedsFloat64(f"the refinement's top-{k} singular subspace needs float64 products")
    return _Branch(traces, mus, gamma, het, k, params.refinement if refine else "none")


@dataclass
class _Proxies:
    """Steps 2-3's sums over experts. ``S_sum`` (sum_t S~_t) is handed on to the solver; the
    per-expert proxies ``S_tilde`` (row_chunked, row_recomputed) or ``Q`` = sum_t D_t S~_t
    (streamed strategies) are released once nothing reads them."""

    S_sum: torch.Tensor | None
    w: torch.Tensor  # sum_t S~_t mu_t
    S_tilde: list[torch.Tensor | None] | None
    Q: torch.Tensor | None
    eps_t: list[float]  # the ridges eps_t
    s_vals: list[float]  # s_t = tr S_t + 1e-12


def _proxies(tv: TaskVectors, branch: _Branch, epsilon: float, run: _Run, budget: ErrorBudget) -> _Proxies:
    """Steps 2-3, expert by expert: S~_t (kept, or folded into Q and dropped), sum_t S~_t and w.

    Float32 attempt: kappa(M) >= lambda_max(S~_t) / (tr M / d_in) is known after the first proxy,
    before its products; a weight it already rules out goes to float64 without the rest. The
    largest update goes first: its proxy, the least flattened by bf16 rounding noise, tends to give
    the largest lambda_max (float64 keeps the experts' order)."""
    T, d_out, d_in, dev = len(tv), tv.d_out, tv.d_in, tv.device
    mt, wd, het, mus = run.matmul_dtype, run.work_dtype, branch.heterogeneous, branch.mus
    S_sum = torch.zeros(d_in, d_in, dtype=wd, device=dev)
    w = torch.zeros(d_in, dtype=wd, device=dev)
    S_tilde: list[torch.Tensor | None] = [] if run.streamed else [None] * T
    eps_t: list[float] = [0.0] * T
    s_vals: list[float] = [0.0] * T
    Q = torch.zeros(d_out, d_in, dtype=run.compute_dtype, device=dev) if run.streamed else None
    if run.check:
        trace_bound = proxy_sum_trace_bound(branch.traces, mus, d_out, d_in, het, epsilon)
        order = expert_order(branch.traces)
    else:
        trace_bound, order = math.inf, range(T)
    kappa_bound = RunningConditionBound(trace_bound, d_in, "the covariance sum", T, budget.relative())
    # output_gram: the Grams' upper blocks are summed in the products' precision (S_sum's own dtype
    # except with unchecked float32 products), then symmetrised once.
    S_upper = (S_sum if wd == mt else torch.zeros(d_in, d_in, dtype=mt, device=dev)) if run.gram_space else None
    for t in order:
        if run.gram_space:
            s = _output_gram_step(tv, t, mus[t], het, S_upper, w, Q, kappa_bound, run.row_chunk)
        else:
            S = tv.gram(t, mus[t])  # S_t = C_t^T C_t
            s = float(torch.trace(S)) + TINY
            if het:
                S.div_(s)
            kappa_bound.add(S)
            S_sum += S
            w += (S @ mus[t].to(mt)).to(wd)
            if run.streamed:
                tv.add_products(Q, t, S)
                del S
            else:
                S_tilde[t] = S
        eps_t[t] = epsilon / s if het else epsilon
        s_vals[t] = s
    if run.gram_space:
        symmetrize_gram_(S_upper)
        if S_upper is not S_sum:
            S_sum += S_upper
        del S_upper
    return _Proxies(S_sum, w, S_tilde, Q, eps_t, s_vals)


def _prior_solver(proxies: _Proxies, branch: _Branch, run: _Run,
                  budget: ErrorBudget) -> tuple[PriorSolver, torch.Tensor | None]:
    """Step 4, the collective structural prior c, and step 5's solver for A = M + 1 c^T with
    M = sum_t R_t (formed in place of sum_t S~_t, which ``proxies`` gives up). Float32 attempt: a
    singular M, or one whose condition number breaks the contract, raises NeedsFloat64. Returns
    the solver and Sbar = M / T in the products' precision (only where step 6 needs F)."""
    c = collective_prior(proxies.S_sum, branch.traces, branch.heterogeneous)
    M = proxies.S_sum
    proxies.S_sum = None
    ridge = sum(proxies.eps_t)
    M.diagonal().add_(ridge)
    solver = PriorSolver(M, c, run.name, ridge=ridge, solve_dtype=run.matmul_dtype,
                         pseudo_inverse_fallback=not run.check)
    if run.check:
        if solver.singular:
            raise NeedsFloat64("the covariance sum is singular or not positive definite in float32")
        kappa = condition_number(M, solver.cholesky_factor)
        budget.charge(solve_error_estimate(kappa, solver.sherman_morrison_amplification()),
                      f"float32 products with the covariance sum's condition number ~{kappa:.1e}")
    # Sbar = M / T; the product (sum_t D_t) Sbar runs in matmul precision.
    S_bar = (M / len(proxies.eps_t)).to(run.matmul_dtype) if branch.add else None
    return solver, S_bar


class _RowProducts:
    """Row blocks of Q = sum_t D_t S~_t and of F = P + Res, as steps 5 and 6 read them."""

    def __init__(self, tv: TaskVectors, proxies: _Proxies, S_bar: torch.Tensor | None, run: _Run):
        self.tv, self.proxies, self.S_bar, self.run = tv, proxies, S_bar, run

    def q(self, rows: slice) -> torch.Tensor:
        """Q[rows] = sum_t D_t[rows] S~_t."""
        if self.run.streamed:
            return self.proxies.Q[rows]
        out = torch.zeros(rows.stop - rows.start, self.tv.d_in, dtype=self.run.work_dtype, device=self.tv.device)
        return self.tv.matmul_accumulate(out, rows, self.proxies.S_tilde)

    def F(self, rows: slice, q: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
        """F[rows] = P[rows] + Q[rows] - (sum_t D_t[rows]) Sbar  (uncentred D_t)."""
        F = q.clone() if self.run.streamed else q
        F -= self.tv.weighted_sum(rows, [1.0] * len(self.tv), self.run.matmul_dtype) @ self.S_bar
        F += P[rows]
        return F

    def release(self) -> None:
        """Drop the proxies, Q and Sbar (F, where kept in Q's place, stays with its holder)."""
        self.proxies.S_tilde = self.proxies.Q = self.S_bar = None


def _solve(tv: TaskVectors, products: _RowProducts, proxies: _Proxies, solver: PriorSolver, branch: _Branch,
           run: _Run) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step 5 over row blocks: P = N A^{-1} with N = Q - 1 w^T + sum_t eps_t C_t. F = P + Res is
    kept for step 6 (in Q's place when streamed, else in its own buffer in the products'
    precision), unless it is to be recomputed or not needed. Returns ``(P, F or None)``."""
    P = torch.empty(tv.d_out, tv.d_in, dtype=run.compute_dtype, device=tv.device)
    F_all = None
    if branch.add and run.keep_F:
        F_all = proxies.Q if run.streamed else torch.empty(tv.d_out, tv.d_in, dtype=run.matmul_dtype,
                                                           device=tv.device)
    for rows in tv.chunks():
        q = products.q(rows)
        N = q - proxies.w
        N += tv.weighted_sum(rows, proxies.eps_t, run.work_dtype, branch.mus)
        P[rows] = solver.solve(N)
        del N
        if F_all is not None:
            F_all[rows] = products.F(rows, q, P)
        del q
    return P, F_all


def _refine_step(P: torch.Tensor, F_all: torch.Tensor | None, products: _RowProducts, branch: _Branch,
                 run: _Run, budget: ErrorBudget) -> tuple[float | None, str]:
    """Step 6 in place on P, from the top-k pairs of F (add) or of P (rescale): eigh of the smaller
    Gram, or the SVD where the Gram's error would break the contract. Returns ``(sigma_iso or
    None, the precision label for the diagnostics)``."""
    precision = str(run.matmul_dtype).replace("torch.", "")
    if not branch.refine:
        return None, precision
    if not branch.add:
        F_rows = lambda rows: P[rows]  # noqa: E731
    elif run.keep_F:
        F_rows = lambda rows: F_all[rows]  # noqa: E731
    else:
        F_rows = lambda rows: products.F(rows, products.q(rows), P)  # noqa: E731
    sigma_iso, route = _refine(P, F_rows, branch.k, run.matmul_dtype, run.row_chunk, budget.remaining,
                               mode=branch.refinement)
    if route == "svd":
        precision = f"{precision} (SVD of {'F' if branch.add else 'P'})"
    return sigma_iso, precision


def _result(P: torch.Tensor, base: torch.Tensor, scale: float, run: _Run, budget: ErrorBudget) -> torch.Tensor:
    """Step 7: W = W_0 + scale P (in place on P); the float32 attempt's estimates are charged at the
    true ||W|| and ||P||."""
    update_norm = float(torch.linalg.vector_norm(P, dtype=torch.float64)) if run.check else 0.0
    W = P.mul_(scale)
    W += base
    check_finite_output(W, run.name, "ACE")
    if run.check:
        budget.settle(float(torch.linalg.vector_norm(W, dtype=torch.float64)), update_norm, "float32 products")
    return W
