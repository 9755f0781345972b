"""ACTMat: data-free RegMean with task-vector covariances, one weight matrix at a time.

Abdel Hameed, Tam, Notsawo, Raffel, Rabusseau (preprint). RegMean's layer-wise objective
min_W sum_t E||Wz - W_t z||^2 has the closed form
W^* = (sum_t W_t C_t)(sum_t C_t)^+ with C_t = E[zz^T]. ACTMat replaces the
input covariance by the task vector's Gram matrix C_t ~ D_t^T D_t (Thm. 3.1: under
(S)GD fine-tuning D_t^T D_t = eta^2 G_t^T G_t, aligned with the data covariance):

    W = W_0 A A^+ + scale * (sum_t D_t C_t) A^+, A = sum_t C_t

(using sum_t W_t C_t = W_0 A + sum_t D_t C_t). Where A is invertible this is
W_0 + sum_t D_t C_t A^-1. Where A is singular, the literal minimum-norm solution keeps only
W_0 A A^+, zeroing the base outside A's range; the default (``keep_base=True``) keeps
W_0 there: W = W_0 + scale*(sum_t D_t C_t) A^+.

The pseudo-inverse comes from a symmetric eigendecomposition of A with the cutoff
lambda_i > rcond * lambda_max. ``solve="truncated"`` (the default) takes the cutoff the ACTMat
authors' code ran, a float32 ``torch.linalg.pinv(A)`` at its default tolerance: eigenvalues at or
below max(m, n) eps_32 lambda_max are dropped, with m = n = d_in for the d_in x d_in A
(:func:`truncated_rcond`, about 1e-3 for d_in = 8192); the arithmetic is ours (float64
factorisations; float32 products only where the precision contract allows). ``solve="exact"``
takes ``rcond``, defaulting to ``PINV_RTOL`` = 1e-10 (float64 Gram noise is ~1e-13 relative;
directions below the cutoff count as outside A's range). Where every eigenvalue clears the cutoff
by a margin (A^+ = A^-1) a Cholesky solve gives the same result for a fraction of the cost
(:func:`range_solver`). Which serves better: docs/methods.md, "The papers' solve".

Per-expert weights (``weights``, w_t > 0) turn the sums into A = sum_t w_t C_t and
N = sum_t w_t D_t C_t; WUDI-Merging is this kernel with w_t = 1/||D_t||_F^2
(:mod:`mergekit_ace.rules.wudi`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from mergekit_ace.errors import MergeInputError
from mergekit_ace.rules.checks import (
    check_finite_output,
    check_inputs,
    check_nonzero_task_vectors,
    check_parameter,
    describe,
)
from mergekit_ace.rules.linalg import (
    PINV_RTOL,
    accumulate_gram,
    add_gram_,
    add_left_product_,
    cholesky_right_solve,
    output_gram,
    symmetrize_gram_,
)
from mergekit_ace.rules.precision import (
    AUTO,
    NULL_MARGIN,
    TRACE_SLACK,
    ErrorBudget,
    NeedsFloat64,
    RunningConditionBound,
    expert_order,
    extreme_eigenvalues,
    run_with_fallback,
    solve_error_estimate,
)
from mergekit_ace.rules.task_vectors import (
    EXPERT_STREAMED,
    OUTPUT_GRAM,
    ROW_CHUNKED,
    TaskVectors,
    check_strategy,
)

#: ``solve`` defaults to the papers' truncation: what the ACTMat code ran, and on the study's bf16
#: checkpoints at least as good as the exact solve on most seeds (docs/methods.md, "The papers' solve").
DEFAULTS = dict(scale=1.0, keep_base=True, rcond=None, solve="truncated")

#: ``solve`` values: the exact solve (pseudo-inverse cutoff ``rcond``, default PINV_RTOL) or the
#: ACTMat code's truncated pseudo-inverse (cutoff :func:`truncated_rcond`).
EXACT, TRUNCATED = "exact", "truncated"
SOLVES = (EXACT, TRUNCATED)


def truncated_rcond(d_in: int) -> float:
    """Relative eigenvalue cutoff of ``torch.linalg.pinv`` on a float32 d_in x d_in matrix at its
    default tolerance: max(m, n) eps_32 = d_in * 2^-23."""
    return d_in * torch.finfo(torch.float32).eps


def solve_cutoff(solve: str, rcond: float | None, d_in: int, name: str | None = None) -> float | None:
    """The pseudo-inverse cutoff for ``solve`` ("exact": ``rcond``; "truncated":
    :func:`truncated_rcond`, which an explicit ``rcond`` would contradict)."""
    if solve not in SOLVES:
        raise MergeInputError(f"{describe(name)}: parameter solve={solve!r} must be one of {SOLVES}")
    if solve == TRUNCATED:
        if rcond is not None:
            raise MergeInputError(f"{describe(name)}: parameter rcond={rcond!r} is the exact solve's cutoff and "
                                  f"cannot be combined with solve='truncated' (ACTMat's default, whose cutoff is "
                                  f"d_in * eps_float32): add solve: exact to use rcond")
        return truncated_rcond(d_in)
    return rcond


def task_covariance(delta: torch.Tensor, row_chunk: int | None = None) -> torch.Tensor:
    """C_t = D_t^T D_t (d_in x d_in), accumulated over row blocks."""
    d_out, d_in = delta.shape
    return accumulate_gram(lambda rows: delta[rows], d_out, d_in, delta.dtype, delta.device, row_chunk)[0]


def _cutoff(evals: torch.Tensor, rcond: float | None) -> tuple[float, float]:
    """(lambda_max, the pseudo-inverse's cutoff rcond lambda_max); rcond defaults to PINV_RTOL."""
    top = float(evals.max()) if evals.numel() else 0.0
    return top, (PINV_RTOL if rcond is None else rcond) * top


def _above_cutoff(evals: torch.Tensor, rcond: float | None) -> torch.Tensor:
    """Mask of the eigenvalues kept by the pseudo-inverse: lambda_i > rcond lambda_max."""
    top, cut = _cutoff(evals, rcond)
    return evals > cut if top > 0 else torch.zeros_like(evals, dtype=torch.bool)


@dataclass
class SymmetricPseudoInverse:
    """A^+ = Q_r Lambda_r^-1 Q_r^T from ``eigh(A)``, keeping
    lambda_i > rcond lambda_max; also the range projector AA^+ = Q_rQ_r^T."""

    Q: torch.Tensor  # kept eigenvectors (d_in x r)
    inv_eigvals: torch.Tensor  # (r,)
    rank: int
    #: lambda_max / lambda_min over the kept eigenvalues (the conditioning of what is solved)
    condition: float = math.inf
    #: min_i |lambda_i - rcond lambda_max| / lambda_max over all eigenvalues: how far the cutoff's
    #: decision is from flipping (``of`` only)
    cutoff_gap: float = math.inf

    @classmethod
    def of(cls, A: torch.Tensor, rcond: float | None = None) -> SymmetricPseudoInverse:
        evals, evecs = torch.linalg.eigh(A)
        keep = _above_cutoff(evals, rcond)
        kept = evals[keep]
        top, cut = _cutoff(evals, rcond)
        condition = top / float(kept.min()) if kept.numel() and top > 0 else math.inf
        gap = float((evals - cut).abs().min()) / top if top > 0 else 0.0
        return cls(Q=evecs[:, keep], inv_eigvals=1.0 / kept, rank=int(keep.sum()), condition=condition,
                   cutoff_gap=gap)

    @classmethod
    def of_gram(cls, X: torch.Tensor, K: torch.Tensor, rcond: float | None = None) -> SymmetricPseudoInverse:
        """The same for A = X^TX from the small Gram K = XX^T (rows of X fewer than
        its columns): Au = lambda u with u = X^Tv/sqrt lambda for each eigenpair
        Kv = lambda v, so only K is decomposed; same cutoff."""
        evals, evecs = torch.linalg.eigh(K)
        keep = _above_cutoff(evals, rcond)
        lam = evals[keep]
        return cls(Q=(X.T @ evecs[:, keep]) / lam.sqrt(), inv_eigvals=1.0 / lam, rank=int(keep.sum()))

    def apply(self, N: torch.Tensor) -> torch.Tensor:
        """N A^+ for a block of rows (in the factors' dtype)."""
        return ((N.to(self.Q.dtype) @ self.Q) * self.inv_eigvals) @ self.Q.T

    def project(self, W: torch.Tensor) -> torch.Tensor:
        """W A A^+ (W's rows projected on A's range)."""
        return (W @ self.Q) @ self.Q.T


@dataclass
class CholeskySolve:
    """N A^-1 for an SPD A through its Cholesky factor (``solve_dtype`` for the triangular
    solves); AA^-1 = I, so :meth:`project` is the identity."""

    factor: torch.Tensor
    rank: int

    def apply(self, N: torch.Tensor) -> torch.Tensor:
        return cholesky_right_solve(N.to(self.factor.dtype), self.factor)

    def project(self, W: torch.Tensor) -> torch.Tensor:
        return W


#: Cholesky is used only when the estimated smallest eigenvalue clears the pseudo-inverse cutoff by
#: this factor. The estimate errs high (and that of lambda_max low), but not by 10x: after 20
#: steps of inverse iteration from random probes, an eigenvalue at or below the cutoff outweighs
#: every one above 10x the cutoff by 10^40 in the Rayleigh quotient. A margin of 1e3 sent the
#: 3B-shaped down_proj (lambda_min ~ 6e-8 lambda_max) to a full 8192 x 8192 float64 eigh,
#: 4.4x slower for the same result (2.9e-9 relative; benchmarks/RESULTS.md).
CHOLESKY_MARGIN = 10.0


def range_solver(A: torch.Tensor, rcond: float | None = None, solve_dtype: torch.dtype | None = None,
                 require_invertible: bool = False):
    """``(solver, kappa)`` for N -> NA^+: a :class:`CholeskySolve` when A is clearly
    invertible at the cutoff (estimated lambda_min > 10 rcond lambda_max),
    else the :class:`SymmetricPseudoInverse` (kappa = inf), or :class:`NeedsFloat64` with
    ``require_invertible`` (before the costly eigendecomposition)."""
    rcond = PINV_RTOL if rcond is None else rcond
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) == 0:
        lam_min, lam_max = extreme_eigenvalues(A, L, dtype=torch.float64)
        if lam_min > CHOLESKY_MARGIN * rcond * lam_max > 0:
            return CholeskySolve(L.to(solve_dtype or A.dtype), A.shape[0]), lam_max / lam_min
    if require_invertible:
        raise NeedsFloat64("sum_t C_t is singular")
    return SymmetricPseudoInverse.of(A, rcond), math.inf


@dataclass
class ACTMatDiagnostics:
    traces: list[float]
    rank: int
    d_in: int
    #: precision of the Gram and numerator products ("float32" or "float64")
    precision: str = "float64"


def actmat_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    keep_base: bool = True,
    rcond: float | None = None,
    name: str | None = None,
    ids: Sequence[Hashable] | None = None,
    compute_dtype: torch.dtype = torch.float64,
    row_chunk: int | None = None,
    return_diagnostics: bool = False,
    strategy: str = ROW_CHUNKED,
    matmul_dtype=None,
    output_dtype: torch.dtype | None = None,
    solve: str = DEFAULTS["solve"],
    weights: Sequence[float] | None = None,
    keep_start: bool = False,
):
    """Merge one 2-D weight by ACTMat; returns W in ``compute_dtype`` (see the module docstring).

    ``solve="truncated"``: the ACTMat code's pseudo-inverse cutoff (:func:`truncated_rcond`) instead
    of the exact solve. ``weights``: per-expert w_t > 0 in A and N (default all 1).
    ``keep_start``: add scale * S(I - AA^+) with S = sum_t D_t, the part
    of the task vectors' sum outside A's (kept) range, which an iterative solver started from S
    leaves unchanged (zero in exact arithmetic unless a cutoff drops directions; used by WUDI).

    ``keep_base=False`` gives the paper-literal minimum-norm solution
    (sum_t W_t C_t)(sum_t C_t)^+ (with ``scale`` on the task-vector term).

    Memory, not the result, depends on ``row_chunk`` and ``strategy``: ``"row_chunked"`` keeps the T
    Gram matrices C_t and forms the numerator N = sum_t D_t C_t one row block at a
    time (tall matrices); ``"expert_streamed"`` keeps one C_t at a time and accumulates N
    full-size (wide matrices); ``"output_gram"`` forms no C_t: A gets each task vector's Gram
    directly and D_tC_t = (D_tD_t^T)D_t comes from the d_out x d_out Gram (fewer flops where
    d_out < d_in / 2). ``matmul_dtype`` is the precision of the Gram and numerator
    products: ``None`` = ``compute_dtype``; ``"auto"`` = float32 when A is invertible and well
    conditioned enough for the precision contract of ``output_dtype`` (the dtype the caller stores
    the result in; ``None``: float64; :mod:`mergekit_ace.rules.precision`), float64 otherwise. The sums
    and the factorisation use ``compute_dtype``. Without a ridge, A's small eigenvalues are only as
    accurate as those products, so a singular or ill-conditioned A always gets float64 products.
    """
    check_inputs(base, experts, name=name, ids=ids, matrix_rule="ACTMat")
    check_parameter(name, "scale", scale)
    if rcond is not None:
        check_parameter(name, "rcond", rcond, low=0.0, high=1.0)
    rcond = solve_cutoff(solve, rcond, base.shape[1], name)
    if weights is not None:
        if len(weights) != len(experts):
            raise MergeInputError(f"{describe(name)}: {len(weights)} weights for {len(experts)} experts")
        for w in weights:
            check_parameter(name, "weight", w, low=0.0)
            if not w > 0:
                raise MergeInputError(f"{describe(name)}: expert weights must be positive, got {w!r}")
    strategy = check_strategy(strategy, name)
    if len(experts) * base.shape[0] <= base.shape[1] and matmul_dtype == AUTO:
        matmul_dtype = None  # rank(A) <= T d_out <= d_in: A is singular or nearly so, float64 it is
    args = (base, experts, scale, keep_base, rcond, name, ids, compute_dtype, row_chunk, strategy, output_dtype)
    truncated = solve == TRUNCATED
    W, diag = run_with_fallback(lambda mt, check: _actmat(*args, mt, check=check, weights=weights,
                                                          keep_start=keep_start, truncated=truncated),
                                matmul_dtype, compute_dtype, name, output_dtype)
    return (W, diag) if return_diagnostics else W


def _actmat(base, experts, scale, keep_base, rcond, name, ids, dt, row_chunk, strategy, output_dtype, mt, check,
            weights=None, keep_start=False, truncated=False):
    """The rule with products in ``mt``; ``check``: raise NeedsFloat64 when mt is not accurate enough;
    ``weights``/``keep_start``: see :func:`actmat_merge`; ``truncated``: ``rcond`` is the papers'
    cutoff (``solve="truncated"``), which caps the conditioning of what is solved at 1 / rcond."""
    gram_space = strategy == OUTPUT_GRAM
    streamed = strategy in (EXPERT_STREAMED, OUTPUT_GRAM)
    T = len(experts)
    d_out, d_in = base.shape
    dev = base.device
    tv = TaskVectors(base, experts, mt, row_chunk)
    ws = [1.0] * T if weights is None else [float(w) for w in weights]
    if T * d_out <= d_in:
        return _actmat_wide(tv, base, scale, keep_base, rcond, name, ids, dt, ws, keep_start)

    # A = sum_t C_t, C_t = D_t^T D_t, expert by expert; C_t kept (row_chunked) or folded into N.
    covs: list[torch.Tensor] = [] if streamed else [None] * T
    traces: list[float] = [0.0] * T
    A = torch.zeros(d_in, d_in, dtype=dt, device=dev)
    N = torch.zeros(d_out, d_in, dtype=dt, device=dev) if streamed else None
    # float32 attempt: kappa(A) >= lambda_max(C_t) / (tr A / d_in), tr A = sum_t ||D_t||^2 (one cheap
    # pass), rules float32 out after the first Gram where it can, before the other Grams and
    # products; the largest update first (precision.expert_order).
    # The precision contract: ||W|| ~ ||W_0||, ||P|| ~ sqrt(sum_t ||D_t||^2) until they are known.
    if check:
        raw = tv.energies_and_means(dt, means=False)[0]  # ||D_t||^2
        energies = [w * e for w, e in zip(ws, raw)]  # tr w_t C_t
        trace_bound, order = TRACE_SLACK * sum(energies), expert_order(energies)
        budget = ErrorBudget(output_dtype, float(torch.linalg.vector_norm(base, dtype=torch.float64)), scale,
                             math.sqrt(sum(raw)))
        tolerance = budget.relative()
        if truncated:
            # The cutoff keeps only lambda_i > rcond lambda_max: the solve's conditioning is at most
            # 1 / rcond whatever A's, so no early give-up on kappa(A); only the cutoff's own decision
            # is checked, after the decomposition (_check_cutoff_decision).
            if solve_error_estimate(1.0 / rcond) > tolerance:
                raise NeedsFloat64(f"the truncated solve's conditioning (up to {1.0 / rcond:.1e})")
            trace_bound = math.inf
    else:
        trace_bound, order, tolerance = math.inf, range(T), math.inf
    kappa_bound = RunningConditionBound(trace_bound, d_in, "sum_t C_t", T, tolerance)
    A_upper = (A if mt == dt else torch.zeros(d_in, d_in, dtype=mt, device=dev)) if gram_space else None
    # output_gram's float32 attempt forms the products D_t C_t = K_t D_t only once A passed its
    # condition check: a nearly square stacked system (T d_out just above d_in, the 3B/7B down_proj)
    # then costs the Grams, not the whole float32 pass, before the float64 one.
    grams_out: list[torch.Tensor | None] = [None] * T
    for t in order:
        if gram_space:
            # No d_in x d_in C_t: its upper blocks go straight into A, and D_t C_t = (D_t D_t^T) D_t
            # from the d_out x d_out Gram, whose nonzero eigenvalues are C_t's (for the bound).
            D = tv.whole(t)
            traces[t] = float(torch.linalg.vector_norm(D, dtype=torch.float64) ** 2)
            if ws[t] != 1.0:  # sqrt(w_t) D_t: A gets w_t C_t, K = w_t D_t D_t^T, N += K D_t (alpha undoes one sqrt)
                D *= math.sqrt(ws[t])
            K = output_gram(D)
            kappa_bound.add(K)
            add_gram_(A_upper, D)
            if check:  # the products wait for the condition check (below): K_t kept, T d_out^2 numbers
                grams_out[t] = K
            else:
                add_left_product_(N, K, D, alpha=1.0 / math.sqrt(ws[t]), row_chunk=row_chunk)
            del D, K
            continue
        C = tv.gram(t)
        traces[t] = float(torch.trace(C))
        if ws[t] != 1.0:
            C *= ws[t]  # w_t C_t, in A and in N
        kappa_bound.add(C)
        A += C
        if streamed:
            tv.add_products(N, t, C)
            del C
        else:
            covs[t] = C
    if gram_space:
        symmetrize_gram_(A_upper)
        if A_upper is not A:
            A += A_upper
        del A_upper
    check_nonzero_task_vectors(traces, name, ids)
    pinv, kappa = range_solver(A, rcond, solve_dtype=mt, require_invertible=check and not truncated)
    if check and isinstance(pinv, SymmetricPseudoInverse):  # the truncated solve dropped directions
        _check_cutoff_decision(pinv, A, tv.base, tv.experts, ws, row_chunk)
        kappa = pinv.condition
    del A
    if check:
        budget.charge(solve_error_estimate(kappa), f"float32 products with sum_t C_t's condition number ~{kappa:.1e}")
    if gram_space and check:
        for t in order:
            D = tv.whole(t)
            add_left_product_(N, grams_out[t], D, row_chunk=row_chunk)  # K_t = w_t D_t D_t^T: N += w_t D_t C_t
            grams_out[t] = None
            del D

    # W = W0 (or W0 A A^+) + scale N A^+, one row block at a time (in N's place when streamed).
    # Tall weights with the C_t kept (d_out > T d_in): N A^+ = sum_t D_t (C_t A^+), solving for the
    # T d_in x d_in blocks G_t = C_t A^+ once instead of for every row of N.
    per_expert = not streamed and d_out > T * d_in
    if per_expert:
        covs = [pinv.apply(C).to(mt) for C in covs]
    W = N if streamed else torch.empty(d_out, d_in, dtype=dt, device=dev)
    update_sq = 0.0
    for rows in tv.chunks():
        if streamed:
            num = N[rows]
        else:
            num = tv.matmul_accumulate(torch.zeros(rows.stop - rows.start, d_in, dtype=dt, device=dev), rows, covs)
        update = num if per_expert else pinv.apply(num).to(dt)
        del num
        if keep_start and not isinstance(pinv, CholeskySolve):  # A^+ = A^-1: nothing outside A's range
            update += _start_outside_range(tv, rows, pinv, dt)
        if check:
            update_sq += float(torch.linalg.vector_norm(update, dtype=torch.float64)) ** 2
        update *= scale
        update += base[rows] if keep_base else pinv.project(base[rows].to(dt))
        W[rows] = update
        del update
    del covs
    check_finite_output(W, name, "ACTMat")
    if check:  # the estimates, charged at the true ||W|| and ||P||
        budget.settle(float(torch.linalg.vector_norm(W, dtype=torch.float64)), math.sqrt(update_sq),
                      "float32 products")
    return W, ACTMatDiagnostics(traces=traces, rank=pinv.rank, d_in=d_in, precision=str(mt).replace("torch.", ""))


#: Random probes of :func:`gram_error_estimate`.
GRAM_ERROR_PROBES = 4


def gram_error_estimate(A: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor], weights: Sequence[float],
                        row_chunk: int | None = None, probes: int = GRAM_ERROR_PROBES, seed: int = 0) -> float:
    """An estimate of ||A - A_exact||_2 for A = sum_t w_t D_t^T D_t formed from lower-precision
    products: the largest ||(A - A_exact) v|| / ||v|| over a few random v, with A_exact v =
    sum_t w_t D_t^T (D_t v) in float64 (2 T d_out d_in multiply-adds per probe, against the Gram's
    T d_out d_in^2 / 2). A lower bound on the norm; the caller adds the safety margin."""
    d_in = A.shape[0]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    V = torch.randn(d_in, probes, generator=gen, dtype=torch.float64).to(A.device)
    exact = torch.zeros_like(V)
    tv = TaskVectors(base, experts, torch.float64, row_chunk)
    for t in range(len(experts)):
        for rows in tv.chunks():
            D = tv.block(t, rows)
            exact.addmm_(D.T, D @ V, alpha=float(weights[t]))
    diff = A.to(torch.float64) @ V - exact
    return float((diff.norm(dim=0) / V.norm(dim=0)).max())


def _check_cutoff_decision(pinv: SymmetricPseudoInverse, A: torch.Tensor, base, experts, ws, row_chunk) -> None:
    """Raise NeedsFloat64 unless every eigenvalue of A (from lower-precision products) is further from
    the truncation's cutoff than NULL_MARGIN times the products' error (Weyl: each eigenvalue moves by
    at most ||A - A_exact||_2), so that the exact A would keep and drop the same directions."""
    lambda_max = 1.0 / float(pinv.inv_eigvals.min()) if pinv.rank else 0.0
    error = gram_error_estimate(A, base, experts, ws, row_chunk) / lambda_max if lambda_max > 0 else math.inf
    if not pinv.cutoff_gap > NULL_MARGIN * error:
        raise NeedsFloat64(f"the truncated solve's cutoff: an eigenvalue {pinv.cutoff_gap:.1e} lambda_max from it, "
                           f"within {NULL_MARGIN:g}x the products' error ({error:.1e} lambda_max)")


def _start_outside_range(tv, rows: slice, pinv, dt) -> torch.Tensor:
    """S(I - AA^+) for a block of rows, S = sum_t D_t."""
    S = tv.weighted_sum(rows, [1.0] * len(tv), dt)
    S -= pinv.project(S)
    return S


def _actmat_wide(tv, base, scale, keep_base, rcond, name, ids, dt, ws=None, keep_start=False):
    """ACTMat for a weight with T d_out <= d_in (A is singular, or nearly so when
    equal): everything in the space of the stacked task vectors X = [D_1; ...; D_T]
    (T d_out x d_in), whose Gram K = XX^T is no larger than A. A^+ from K (:meth:`SymmetricPseudoInverse.of_gram`), and
    D_tC_t = (D_tD_t^T)D_t with D_tD_t^T the t-th diagonal block of K. Same result
    as the d_in x d_in route; (d_in / T d_out)^3 less eigendecomposition work, and d_out/d_in of
    the numerator's."""
    T = len(tv)
    d_out, d_in = base.shape
    whole = slice(0, d_out)
    ws = [1.0] * T if ws is None else ws
    X = torch.cat([tv.block(t, whole).to(dt) for t in range(T)])
    traces = [float(X[t * d_out:(t + 1) * d_out].square().sum()) for t in range(T)]
    check_nonzero_task_vectors(traces, name, ids)
    S = X.view(T, d_out, d_in).sum(dim=0) if keep_start else None
    for t in range(T):  # rows sqrt(w_t) D_t: X^T X = sum_t w_t C_t
        if ws[t] != 1.0:
            X[t * d_out:(t + 1) * d_out] *= math.sqrt(ws[t])
    K = X @ X.T
    pinv = SymmetricPseudoInverse.of_gram(X, K, rcond)
    N = torch.zeros(d_out, d_in, dtype=dt, device=base.device)
    for t in range(T):  # w_t D_t C_t = (w_t D_t D_t^T)(sqrt(w_t) D_t) / sqrt(w_t)
        rows = slice(t * d_out, (t + 1) * d_out)
        N.addmm_(K[rows, rows], X[rows], alpha=1.0 / math.sqrt(ws[t]))
    del X, K
    W = pinv.apply(N)
    del N
    if keep_start:
        W += S
        W -= pinv.project(S)
        del S
    W *= scale
    W += base if keep_base else pinv.project(base.to(dt))
    check_finite_output(W, name, "ACTMat")
    return W, ACTMatDiagnostics(traces=traces, rank=pinv.rank, d_in=d_in, precision=str(dt).replace("torch.", ""))


def covariance_alignment(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise cosine <C_s, C_t>_F / (||C_s||_F||C_t||_F) of the experts'
    covariance estimates C_t = D_t^T D_t (T x T); ACTMat assumes they are nearly aligned
    up to scale."""
    covs = [task_covariance(d) for d in deltas]
    flat = torch.stack([c.flatten() for c in covs])
    norms = flat.norm(dim=1).clamp_min(1e-300)
    return (flat @ flat.T) / torch.outer(norms, norms)
