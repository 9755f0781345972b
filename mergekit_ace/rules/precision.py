r"""Which precision the O(d_out d_in^2) products may use, decided from the conditioning.

The rules' results are float64. Their matrix products (Gram matrices, :math:`D_t\tilde S_t`,
:math:`D_t C_t`, the Gram of F) are 2x cheaper in float32 on a CPU (and 30-60x on consumer GPUs),
but a float32 product carries a relative error of about :math:`u = 2^{-24}` that the rest of the
rule can amplify:

* the solve with :math:`M` (ACE, :math:`M=\sum_t R_t`) or :math:`A=\sum_t C_t` (ACTMat) by up to
  its condition number :math:`\kappa`; measured on 128-2048 wide synthetic layers, the error of
  float32 Grams and products stays below :math:`u\max(\kappa, 10\sqrt\kappa)`;
* ACE's refinement through the top-k singular subspace of F: a perturbation :math:`E` of the
  Gram :math:`F^TF` turns that subspace by about :math:`\|E\|/(\lambda_k-\lambda_{k+1})`
  (Davis-Kahan), and only the pairs at the boundary mix, so the result moves by about
  :math:`\sqrt{2/k}\,\|E\|/(\lambda_k-\lambda_{k+1})` relative. :math:`\|E\| \approx u\lambda_1`
  for a float32 Gram, :math:`\approx 2u\sigma_1\sigma_k` for a float64 Gram of a float32 F;
* ACE's decision which of the top-k directions are null (they get no refinement term): a Gram
  eigenvalue counts as zero at or below :math:`m\epsilon\lambda_1` in the Gram's precision
  (``rules.ace.gram_null_mask``), a floor ~5e8 times higher for a float32 Gram than for a float64
  one. A float32 Gram whose k-th eigenvalue is within :data:`NULL_MARGIN` of its floor cannot tell
  a small direction from a null one (a whole :math:`\sigma_{iso}` term more or less, which the
  gap estimate above need not see), so it is recomputed in float64
  (:func:`null_decision_is_clear`).

``matmul_dtype="auto"`` (the executor's default) runs the products -- and, in ACE, the
d_in x d_in sums and the Cholesky factor, whose backward error is of the same order -- in float32
and checks these estimates as soon as the quantities they need exist (a lower bound of
:math:`\kappa` after the first Gram, :func:`condition_lower_bound`; :math:`\kappa` right after
the Gram matrices; the gap right after the eigendecomposition); if their sum exceeds
:data:`TOLERANCE`, the weight is recomputed in float64. Both are documented in ``docs/execution.md``; the estimates
were checked against a float64 reference in ``tests/test_precision.py``.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

import torch

from mergekit_ace.rules.common import cholesky_solve, describe

LOG = logging.getLogger(__name__)
R = TypeVar("R")

#: Unit roundoff of float32.
UNIT_ROUNDOFF_FLOAT32 = 2.0 ** -24
#: Largest estimated relative error (on the merged task vector) accepted from float32 products:
#: a third of the 1e-4 the float64 path is held to (the estimates track measured errors within ~3x).
TOLERANCE = 3e-5
#: A float32 Gram's null-direction decision is trusted only when its k-th eigenvalue exceeds the
#: null floor by this factor (the computed eigenvalues are off by at most about the floor itself).
NULL_MARGIN = 10.0
#: The value of ``matmul_dtype`` that asks for the decision described above.
AUTO = "auto"


_recomputed = 0
_recomputed_lock = threading.Lock()
_this_thread = threading.local()  # .recomputed: the same count for the calling thread only


def float64_recompute_count() -> int:
    """How many weights this process recomputed with float64 products after a float32 attempt."""
    return _recomputed


def thread_float64_recompute_count() -> int:
    """:func:`float64_recompute_count` for the calling thread only: whether a call recomputed is
    the change of this count around it, whatever other threads (``--multi-gpu``) do meanwhile."""
    return getattr(_this_thread, "recomputed", 0)


class NeedsFloat64(Exception):
    """Raised inside a rule when float32 products are estimated to be too inaccurate for a weight;
    the rule catches it and recomputes that weight with float64 products."""


def resolve_matmul_dtype(matmul_dtype, compute_dtype: torch.dtype) -> Tuple[torch.dtype, bool]:
    """``(dtype of the first attempt, whether to check it)`` for a rule's ``matmul_dtype`` argument:
    ``"auto"`` -> float32 with checks (only when computing in float64), ``None`` -> compute dtype."""
    if isinstance(matmul_dtype, str):
        if matmul_dtype != AUTO:
            dtype = getattr(torch, matmul_dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"matmul_dtype must be 'auto', 'float32' or 'float64', got {matmul_dtype!r}")
            return dtype, False
        if compute_dtype == torch.float64:
            return torch.float32, True
        return compute_dtype, False
    return (matmul_dtype or compute_dtype), False


def run_with_fallback(rule: Callable[[torch.dtype, bool], R], matmul_dtype, compute_dtype: torch.dtype,
                      name: Optional[str] = None) -> R:
    """``rule(products dtype, check)``: with ``"auto"``, first ``(float32, True)``, and on
    :class:`NeedsFloat64` once more ``(compute_dtype, False)``; otherwise the dtype asked for."""
    dtype, checked = resolve_matmul_dtype(matmul_dtype, compute_dtype)
    if not checked:
        return rule(dtype, False)
    try:
        return rule(dtype, True)
    except NeedsFloat64 as why:
        global _recomputed
        with _recomputed_lock:
            _recomputed += 1
        _this_thread.recomputed = thread_float64_recompute_count() + 1
        LOG.debug("%s: %s; recomputing with float64 products", describe(name), why)
        return rule(compute_dtype, False)


def extreme_eigenvalues(
    M: torch.Tensor, cholesky_factor: torch.Tensor, iterations: int = 20, probes: int = 4,
    dtype: torch.dtype = torch.float32,
) -> Tuple[float, float]:
    r"""Estimates of :math:`(\lambda_{min}, \lambda_{max})` of an SPD matrix M, by block power
    iteration on M and on :math:`M^{-1}` (through its Cholesky factor) with a Rayleigh-Ritz step,
    in ``dtype``: float32 is enough to estimate condition numbers up to ~1e6 (far above any that
    float32 products are accepted for); rank decisions at a 1e-10 cutoff need float64.

    Costs about ``3 * iterations * probes * n^2`` multiply-adds. The estimates err towards a
    smaller condition number (:math:`\hat\lambda_{max} \le \lambda_{max}`,
    :math:`\hat\lambda_{min} \ge \lambda_{min}`), by little after 20 iterations from random starts."""
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
    r"""Relative error of a solve whose right-hand side and matrix come from float32 products:
    :math:`u \max(\kappa, 10\sqrt\kappa)` times any further ``amplification`` (Sherman-Morrison)."""
    if not math.isfinite(kappa) or kappa <= 0:
        return math.inf
    return UNIT_ROUNDOFF_FLOAT32 * max(kappa, 10.0 * math.sqrt(kappa)) * amplification


def subspace_error_estimate(eigenvalues: torch.Tensor, k: int, gram_in_float32: bool) -> float:
    r"""Relative error that a perturbed Gram of F causes in :math:`\sigma_{iso}U_kV_k^T`:
    :math:`\sqrt{2/k}\,\|E\| / (\lambda_k - \lambda_{k+1})` with ``eigenvalues`` the top ones of the
    Gram, largest first (``k + 1`` of them, or ``k`` when k is the whole spectrum) and
    :math:`\|E\| = u\lambda_1` (float32 Gram) or :math:`2u\sigma_1\sigma_k` (float64 Gram of a
    float32 F)."""
    if k <= 0:
        return 0.0
    lam = eigenvalues.double().clamp_min(0)
    lam1, lamk = float(lam[0]), float(lam[k - 1])
    following = float(lam[k]) if lam.numel() > k else 0.0
    gap = lamk - following
    if gap <= 0 or lam1 <= 0:
        return math.inf
    perturbation = UNIT_ROUNDOFF_FLOAT32 * (lam1 if gram_in_float32 else 2.0 * math.sqrt(lam1 * lamk))
    return math.sqrt(2.0 / k) * perturbation / gap


def null_decision_is_clear(eigenvalues: torch.Tensor, k: int, inner_dim: int, gram_dtype: torch.dtype) -> bool:
    r"""Whether a Gram's null-direction cut (``rules.ace.gram_null_mask``) keeps every top-k
    direction whatever the Gram's rounding: :math:`\lambda_k > \mathrm{NULL\_MARGIN}\,m\epsilon\lambda_1`
    (eigenvalues largest first, m = ``inner_dim`` the Gram's inner dimension, :math:`\epsilon` the
    machine epsilon of ``gram_dtype``). Below that, a float32 Gram may cut a direction that float64
    keeps (its singular value can be up to :math:`\sqrt{m\epsilon_{32}}`, 1-3% of
    :math:`\sigma_1` on LLM-sized weights) or keep noise; the rule then takes the Gram in float64."""
    if k <= 0 or eigenvalues.numel() == 0:
        return True
    lam1 = max(float(eigenvalues[0]), 0.0)
    floor = inner_dim * torch.finfo(gram_dtype).eps * lam1
    return float(eigenvalues[k - 1]) > NULL_MARGIN * floor


#: From this fraction of the pairs on, the CPU takes every pair by divide and conquer (``syevd``)
#: instead of only the wanted ones by MRRR (``syevr``). Measured on the Gram ACE decomposes
#: (top 0.3 d + 1 pairs; ``benchmarks/bench_eigh.py``): evd 1.6x faster at d = 3072 and 4096,
#: equal at 2048; MRRR slows down on the clustered noise bulk of such spectra.
FULL_DECOMPOSITION_FRACTION = 0.25


def top_eigenpairs(gram: torch.Tensor, count: int) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""The ``count`` largest eigenvalues (descending) and their eigenvectors of a symmetric matrix.

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
    r"""A lower bound on :math:`\lambda_{max}` of a symmetric PSD matrix: the largest Rayleigh
    quotient :math:`x^TSx/x^Tx` of a few block-power-iteration vectors (every vector's is at most
    :math:`\lambda_{max}`; a dominant direction is found in a few steps). ~``2 iterations probes n^2``
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
    r""":math:`\kappa(M) \ge \lambda_{max}/(\mathrm{tr}\,M/n)` for an n x n SPD M: its smallest eigenvalue
    is at most the mean one. Known before M is summed: :math:`\lambda_{max}(M) \ge
    \lambda_{max}(S_t)` for each PSD term :math:`S_t`, and the trace is bounded from the task
    vectors' energies (computed before any Gram). The rules use it to give up float32 products
    after the first proxy instead of after all of them and their products. :func:`condition_number`'s
    :math:`\hat\kappa`, checked once M exists, also errs low, so in a rare case the bound may exceed
    it and send to float64 a weight the later check would have let through: that costs speed only."""
    if not (trace_upper > 0 and math.isfinite(trace_upper)):
        return 0.0
    return lambda_max_lower * n / trace_upper


def check_condition_lower_bound(kappa_lower: float, what: str) -> None:
    """Raise :class:`NeedsFloat64` where even the lower bound of the condition number makes float32
    products too inaccurate (:func:`solve_error_estimate` grows with kappa)."""
    error = solve_error_estimate(kappa_lower) if kappa_lower > 0 else 0.0
    if error > TOLERANCE:
        raise NeedsFloat64(f"{what}: condition number at least ~{kappa_lower:.1e}, too large for float32 "
                           f"products (estimated error at least {error:.1e})")


def expert_order(energies: Sequence[float]) -> List[int]:
    """The order a float32 attempt forms the experts' Grams in: largest ``energies`` first, so that
    :class:`RunningConditionBound` sees the likeliest largest lambda_max first (float64 runs keep
    the experts' own order: their results do not depend on the attempt)."""
    return sorted(range(len(energies)), key=lambda t: -energies[t])


class RunningConditionBound:
    r"""The float32 give-up test of a sum :math:`M = \sum_t S_t (+ \epsilon I)` of n x n PSD terms,
    fed one term at a time: after each, :math:`\kappa(M) \ge \max_t \lambda_{max}(S_t) \cdot
    n / \mathrm{tr}\,M` (:func:`condition_lower_bound`) is checked, and :class:`NeedsFloat64` is
    raised as soon as it rules float32 products out. ``trace_upper``: a bound on tr M known before
    any term (``math.inf``: nothing to check, as in float64 runs); ``what``: the sum, for the message."""

    def __init__(self, trace_upper: float, n: int, what: str, terms: int):
        self.trace_upper, self.n, self.what, self.terms = trace_upper, n, what, terms
        self.lambda_lower = 0.0
        self.seen = 0

    @property
    def active(self) -> bool:
        return math.isfinite(self.trace_upper)

    def add(self, S: torch.Tensor) -> None:
        """Take term :math:`S_t` (before it is summed or used) into the bound and check it."""
        self.seen += 1
        if not self.active:
            return
        self.lambda_lower = max(self.lambda_lower, top_eigenvalue_lower_bound(S))
        check_condition_lower_bound(condition_lower_bound(self.lambda_lower, self.trace_upper, self.n),
                                    f"{self.what} (after {self.seen} of {self.terms} terms)")


def condition_number(M: torch.Tensor, cholesky_factor: torch.Tensor) -> float:
    r""":math:`\hat\kappa(M) = \hat\lambda_{max}/\hat\lambda_{min}` from :func:`extreme_eigenvalues`."""
    lam_min, lam_max = extreme_eigenvalues(M, cholesky_factor)
    return lam_max / lam_min if lam_min > 0 else math.inf
