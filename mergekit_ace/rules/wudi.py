"""WUDI-Merging (Cheng et al., ICML 2025, arXiv 2503.08099), one weight matrix at a time.

Per linear layer WUDI minimises, over the merged task vector tau,

    L(tau) = sum_t (||(tau - D_t) D_t^T||_F^2) / (||D_t||_F^2)

(the rows of each task vector D_t = W_t - W_0 stand in for that task's inputs) and returns
W = W_0 + scale * tau. With C_t = D_t^TD_t and w_t = 1/||D_t||_F^2,
grad L = 2 sum_t w_t(tau - D_t)C_t = 2(tau A_w - N_w), A_w = sum_t w_tC_t,
N_w = sum_t w_tD_tC_t: ACTMat's normal equations with per-expert weights, so the closed
form runs ACTMat's kernel (:func:`mergekit_ace.rules.actmat.actmat_merge` with ``weights``: its
strategies, its wide route and its "auto" float32 products).

Singular A_w (wide weights, low-rank updates): every minimiser is
N_wA_w^+ + Z with ZA_w = 0. Gradient steps from the official start
S = sum_t D_t only move tau inside range(A_w) (the gradient's
rows lie there), so gradient descent converges to

    tau^* = N_wA_w^+ + S(I - A_wA_w^+),

the minimiser nearest the start. Every row of every D_t lies in range(A_w),
so S(I - A_wA_w^+) = 0 in exact arithmetic; it is computed all the same (``keep_start``),
so that the statement holds where the pseudo-inverse's cutoff drops small directions
(``solve="truncated"``, or eigenvalues below ``rcond``): there tau^* keeps the start.
Adam's per-coordinate step is not a gradient step: its iterates do leave the range, by up to
about ``lr`` per element and step, so where A_w is singular the official solver's limit
differs from tau^* outside the range (docs/methods.md, "WUDI-Merging").

``solver="adam"`` runs the official optimiser instead (:func:`wudi_adam`): ``torch.optim.Adam``
(lr 1e-5, betas (0.9, 0.999), eps 1e-8, no weight decay) for 300 iterations from S, in
float32, on the tensors' device. Each iteration costs 4Tm^2n multiply-adds (wide weights,
the official association ((tau - D_t)D_t^T)D_t) or 2Tmn^2 (tall ones,
(tau - D_t)C_t with the C_t formed once): made for GPUs.

Official code (nathanielyvo/WUDI-Merging ``vit/wudi_main.py``, fusion_bench
``fusion_bench/method/wudi/wudi.py``; details and differences in docs/methods.md): the loss above
summed over tasks without a mean or factor, Adam at lr 1e-5 (2e-5 in the RoBERTa script), 300
iterations (fusion_bench's config: 400), start sum_t D_t, the tensors' own dtype,
result added to the base with coefficient 1. The ViT script merges the attention and MLP linear
weights only and keeps the base elsewhere; fusion_bench merges every 2-D tensor and averages the
task vectors of the rest.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from mergekit_ace.errors import MergeInputError
from mergekit_ace.rules.actmat import EXACT, actmat_merge
from mergekit_ace.rules.checks import (
    check_finite_output,
    check_inputs,
    check_nonzero_task_vectors,
    check_parameter,
    describe,
)
from mergekit_ace.rules.task_vectors import ROW_CHUNKED, TaskVectors

CLOSED_FORM, ADAM = "closed_form", "adam"
SOLVERS = (CLOSED_FORM, ADAM)
#: The official solver's settings (vit/wudi_main.py: get_redundant_task_vector).
ADAM_LR = 1e-5
ADAM_ITERATIONS = 300

DEFAULTS = dict(scale=1.0, solver=CLOSED_FORM, solve=EXACT, rcond=None, lr=ADAM_LR, iterations=ADAM_ITERATIONS)


@dataclass
class AdamDiagnostics:
    #: the experts' squared norms ||D_t||_F^2
    traces: list[float]
    iterations: int
    lr: float
    precision: str = "float32 (adam)"


def wudi_weights(base: torch.Tensor, experts: Sequence[torch.Tensor], name: str | None = None,
                 ids: Sequence[Hashable] | None = None, row_chunk: int | None = None) -> list:
    """w_t = 1/||D_t||_F^2 (accumulated in float64, one row block at a time); an all-zero
    task vector is refused naming the expert."""
    energies = TaskVectors(base, experts, torch.float64, row_chunk).energies_and_means(torch.float64, means=False)[0]
    check_nonzero_task_vectors(energies, name, ids)
    return [1.0 / e for e in energies]


def wudi_merge(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    scale: float = 1.0,
    solver: str = CLOSED_FORM,
    solve: str = EXACT,
    rcond: float | None = None,
    lr: float = ADAM_LR,
    iterations: int = ADAM_ITERATIONS,
    name: str | None = None,
    ids: Sequence[Hashable] | None = None,
    compute_dtype: torch.dtype = torch.float64,
    row_chunk: int | None = None,
    strategy: str = ROW_CHUNKED,
    matmul_dtype=None,
    output_dtype: torch.dtype | None = None,
    return_diagnostics: bool = False,
):
    """Merge one 2-D weight by WUDI: W_0 + scale * tau (module docstring).

    ``solver="closed_form"`` (default): the exact minimiser in ``compute_dtype`` through ACTMat's
    kernel; ``solve``, ``rcond``, ``strategy``, ``row_chunk``, ``matmul_dtype`` and ``output_dtype``
    (the precision contract) as in :func:`~mergekit_ace.rules.actmat.actmat_merge`. ``solver="adam"``: the official
    optimiser (:func:`wudi_adam` with ``lr`` and ``iterations``), in float32; the result is returned in
    ``compute_dtype``, and ``solve``/``rcond``/``strategy``/``matmul_dtype`` do not apply.
    """
    check_inputs(base, experts, name=name, ids=ids, matrix_rule="WUDI")
    check_parameter(name, "scale", scale)
    if solver not in SOLVERS:
        raise MergeInputError(f"{describe(name)}: parameter solver={solver!r} must be one of {SOLVERS}")
    if solver == ADAM:
        check_parameter(name, "lr", lr, low=0.0)
        if int(iterations) != iterations or iterations < 0:
            raise MergeInputError(f"{describe(name)}: parameter iterations={iterations!r} must be a whole number >= 0")
        weights = wudi_weights(base, experts, name, ids, row_chunk)  # refuses zero task vectors before the run
        tau = wudi_adam(base, experts, lr=lr, iterations=int(iterations))
        W = base.to(compute_dtype) + scale * tau.to(compute_dtype)
        del tau
        check_finite_output(W, name, "WUDI")
        diag = AdamDiagnostics(traces=[1.0 / w for w in weights], iterations=int(iterations), lr=float(lr))
        return (W, diag) if return_diagnostics else W
    weights = wudi_weights(base, experts, name, ids, row_chunk)
    return actmat_merge(base, experts, scale=scale, keep_base=True, rcond=rcond, solve=solve, name=name, ids=ids,
                        compute_dtype=compute_dtype, row_chunk=row_chunk, strategy=strategy,
                        matmul_dtype=matmul_dtype, output_dtype=output_dtype, weights=weights, keep_start=True,
                        return_diagnostics=return_diagnostics)


def wudi_adam(
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    lr: float = ADAM_LR,
    iterations: int = ADAM_ITERATIONS,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The official WUDI solver: ``torch.optim.Adam([tau], lr)`` (betas (0.9, 0.999), eps 1e-8, no
    weight decay) for ``iterations`` steps on L(tau) from tau_0 = sum_t D_t, in
    ``dtype`` (float32, as the official code on float32 checkpoints) on the tensors' device.
    Returns the merged task vector tau (d_out x d_in, ``dtype``).

    The gradient is the analytic one, 2 sum_t w_t(tau - D_t)C_t, in the official code's
    association ((tau - D_t)D_t^T)D_t (the m x m inner products, as autograd computes it)
    when d_out <= d_in; for tall weights (tau - D_t)C_t with C_t formed once (the
    d_out x d_out products would be larger). Memory: the T task vectors, tau, its
    gradient, Adam's two moments, and one m x m (or the T n x n C_t) plus m x n temporary
    (``mergekit_ace.execution.memory``)."""
    T, (m, n) = len(experts), base.shape
    D = torch.empty(T, m, n, dtype=dtype, device=base.device)  # the stacked task vectors, filled in place
    for t, expert in enumerate(experts):
        D[t].copy_(expert)
        D[t] -= base.to(dtype)
    weights = D.reshape(T, -1).square().sum(dim=1)  # ||D_t||_F^2, as the official l2_norms
    two_w = [2.0 / float(x) for x in weights]
    covs = [D[t].T @ D[t] for t in range(T)] if m > n else None
    tau = torch.nn.Parameter(D.sum(dim=0))
    optimizer = torch.optim.Adam([tau], lr=lr, weight_decay=0)
    grad = torch.empty_like(tau)
    with torch.no_grad():
        for _ in range(iterations):
            grad.zero_()
            for t in range(T):
                residual = tau - D[t]
                if covs is None:
                    grad.addmm_(residual @ D[t].T, D[t], alpha=two_w[t])
                else:
                    grad.addmm_(residual, covs[t], alpha=two_w[t])
                del residual
            tau.grad = grad
            optimizer.step()
    return tau.detach()
