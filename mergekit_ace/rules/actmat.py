r"""ACTMat: data-free RegMean with task-vector covariances, one weight matrix at a time.

Abdel Hameed, Tam, Notsawo, Raffel, Rabusseau (preprint). RegMean's layer-wise objective
:math:`\min_W \sum_t \mathbb{E}\|Wz - W_t z\|^2` has the closed form
:math:`W^* = (\sum_t W_t C_t)(\sum_t C_t)^+` with :math:`C_t = \mathbb{E}[zz^T]`. ACTMat replaces the
input covariance by the task vector's Gram matrix :math:`C_t \approx D_t^T D_t` (Thm. 3.1: under
(S)GD fine-tuning :math:`D_t^T D_t = \eta^2 G_t^T G_t`, aligned with the data covariance):

.. math::  W = W_0 A A^+ + \mathrm{scale}\cdot \Big(\sum_t D_t C_t\Big) A^+, \qquad A = \sum_t C_t

(using :math:`\sum_t W_t C_t = W_0 A + \sum_t D_t C_t`). Where A is invertible this is
:math:`W_0 + \sum_t D_t C_t A^{-1}`. Where A is singular, the literal minimum-norm solution keeps only
:math:`W_0 A A^+`, zeroing the base outside A's range; the default (``keep_base=True``) keeps
:math:`W_0` there: :math:`W = W_0 + \mathrm{scale}\cdot(\sum_t D_t C_t) A^+`.

The pseudo-inverse comes from a symmetric eigendecomposition of A with the cutoff
:math:`\lambda_i > \mathrm{rcond}\cdot\lambda_{max}`, ``rcond`` defaulting to ``PINV_RTOL`` = 1e-10
(float64 Gram noise is ~1e-13 relative; directions below the cutoff count as outside A's range).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, List, Optional, Sequence

import torch

from mergekit_ace.rules.common import (
    EXPERT_STREAMED,
    PINV_RTOL,
    ROW_CHUNKED,
    TaskVectors,
    check_strategy,
    accumulate_gram,
    check_finite_output,
    check_inputs,
    check_nonzero_task_vectors,
    check_parameter,
)

DEFAULTS = dict(scale=1.0, keep_base=True, rcond=None)


def task_covariance(delta: torch.Tensor, row_chunk: Optional[int] = None) -> torch.Tensor:
    r""":math:`C_t = D_t^T D_t` (d_in x d_in), accumulated over row blocks."""
    d_out, d_in = delta.shape
    return accumulate_gram(lambda rows: delta[rows], d_out, d_in, delta.dtype, delta.device, row_chunk)[0]


@dataclass
class SymmetricPseudoInverse:
    r""":math:`A^+ = Q_r \Lambda_r^{-1} Q_r^T` from ``eigh(A)``, keeping
    :math:`\lambda_i > \mathrm{rcond}\,\lambda_{max}`; also the range projector :math:`AA^+ = Q_rQ_r^T`."""

    Q: torch.Tensor  # kept eigenvectors (d_in x r)
    inv_eigvals: torch.Tensor  # (r,)
    rank: int

    @classmethod
    def of(cls, A: torch.Tensor, rcond: Optional[float] = None) -> "SymmetricPseudoInverse":
        evals, evecs = torch.linalg.eigh(A)
        if rcond is None:
            rcond = PINV_RTOL
        top = float(evals.max()) if evals.numel() else 0.0
        keep = evals > rcond * top if top > 0 else torch.zeros_like(evals, dtype=torch.bool)
        return cls(Q=evecs[:, keep], inv_eigvals=1.0 / evals[keep], rank=int(keep.sum()))

    def apply(self, N: torch.Tensor) -> torch.Tensor:
        r""":math:`N A^+` for a block of rows."""
        return ((N @ self.Q) * self.inv_eigvals) @ self.Q.T

    def project(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`W A A^+` (W's rows projected on A's range)."""
        return (W @ self.Q) @ self.Q.T


@dataclass
class ACTMatDiagnostics:
    traces: List[float]
    rank: int
    d_in: int


def actmat_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    keep_base: bool = True,
    rcond: Optional[float] = None,
    name: Optional[str] = None,
    ids: Optional[Sequence[Hashable]] = None,
    compute_dtype: torch.dtype = torch.float64,
    row_chunk: Optional[int] = None,
    return_diagnostics: bool = False,
    strategy: str = ROW_CHUNKED,
    matmul_dtype: Optional[torch.dtype] = None,
):
    r"""Merge one 2-D weight by ACTMat; returns W in ``compute_dtype`` (see the module docstring).

    ``keep_base=False`` gives the paper-literal minimum-norm solution
    :math:`(\sum_t W_t C_t)(\sum_t C_t)^+` (with ``scale`` on the task-vector term).

    Memory, not the result, depends on ``row_chunk`` and ``strategy``: ``"row_chunked"`` keeps the T
    Gram matrices :math:`C_t` and forms the numerator :math:`N = \sum_t D_t C_t` one row block at a
    time (tall matrices); ``"expert_streamed"`` keeps one :math:`C_t` at a time and accumulates N
    full-size (wide matrices). ``matmul_dtype`` (default ``compute_dtype``) is the precision of the
    Gram and numerator products; the sums, the eigendecomposition and the solve use
    ``compute_dtype``. Without a ridge, A's small eigenvalues are only as accurate as those
    products: keep float64 unless A is known to be well conditioned.
    """
    check_inputs(base, experts, name=name, ids=ids, matrix_rule="ACTMat")
    check_parameter(name, "scale", scale)
    if rcond is not None:
        check_parameter(name, "rcond", rcond, low=0.0, high=1.0)
    streamed = check_strategy(strategy, name) == EXPERT_STREAMED
    T = len(experts)
    d_out, d_in = base.shape
    dt = compute_dtype
    mt = matmul_dtype or dt
    dev = base.device
    tv = TaskVectors(base, experts, mt, row_chunk)

    # A = sum_t C_t, C_t = D_t^T D_t, expert by expert; C_t kept (row_chunked) or folded into N.
    covs: List[torch.Tensor] = []
    traces: List[float] = []
    A = torch.zeros(d_in, d_in, dtype=dt, device=dev)
    N = torch.zeros(d_out, d_in, dtype=dt, device=dev) if streamed else None
    for t in range(T):
        C = tv.gram(t)
        traces.append(float(torch.trace(C)))
        A += C
        if streamed:
            for rows in tv.chunks():
                tv.add_product(N[rows], t, rows, C)
            del C
        else:
            covs.append(C)
    check_nonzero_task_vectors(traces, name, ids)
    pinv = SymmetricPseudoInverse.of(A, rcond)
    del A

    # W = W0 (or W0 A A^+) + scale N A^+, one row block at a time (in N's place when streamed).
    W = N if streamed else torch.empty(d_out, d_in, dtype=dt, device=dev)
    for rows in tv.chunks():
        if streamed:
            num = N[rows]
        else:
            num = tv.matmul_accumulate(torch.zeros(rows.stop - rows.start, d_in, dtype=dt, device=dev), rows, covs)
        update = pinv.apply(num)
        del num
        update *= scale
        update += base[rows] if keep_base else pinv.project(base[rows].to(dt))
        W[rows] = update
        del update
    del covs
    check_finite_output(W, name, "ACTMat")
    if return_diagnostics:
        return W, ACTMatDiagnostics(traces=traces, rank=pinv.rank, d_in=d_in)
    return W


def covariance_alignment(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""Pairwise cosine :math:`\langle C_s, C_t\rangle_F / (\|C_s\|_F\|C_t\|_F)` of the experts'
    covariance estimates :math:`C_t = D_t^T D_t` (T x T); ACTMat assumes they are nearly aligned
    up to scale."""
    covs = [task_covariance(d) for d in deltas]
    flat = torch.stack([c.flatten() for c in covs])
    norms = flat.norm(dim=1).clamp_min(1e-300)
    return (flat @ flat.T) / torch.outer(norms, norms)
