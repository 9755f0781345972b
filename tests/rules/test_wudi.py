"""WUDI-Merging against independent float64 references: the closed form (explicit formula, numpy),
the official Adam solver (a torch.optim.Adam loop over the objective through autograd), and the
ACTMat code's truncated pseudo-inverse (``solve="truncated"``) for ACTMat and WUDI."""

import pytest
import torch

from mergekit_ace.rules import MergeInputError
from mergekit_ace.rules.actmat import actmat_merge, truncated_rcond
from mergekit_ace.rules.task_vectors import STRATEGIES
from mergekit_ace.rules.wudi import wudi_adam, wudi_merge
from tests.reference import (
    actmat_truncated_reference,
    make_experts,
    rel_err,
    wudi_reference,
)
from tests.reference import (
    wudi_adam_reference as adam_reference,
)
from tests.reference import (
    wudi_objective as objective,
)


def spectrum_experts(shape, T, decay, seed):
    """Task vectors with singular values logspace(0, -decay): small directions for the cutoffs."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    k = min(shape)
    experts = []
    for t in range(T):
        U = torch.linalg.qr(torch.randn(shape[0], k, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(shape[1], k, generator=g, dtype=torch.float64)).Q
        s = torch.logspace(0, -decay, k, dtype=torch.float64) * (0.1 + t)
        experts.append(W0 + (U * s) @ V.T)
    return W0, experts


SHAPES = {"tall": (48, 20), "wide": (20, 48), "wide_T_d_out_below_d_in": (12, 48)}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("T", [1, 2, 3])
def test_closed_form_matches_float64_reference(T, shape, strategy):
    W0, experts = make_experts(shape, T, [1.0, 0.01, 0.1], seed=40 + T)  # 100x norm spread
    ref = wudi_reference(W0, experts)
    for scale, row_chunk in ((1.0, None), (0.5, 7)):
        out = wudi_merge(W0, experts, scale=scale, strategy=strategy, row_chunk=row_chunk)
        assert out.dtype == torch.float64
        assert rel_err(out, wudi_reference(W0, experts, scale=scale), W0) < 1e-10
    # "auto" products (float32 where A_w is well conditioned, else float64) within the tolerance
    auto = wudi_merge(W0, experts, strategy=strategy, matmul_dtype="auto")
    assert rel_err(auto, ref, W0) < 1e-4


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", [(48, 20), (16, 40)], ids=["tall", "wide"])
def test_low_rank_updates_singular_covariance_sum(shape, strategy):
    # rank-3 updates: A_w has rank 3T < d_in; outside the experts' rows the base is kept exactly
    # float64 inputs: the updates are rank 3 to rounding (float32 sums W0 + D_t are not)
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    experts = [W0 + norm * torch.randn(shape[0], 3, generator=g, dtype=torch.float64)
               @ torch.randn(3, shape[1], generator=g, dtype=torch.float64) for norm in (1.0, 0.01)]
    out = wudi_merge(W0, experts, strategy=strategy)
    assert rel_err(out, wudi_reference(W0, experts), W0) < 1e-8
    D = torch.cat([e.double() - W0.double() for e in experts])
    null = torch.linalg.svd(D).Vh[6:].T
    torch.testing.assert_close(out @ null, W0.double() @ null, rtol=0, atol=1e-10)


def test_closed_form_is_the_objectives_minimiser_and_differs_from_actmat():
    W0, experts = make_experts((30, 12), 3, [1.0, 0.01, 0.1], seed=9)
    tau = wudi_merge(W0, experts) - W0.double()
    D = torch.stack([e.double() - W0.double() for e in experts])
    tau_p = tau.clone().requires_grad_(True)
    objective(tau_p, D).backward()
    assert float(tau_p.grad.norm()) < 1e-10 * float(objective(tau, D))  # stationary
    for trial in range(3):  # and no nearby point is lower
        other = tau + 1e-3 * torch.randn(tau.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(trial))
        assert float(objective(other, D)) > float(objective(tau, D))
    # With unequal norms the weights matter: ACTMat (w_t = 1) gives another merge.
    assert rel_err(actmat_merge(W0, experts), wudi_merge(W0, experts), W0) > 1e-2


def test_equal_norm_experts_give_actmat():
    # w_t all equal: A_w and N_w scale together, so WUDI's minimiser is ACTMat's.
    W0, experts = make_experts((24, 10), 3, [0.7], seed=11)
    # (the float32 sums W0 + D_t leave the norms equal to ~1e-7 only)
    assert rel_err(wudi_merge(W0, experts), actmat_merge(W0, experts), W0) < 1e-6


@pytest.mark.parametrize("shape", [(7, 5), (5, 9)], ids=["tall", "wide"])
def test_adam_solver_matches_reference_loop_float64(shape):
    W0, experts = make_experts(shape, 3, [1.0, 0.01, 0.1], seed=13)
    ours = wudi_adam(W0, experts, lr=1e-2, iterations=25, dtype=torch.float64)
    ref = adam_reference(W0, experts, lr=1e-2, iterations=25, dtype=torch.float64)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-12)
    start = sum(e.double() - W0.double() for e in experts)
    assert float((ours - start).abs().max()) > 0.1  # it moved


def test_adam_solver_official_settings_float32():
    # lr 1e-5, 300 iterations, float32 (the official code's), through wudi_merge
    W0, experts = make_experts((16, 10), 2, [0.02, 0.005], seed=17)
    out = wudi_merge(W0, experts, solver="adam")
    ref = adam_reference(W0, experts, lr=1e-5, iterations=300, dtype=torch.float32)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out - W0.double(), ref.double(), rtol=1e-4, atol=1e-7)
    start = sum(e.double() - W0.double() for e in experts)
    assert float((out - W0.double() - start).abs().max()) > 1e-4


def test_adam_converges_towards_closed_form():
    # well-conditioned (T d_out > d_in, full-rank updates): Adam settles near the minimiser
    W0, experts = make_experts((12, 8), 3, [1.0, 0.5, 0.3], seed=1)
    closed = wudi_merge(W0, experts)
    start = W0.double() + sum(e.double() - W0.double() for e in experts)
    tau = wudi_adam(W0, experts, lr=1e-2, iterations=2000, dtype=torch.float64)
    assert rel_err(start, closed, W0) > 0.3
    assert rel_err(W0.double() + tau, closed, W0) < 5e-3


def test_adam_on_singular_covariance_sum_matches_closed_form_inside_the_range():
    # Wide low-rank updates (A_w of rank 4 < 16): inside range(A_w) Adam's limit is the closed form;
    # outside it gradient descent would keep the start, but Adam's per-coordinate steps drift there
    # (here by ~0.09 against entries of ~0.4; docs/methods.md). The closed form keeps the start.
    W0, experts = make_experts((6, 16), 2, [1.0, 0.5], seed=3, rank=2)
    closed = wudi_merge(W0, experts) - W0.double()
    tau = wudi_adam(W0, experts, lr=1e-2, iterations=1000, dtype=torch.float64)
    D = torch.cat([e.double() - W0.double() for e in experts])
    Vh = torch.linalg.svd(D).Vh
    rng, null = Vh[:4].T, Vh[4:].T
    assert float((tau @ rng - closed @ rng).norm() / (closed @ rng).norm()) < 1e-8
    # outside the range the closed form keeps the start S = sum_t D_t (here only the float32
    # rounding of W0 + D_t, which falls below the 1e-10 cutoff)
    S = D.reshape(2, 6, 16).sum(dim=0)
    torch.testing.assert_close(closed @ null, S @ null, rtol=0, atol=1e-12)
    assert float((tau @ null).abs().max()) > 1e-2  # Adam does not


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", [(40, 24), (10, 24)], ids=["tall", "wide"])
def test_truncated_solve_matches_float64_truncated_pinv(shape, strategy):
    W0, experts = spectrum_experts(shape, 2, decay=5, seed=21)
    cutoff = truncated_rcond(shape[1])
    assert cutoff == shape[1] * 2.0 ** -23
    out = actmat_merge(W0, experts, solve="truncated", strategy=strategy)
    assert rel_err(out, actmat_truncated_reference(W0, experts), W0) < 1e-7  # kept kappa up to ~3e5
    exact = actmat_merge(W0, experts, solve="exact", strategy=strategy)
    assert rel_err(exact, out, W0) > 1e-3  # the cutoff drops directions the exact solve keeps
    wudi = wudi_merge(W0, experts, solve="truncated", strategy=strategy)
    ref = wudi_reference(W0, experts, rtol=cutoff)
    assert rel_err(wudi, ref, W0) < 1e-7
    # the start's component outside the kept range is nonzero here and kept
    assert rel_err(ref, wudi_reference(W0, experts, rtol=1e-10), W0) > 1e-3


def test_truncated_solve_through_auto_products():
    W0, experts = make_experts((48, 20), 3, [1.0, 0.5, 0.2], seed=23)
    ref = actmat_truncated_reference(W0, experts)
    assert rel_err(actmat_merge(W0, experts, solve="truncated", matmul_dtype="auto"), ref, W0) < 1e-4


def test_bad_parameters_are_refused_naming_them():
    W0, experts = make_experts((8, 6), 2, [1.0, 0.5], seed=1)
    with pytest.raises(MergeInputError, match="solver='sgd'"):
        wudi_merge(W0, experts, solver="sgd", name="w")
    with pytest.raises(MergeInputError, match="solve='approx'"):
        wudi_merge(W0, experts, solve="approx", name="w")
    with pytest.raises(MergeInputError, match="rcond"):
        actmat_merge(W0, experts, solve="truncated", rcond=1e-6, name="w")
    with pytest.raises(MergeInputError, match="iterations"):
        wudi_merge(W0, experts, solver="adam", iterations=2.5, name="w")
    with pytest.raises(MergeInputError, match="lr"):
        wudi_merge(W0, experts, solver="adam", lr=float("nan"), name="w")
    with pytest.raises(MergeInputError, match="positive"):
        actmat_merge(W0, experts, weights=[1.0, 0.0], name="w")


@pytest.mark.parametrize("solver", ["closed_form", "adam"])
def test_bad_inputs(solver):
    W0, experts = make_experts((8, 6), 2, [1.0, 0.5], seed=1)
    with pytest.raises(MergeInputError, match="'w'.*expert 1.*zero task vector"):
        wudi_merge(W0, [experts[0], W0.clone()], solver=solver, name="w")
    with pytest.raises(MergeInputError, match="shape mismatch"):
        wudi_merge(W0, [experts[0], experts[1][:, :5]], solver=solver, name="w")
    bad = experts[1].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(MergeInputError, match="non-finite"):
        wudi_merge(W0, [experts[0], bad], solver=solver, name="w")
    with pytest.raises(MergeInputError, match="2-D"):
        wudi_merge(W0[0], [e[0] for e in experts], solver=solver, name="w")
    before = [e.clone() for e in experts]
    wudi_merge(W0, experts, solver=solver, name="w")
    assert all(torch.equal(a, b) for a, b in zip(before, experts))
