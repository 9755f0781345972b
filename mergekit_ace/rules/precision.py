"""Which precision the O(d_out d_in^2) products may use, decided from the conditioning.

The rules' results are float64. Their matrix products (Gram matrices, D_t S~_t,
D_t C_t, the Gram of F) are 2x cheaper in float32 on a CPU (and 30-60x on consumer GPUs),
but a float32 product carries a relative error of about u = 2^-24 that the rest of the
rule can amplify:

* the solve with M (ACE, M= sum_t R_t) or A= sum_t C_t (ACTMat) by up to
  its condition number kappa; measured on 128-2048 wide synthetic layers, the error of
  float32 Grams and products stays below u max(kappa, 10sqrt kappa);
* ACE's refinement, wherever its products ran: the top-k pairs come from an eigendecomposition of
  F's smaller Gram, whose rounding E (||E||~ u lambda_1) turns the pairs by
  E_ij/(lambda_i- lambda_j); only pairs with different refinement coefficients matter,
  so the term moves by about ||E||sqrt(k) max(sigma_iso/2 sigma_min^2,
  sigma_i|c_i|/(lambda_i- lambda_out)) (:func:`refinement_error_estimate`); where that exceeds
  what the contract leaves, F's full SVD is taken instead.

``matmul_dtype="auto"`` (the executor's default) holds the merge to a contract stated from the
output: the merged weight, stored in ``output_dtype`` (bf16 for most checkpoints), is as close to
the exact merge of its inputs as storing it allows. Storing W in a dtype of unit roundoff
u_out moves it by rho = 0.4247 u_out||W||_F (:func:`storage_rounding_error`);
the computation may add at most :data:`CONTRACT_FRACTION` = 0.3 of that, so the error of the stored
result grows by at most sqrt(1 + 0.3^2) - 1 < 5% (:class:`ErrorBudget`). Products run in
float32 (and, in ACE, the d_in x d_in sums and the Cholesky factor, whose backward error is of the
same order) where the estimates above, in units of ||W|| and the output dtype, stay within
that budget, checked as soon as the quantities they need exist (a lower bound of
kappa after the first Gram, :func:`condition_lower_bound`; kappa right after the
Gram matrices; the merged update's norm once it exists); where they do not, the weight is
recomputed in float64. A float32 or float64 output leaves no room for float32 products
(0.3 rho is below float32's own rounding): such weights use float64 from the start, and so
does ACE's refinement (its top-k singular subspace lies in F's noise bulk for fine-tune-like
updates, where float32's error of F can move it by more than the contract allows: 0.35 and up to
~10x the bf16 rounding measured, docs/execution.md). The contract and its
derivation are in ``docs/execution.md``; the estimates are checked against float64 references in
``tests/test_precision.py``.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from mergekit_ace.rules.checks import describe
from mergekit_ace.rules.linalg import cholesky_solve

LOG = logging.getLogger(__name__)
R = TypeVar("R")

#: Unit roundoff of float32.
UNIT_ROUNDOFF_FLOAT32 = 2.0 ** -24
#: The contract: the computation may add at most this fraction of the output's own storage
#: rounding error (independent errors add in squares: the stored result's error grows by < 5 %).
CONTRACT_FRACTION = 0.3
#: Root-mean-square rounding error of storing a value x in a binary floating-point format, in units
#: of u|x| (u = unit roundoff): the error is uniform within half a spacing, 2u 2^e for
#: |x| = m 2^e, m in [1, 2), so E[err^2] = (2u)^2 / 12 E[|x|^2 / m^2]; with mantissas spread as in
#: data covering many binades (density 1 / (m ln 2)), E[m^-2] = 3 / (8 ln 2) and the factor is
#: sqrt(E[m^-2] / 3) = 0.4247 (measured 0.423-0.425 on Gaussian weights; the worst case, m = 1,
#: is 1/sqrt(3)).
ROUNDING_RMS_FACTOR = math.sqrt(3.0 / (8.0 * math.log(2.0)) / 3.0)
#: The value of ``matmul_dtype`` that asks for the decision described above.
AUTO = "auto"


_recomputed = 0
_recomputed_lock = threading.Lock()
_this_thread = threading.local()  # .recomputed: the same count for the calling thread only
_counts_lock = threading.Lock()
_precision_counts: Counter = Counter()


def float64_recompute_count() -> int:
    """How many weights this process recomputed with float64 products after a float32 attempt."""
    return _recomputed


def record_precision(products: torch.dtype) -> None:
    """Count one merged weight under the precision its products ended in."""
    with _counts_lock:
        _precision_counts[str(products).replace("torch.", "")] += 1


def precision_counts() -> dict:
    """``{"float32": n, "float64": m, ...}``: the weights this process merged, by the precision of
    their products (with :func:`float64_recompute_count` of the float64 ones after an attempt)."""
    with _counts_lock:
        return dict(_precision_counts)


def thread_float64_recompute_count() -> int:
    """:func:`float64_recompute_count` for the calling thread only: whether a call recomputed is
    the change of this count around it, whatever other threads (``--multi-gpu``) do meanwhile."""
    return getattr(_this_thread, "recomputed", 0)


class NeedsFloat64(Exception):
    """Raised inside a rule when float32 products are estimated to be too inaccurate for a weight;
    the rule catches it and recomputes that weight with float64 products."""


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of a floating dtype (half its machine epsilon): 2^-8 for bfloat16."""
    return torch.finfo(dtype).eps / 2.0


def storage_rounding_error(norm: float, dtype: torch.dtype) -> float:
    """Expected ||fl(W) - W||_F of storing a matrix of Frobenius norm ``norm`` in
    ``dtype``: 0.4247 u ||W||_F (:data:`ROUNDING_RMS_FACTOR`)."""
    return ROUNDING_RMS_FACTOR * unit_roundoff(dtype) * norm


def float32_products_can_serve(output_dtype: torch.dtype | None) -> bool:
    """Whether the contract for ``output_dtype`` leaves room for float32 products at all: only for
    outputs coarser than float32 (bfloat16, float16). ``None`` means a float64 result."""
    return output_dtype is not None and unit_roundoff(output_dtype) > UNIT_ROUNDOFF_FLOAT32


class ErrorBudget:
    """The contract for one weight: the absolute (Frobenius) error the computation may add to the
    merged update P of W = W_0 + scale * P,
    0.3 rho(W) / |scale| with rho the storage rounding of W in
    ``output_dtype`` (``None``: float64). ``base_norm`` stands for ||W|| and
    ``update_norm`` for ||P|| until the rule knows them (:meth:`settle`); relative error
    estimates are charged at ||P||."""

    def __init__(self, output_dtype: torch.dtype | None, base_norm: float, scale: float, update_norm: float):
        self.output_dtype = output_dtype if output_dtype is not None else torch.float64
        self.scale = abs(float(scale))
        self.update_norm = float(update_norm)
        self.spent = 0.0
        self._set_norm(float(base_norm))

    def _set_norm(self, weight_norm: float) -> None:
        rounding = CONTRACT_FRACTION * storage_rounding_error(weight_norm, self.output_dtype)
        self.allowed = math.inf if self.scale == 0 else rounding / self.scale

    @property
    def remaining(self) -> float:
        return max(self.allowed - self.spent, 0.0)

    def relative(self) -> float:
        """The relative error of P the whole budget stands for (at the current norm of P)."""
        return self.allowed / self.update_norm if self.update_norm > 0 else math.inf

    def remaining_relative(self) -> float:
        """What is left of the budget, as a relative error of P."""
        return self.remaining / self.update_norm if self.update_norm > 0 else math.inf

    def charge(self, relative_error: float, what: str) -> None:
        """Spend ``relative_error * ||P||``; raise :class:`NeedsFloat64` if it exceeds the budget."""
        error = relative_error * self.update_norm
        if not error <= self.allowed - self.spent:
            raise NeedsFloat64(f"{what}: estimated error {error:.1e} of the merged update exceeds the "
                               f"contract's {self.allowed - self.spent:.1e} (0.3 of the {self.output_dtype} "
                               f"rounding of the result)")
        self.spent += error

    def settle(self, weight_norm: float, update_norm: float, what: str) -> None:
        """Re-check what was spent once the true norms of W and P are known (the estimates used
        ``base_norm`` and the update-norm guess)."""
        relative_spent = self.spent / self.update_norm if self.update_norm > 0 else 0.0
        self.update_norm, self.spent = float(update_norm), 0.0
        self._set_norm(float(weight_norm))
        self.charge(relative_spent, what)


def resolve_matmul_dtype(matmul_dtype, compute_dtype: torch.dtype,
                         output_dtype: torch.dtype | None = None) -> tuple[torch.dtype, bool]:
    """``(dtype of the first attempt, whether to check it)`` for a rule's ``matmul_dtype`` argument:
    ``"auto"`` -> float32 with checks (only when computing in float64 for an output coarser than
    float32, :func:`float32_products_can_serve`), else the compute dtype; ``None`` -> compute dtype."""
    if isinstance(matmul_dtype, str):
        if matmul_dtype != AUTO:
            dtype = getattr(torch, matmul_dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"matmul_dtype must be 'auto', 'float32' or 'float64', got {matmul_dtype!r}")
            return dtype, False
        if compute_dtype == torch.float64 and float32_products_can_serve(output_dtype):
            return torch.float32, True
        return compute_dtype, False
    return (matmul_dtype or compute_dtype), False


def run_with_fallback(rule: Callable[[torch.dtype, bool], R], matmul_dtype, compute_dtype: torch.dtype,
                      name: str | None = None, output_dtype: torch.dtype | None = None) -> R:
    """``rule(products dtype, check)``: with ``"auto"``, first ``(float32, True)`` where the output
    dtype allows it (:func:`resolve_matmul_dtype`), and on :class:`NeedsFloat64` once more
    ``(compute_dtype, False)``; otherwise the dtype asked for."""
    dtype, checked = resolve_matmul_dtype(matmul_dtype, compute_dtype, output_dtype)
    if checked:
        try:
            result = rule(dtype, True)
            record_precision(dtype)
            return result
        except NeedsFloat64 as why:
            global _recomputed
            with _recomputed_lock:
                _recomputed += 1
            _this_thread.recomputed = thread_float64_recompute_count() + 1
            LOG.debug("%s: %s; recomputing with float64 products", describe(name), why)
            dtype = compute_dtype
    result = rule(dtype, False)
    record_precision(dtype)
    return result


def extreme_eigenvalues(
    M: torch.Tensor, cholesky_factor: torch.Tensor, iterations: int = 20, probes: int = 4,
    dtype: torch.dtype = torch.float32,
) -> tuple[float, float]:
    """Estimates of (lambda_min, lambda_max) of an SPD matrix M, by block power
    iteration on M and on M^-1 (through its Cholesky factor) with a Rayleigh-Ritz step,
    in ``dtype``: float32 is enough to estimate condition numbers up to ~1e6 (far above any that
    float32 products are accepted for); rank decisions at a 1e-10 cutoff need float64.

    Costs about ``3 * iterations * probes * n^2`` multiply-adds. The estimates err towards a
    smaller condition number (lambda_max_est <= lambda_max,
    lambda_min_est >= lambda_min), by little after 20 iterations from random starts."""
    n = M.shape[0]
    p = min(probes, n)
    Mf, Lf = M.to(dtype), cholesky_factor.to(dtype)
    g = torch.Generator(device=M.device).manual_seed(0)
    X = torch.randn(n, p, dtype=dtype, device=M.device, generator=g)
    Y = X.clone()
    for _ in range(iterations):
        X = torch.linalg.qr(Mf @ X).Q
        Y = torch.linalg.qr(cholesky_solve(Y, Lf)).Q
    lam_max = float(torch.linalg.eigvalsh((X.T @ Mf @ X).double()).max())
    lam_min = float(torch.linalg.eigvalsh((Y.T @ Mf @ Y).double()).min())
    return lam_min, lam_max


def solve_error_estimate(kappa: float, amplification: float = 1.0) -> float:
    """Relative error of a solve whose right-hand side and matrix come from float32 products:
    u max(kappa, 10sqrt kappa) times any further ``amplification`` (Sherman-Morrison)."""
    if not math.isfinite(kappa) or kappa <= 0:
        return math.inf
    return UNIT_ROUNDOFF_FLOAT32 * max(kappa, 10.0 * math.sqrt(kappa)) * amplification


def refinement_error_estimate(eigenvalues: torch.Tensor, kept: int, sigma_iso: float, coefficients: torch.Tensor,
                              gram_dtype: torch.dtype) -> float:
    """Absolute (Frobenius) error that the Gram route adds to ACE's refinement term
    X f(G), G = X^TX (or XX^T), f(lambda_i) = c_i on the ``kept``
    non-null top-k directions and 0 elsewhere (c_i = sigma_iso/sigma_i, minus 1 for
    ``rescale``). ``eigenvalues``: the Gram's top eigenvalues, largest first (at least ``kept``;
    one more where it exists).

    A perturbation E of G changes f(G) by the elementwise product of
    [(c_i - c_j)/(lambda_i - lambda_j)] and V^TEV in its eigenbasis (Daleckii-Krein), and X multiplies row i by
    sigma_i: two kept directions give sigma_iso/(sigma_j(sigma_i + sigma_j))
    (largest for the smallest kept sigma: sigma_iso/2 sigma_min^2), a kept and
    the first direction left out (the (k+1)-th, or a null one) sigma_i|c_i|/(lambda_i -
    lambda_out). With ||E|| = u lambda_1 (the Gram's rounding) the estimate is
    3sqrt(k) ||E|| times the larger of the two. Measured against a float64 SVD on
    noise-bulk and rank-8 matrices (tall, wide, square): the unscaled product was 0.5-27x the true
    error, hence the factor 3 (``tests/test_rules_ace_refinement.py``)."""
    if kept <= 0:
        return 0.0
    lam = eigenvalues.double().clamp_min(0)
    sigma = lam[:kept].sqrt()
    smallest = float(sigma[-1])
    if smallest <= 0:
        return math.inf
    inner = sigma_iso / (2.0 * smallest * smallest)
    lam_out = float(lam[kept]) if lam.numel() > kept else 0.0
    gaps = lam[:kept] - lam_out
    if float(gaps.min()) <= 0:
        return math.inf
    boundary = float((sigma * coefficients[:kept].double().abs() / gaps).max())
    return REFINEMENT_SAFETY * math.sqrt(kept) * unit_roundoff(gram_dtype) * float(lam[0]) * max(inner, boundary)


#: A Gram's null-direction cut (``rules.ace.gram_null_mask``) is trusted only where no top-k
#: eigenvalue lies within this factor of the floor, on either side (computed eigenvalues are off by
#: about the floor itself).
NULL_MARGIN = 10.0


def null_decision_is_clear(eigenvalues: torch.Tensor, k: int, inner_dim: int, gram_dtype: torch.dtype) -> bool:
    """Whether a Gram's null cut of its top-k directions is beyond doubt: no eigenvalue within
    :data:`NULL_MARGIN` of the floor m eps lambda_1 (eigenvalues largest first, m =
    ``inner_dim``, eps the machine epsilon of ``gram_dtype``). A float32 Gram's floor
    is ~1e-3 of lambda_1 on LLM-sized weights: a real direction there may be cut, a
    whole sigma_iso term, which no error estimate of the kept pairs sees."""
    if k <= 0 or eigenvalues.numel() == 0:
        return True
    floor = inner_dim * torch.finfo(gram_dtype).eps * max(float(eigenvalues[0]), 0.0)
    top = eigenvalues[:k].double()
    return not bool(((top > floor / NULL_MARGIN) & (top <= NULL_MARGIN * floor)).any())


#: Safety factor of :func:`refinement_error_estimate` (its unscaled form measured 0.5-27x the error).
REFINEMENT_SAFETY = 3.0


#: From this fraction of the pairs on, the CPU takes every pair by divide and conquer (``syevd``)
#: instead of only the wanted ones by MRRR (``syevr``). Measured on the Gram ACE decomposes
#: (top 0.3 d + 1 pairs; ``benchmarks/bench_eigh.py``): evd 1.6x faster at d = 3072 and 4096,
#: equal at 2048; MRRR slows down on the clustered noise bulk of such spectra.
FULL_DECOMPOSITION_FRACTION = 0.25


def top_eigenpairs(gram: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``count`` largest eigenvalues (descending) and their eigenvectors of a symmetric matrix.

    On the CPU through SciPy's LAPACK: for fewer than ``FULL_DECOMPOSITION_FRACTION`` of the
    pairs only those (``syevr``: tridiagonalisation, MRRR for the wanted pairs and their
    back-transformation), else every pair by divide and conquer (``syevd``), the top ``count``
    kept. Elsewhere ``torch.linalg.eigh``."""
    n = gram.shape[0]
    count = max(0, min(count, n))
    if gram.device.type == "cpu" and 0 < count < n:
        values, vectors = _scipy_top_eigenpairs(gram, count)
    else:
        values, vectors = torch.linalg.eigh(gram)
        values, vectors = values[n - count:], vectors[:, n - count:]
    return values.flip(0), vectors.flip(1)


def _scipy_top_eigenpairs(gram: torch.Tensor, count: int):
    import numpy as np
    import scipy.linalg

    n = gram.shape[0]
    with _blas_threads(torch.get_num_threads()):
        if count >= FULL_DECOMPOSITION_FRACTION * n:
            values, vectors = scipy.linalg.eigh(gram.numpy(), driver="evd", check_finite=False)
            # copy the kept columns so that the full n x n eigenvector matrix is freed
            values, vectors = values[n - count:], np.ascontiguousarray(vectors[:, n - count:])
        else:
            values, vectors = scipy.linalg.eigh(
                gram.numpy(), subset_by_index=[n - count, n - 1], driver="evr", check_finite=False
            )
    return torch.from_numpy(values), torch.from_numpy(vectors)


def _blas_threads(n: int):
    """Limit SciPy's BLAS/LAPACK threads to torch's, so that ``torch.set_num_threads`` governs the
    whole rule (threadpoolctl)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=n, user_api="blas")


#: Slack of :func:`condition_lower_bound`'s trace bound: covers the rounding of float32 Grams
#: (at most m u relative on their positive diagonal, 0.6 % for m = 1e5 rows) and of the energies
#: the trace is bounded from.
TRACE_SLACK = 1.05


def top_eigenvalue_lower_bound(S: torch.Tensor, iterations: int = 6, probes: int = 4) -> float:
    """A lower bound on lambda_max of a symmetric PSD matrix: the largest Rayleigh
    quotient x^TSx/x^Tx of a few block-power-iteration vectors (every vector's is at most
    lambda_max; a dominant direction is found in a few steps). ~``2 iterations probes n^2``
    multiply-adds, in S's dtype (rounding: ~u relative)."""
    n = S.shape[0]
    g = torch.Generator(device=S.device).manual_seed(0)
    X = torch.randn(n, min(probes, n), dtype=S.dtype, device=S.device, generator=g)
    for _ in range(iterations):
        X = S @ X
        X /= X.norm(dim=0).clamp_min(torch.finfo(S.dtype).tiny)
    quotients = (X * (S @ X)).sum(dim=0) / X.square().sum(dim=0).clamp_min(torch.finfo(S.dtype).tiny)
    return max(0.0, float(quotients.double().max()) * (1.0 - 1e-4))


def condition_lower_bound(lambda_max_lower: float, trace_upper: float, n: int) -> float:
    """kappa(M) >= lambda_max/(tr M/n) for an n x n SPD M: its smallest eigenvalue
    is at most the mean one. Known before M is summed: lambda_max(M) >=
    lambda_max(S_t) for each PSD term S_t, and the trace is bounded from the task
    vectors' energies (computed before any Gram). The rules use it to give up float32 products
    after the first proxy instead of after all of them and their products. :func:`condition_number`'s
    kappa_est, checked once M exists, also errs low, so in a rare case the bound may exceed
    it and send to float64 a weight the later check would have let through: that costs speed only."""
    if not (trace_upper > 0 and math.isfinite(trace_upper)):
        return 0.0
    return lambda_max_lower * n / trace_upper


def check_condition_lower_bound(kappa_lower: float, what: str, tolerance: float) -> None:
    """Raise :class:`NeedsFloat64` where even the lower bound of the condition number makes float32
    products too inaccurate for ``tolerance``, the relative error of the merged update the contract
    allows (:func:`solve_error_estimate` grows with kappa)."""
    error = solve_error_estimate(kappa_lower) if kappa_lower > 0 else 0.0
    if error > tolerance:
        raise NeedsFloat64(f"{what}: condition number at least ~{kappa_lower:.1e}, too large for float32 "
                           f"products (estimated error at least {error:.1e})")


def expert_order(energies: Sequence[float]) -> list[int]:
    """The order a float32 attempt forms the experts' Grams in: largest ``energies`` first, so that
    :class:`RunningConditionBound` sees the likeliest largest lambda_max first (float64 runs keep
    the experts' own order: their results do not depend on the attempt)."""
    return sorted(range(len(energies)), key=lambda t: -energies[t])


class RunningConditionBound:
    """The float32 give-up test of a sum M = sum_t S_t (+ eps I) of n x n PSD terms,
    fed one term at a time: after each, kappa(M) >= max_t lambda_max(S_t) *
   n / tr M (:func:`condition_lower_bound`) is checked, and :class:`NeedsFloat64` is
    raised as soon as it rules float32 products out. ``trace_upper``: a bound on tr M known before
    any term (``math.inf``: nothing to check, as in float64 runs); ``what``: the sum, for the message;
    ``tolerance``: the relative error of the merged update allowed (:meth:`ErrorBudget.relative`)."""

    def __init__(self, trace_upper: float, n: int, what: str, terms: int, tolerance: float = math.inf):
        self.trace_upper, self.n, self.what, self.terms = trace_upper, n, what, terms
        self.tolerance = tolerance
        self.lambda_lower = 0.0
        self.seen = 0

    @property
    def active(self) -> bool:
        return math.isfinite(self.trace_upper)

    def add(self, S: torch.Tensor) -> None:
        """Take term S_t (before it is summed or used) into the bound and check it."""
        self.seen += 1
        if not self.active:
            return
        self.lambda_lower = max(self.lambda_lower, top_eigenvalue_lower_bound(S))
        check_condition_lower_bound(condition_lower_bound(self.lambda_lower, self.trace_upper, self.n),
                                    f"{self.what} (after {self.seen} of {self.terms} terms)", self.tolerance)


def condition_number(M: torch.Tensor, cholesky_factor: torch.Tensor) -> float:
    """kappa_est(M) = lambda_max_est/lambda_min_est from :func:`extreme_eigenvalues`."""
    lam_min, lam_max = extreme_eigenvalues(M, cholesky_factor)
    return lam_max / lam_min if lam_min > 0 else math.inf
