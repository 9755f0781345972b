"""ACE-Merging against the independent float64 reference, its branches, limits and numerics."""

import math

import pytest
import torch

from mergekit_ace.rules import ace as ace_rule
from mergekit_ace.rules.ace import ace_merge, collective_prior, heterogeneity, is_heterogeneous
from tests.reference import ace_reference, make_experts, rel_err

SHAPES = [(48, 20), (20, 48)]  # tall, wide


@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide"])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("branch", ["homogeneous", "heterogeneous"])
def test_matches_reference_both_branches(shape, T, branch):
    norms = [3.0, 3.3, 2.7, 3.15, 2.85] if branch == "homogeneous" else [1.0, 0.01, 0.1, 0.003, 0.3]
    W0, experts = make_experts(shape, T, norms, seed=T)
    ref, het = ace_reference(W0, experts)
    out, diag = ace_merge(W0, experts, return_diagnostics=True)
    expected_het = branch == "heterogeneous" and T > 1
    assert het == expected_het and diag.heterogeneous == expected_het
    assert rel_err(out, ref, W0) < 1e-4


@pytest.mark.parametrize("shape", [(64, 24), (24, 64)], ids=["tall", "wide"])
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
def test_update_norms_differing_100x(shape, T):
    # Norms spanning 100x: float32 algebra would drop the small experts' contributions.
    norms = [1.0, 0.01, 0.1, 0.03, 0.3, 0.05, 0.5, 0.02]
    W0, experts = make_experts(shape, T, norms, seed=10 + T, base_scale=0.5)
    for tau in (0.3, 1e9):  # natural branch, and forced homogeneous branch
        ref, _ = ace_reference(W0, experts, tau=tau)
        out = ace_merge(W0, experts, tau=tau)
        assert rel_err(out, ref, W0) < 1e-4
    # The small experts' part of the homogeneous merge is recovered, not rounded away.
    if T > 1:
        ref_without, _ = ace_reference(W0, experts[:1] + experts[2:], tau=1e9)
        ref_with, _ = ace_reference(W0, experts, tau=1e9)
        out_without = ace_merge(W0, experts[:1] + experts[2:], tau=1e9)
        out_with = ace_merge(W0, experts, tau=1e9)
        contribution_ref = ref_with - ref_without
        contribution = out_with - out_without
        assert float((contribution - contribution_ref).norm() / contribution_ref.norm()) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs(dtype):
    W0, experts = make_experts((40, 24), 3, [1.0, 0.05, 0.3], seed=3)
    W0, experts = W0.to(dtype), [e.to(dtype) for e in experts]
    ref, _ = ace_reference(W0, experts)  # the reference sees the same rounded inputs
    out = ace_merge(W0, experts)
    assert out.dtype == torch.float64
    assert rel_err(out, ref, W0) < 1e-4


def test_parameters_change_the_result_as_specified():
    W0, experts = make_experts((40, 24), 3, [1.0, 0.02, 0.3], seed=4)
    for params in [dict(epsilon=1e-3), dict(tau=0.05), dict(k_frac=0.5), dict(scale=0.4),
                   dict(epsilon=0.02, k_frac=0.1)]:
        ref, _ = ace_reference(W0, experts, **params)
        out = ace_merge(W0, experts, **params)
        assert rel_err(out, ref, W0) < 1e-4, params


def test_scale_multiplies_the_merged_task_vector():
    W0, experts = make_experts((30, 16), 3, [1.0, 0.2, 0.05], seed=5)
    P1 = ace_merge(W0, experts, scale=1.0) - W0.double()
    P2 = ace_merge(W0, experts, scale=0.3) - W0.double()
    torch.testing.assert_close(P2, 0.3 * P1, rtol=1e-10, atol=1e-12)


def test_row_chunks_do_not_change_the_result():
    W0, experts = make_experts((50, 12), 3, [1.0, 0.01, 0.2], seed=6)
    whole = ace_merge(W0, experts)
    for chunk in (1, 7, 13, 50, 1000):
        torch.testing.assert_close(ace_merge(W0, experts, row_chunk=chunk), whole, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- building blocks
def test_heterogeneity_matches_formula_and_t1_is_homogeneous():
    traces = [2.0, 0.5, 0.01]
    logs = [math.log(t + 1e-12) for t in traces]
    mean = sum(logs) / 3
    var = sum((x - mean) ** 2 for x in logs) / 2
    assert heterogeneity(traces) == pytest.approx(var / (mean**2 + 1e-12), rel=1e-12)
    assert math.isnan(heterogeneity([3.0]))
    assert not is_heterogeneous(heterogeneity([3.0]), 0.3)
    assert is_heterogeneous(0.31, 0.3) and not is_heterogeneous(0.3, 0.3)


def test_collective_prior_is_row_mean_and_scaled_in_het_branch():
    S = torch.tensor([[2.0, 1.0], [4.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(collective_prior(S, [1.0, 3.0], False), torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(
        collective_prior(S, [1.0, 3.0], True), torch.tensor([3.0, 2.0], dtype=torch.float64) / (2.0 + 1e-12)
    )


def test_prior_solver_equals_explicit_inverse():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 12, generator=g, dtype=torch.float64)
    M = X.T @ X + 1e-3 * torch.eye(12, dtype=torch.float64)
    c = torch.rand(12, generator=g, dtype=torch.float64)
    N = torch.randn(9, 12, generator=g, dtype=torch.float64)
    A = M + torch.ones(12, 1, dtype=torch.float64) @ c[None]
    torch.testing.assert_close(ace_rule.closed_form(N, M, c), N @ torch.linalg.inv(A), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
def test_spectral_refinement_equals_full_svd(shape):
    g = torch.Generator().manual_seed(1)
    P = torch.randn(*shape, generator=g, dtype=torch.float64)
    Res = torch.randn(*shape, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(P + Res, full_matrices=False)
    k = math.floor(0.3 * min(shape))
    expected = P + S[:k].mean() * U[:, :k] @ Vh[:k]
    torch.testing.assert_close(ace_rule.spectral_refinement(P, Res, 0.3), expected, rtol=1e-9, atol=1e-10)


# ------------------------------------------------------------------- limits (docs/methods.md)
def test_limit_large_epsilon_homogeneous_is_mean_of_centred_task_vectors():
    W0, experts = make_experts((40, 16), 3, [3.0, 3.6, 2.7], seed=7)
    out = ace_merge(W0, experts, epsilon=1e9, tau=1e9)  # homogeneous branch, ridge dominates
    D = [e.double() - W0.double() for e in experts]
    centred_mean = sum(d - d.mean(0, keepdim=True) for d in D) / 3
    expected = W0.double() + centred_mean
    assert rel_err(out, expected, W0) < 1e-6
    # ...which is not the experts' plain average (the row means are removed)
    plain = W0.double() + sum(D) / 3
    assert rel_err(out, plain, W0) > 1e-3


def test_limit_large_epsilon_heterogeneous_refinement_blows_up():
    W0, experts = make_experts((40, 16), 3, [1.0, 0.01, 0.1], seed=8)
    sizes = []
    for eps in (1e-5, 1e2, 1e6):
        out, diag = ace_merge(W0, experts, epsilon=eps, return_diagnostics=True)
        assert diag.heterogeneous
        s = [float(((d - d.mean(0)) ** 2).sum()) + 1e-12 for d in (e.double() - W0.double() for e in experts)]
        assert diag.eps_over_s == pytest.approx([eps / x for x in s], rel=1e-9)
        sizes.append(float((out - W0.double()).norm()))
    assert sizes[2] > 100 * sizes[0]


def test_limit_k_frac_zero_is_unrefined_closed_form():
    W0, experts = make_experts((40, 16), 3, [1.0, 0.01, 0.1], seed=9)
    out, diag = ace_merge(W0, experts, k_frac=0.0, return_diagnostics=True)
    assert diag.heterogeneous and diag.k == 0
    ref, _ = ace_reference(W0, experts, k_frac=0.0)
    assert rel_err(out, ref, W0) < 1e-8
    # and with refinement the result differs
    assert rel_err(ace_merge(W0, experts), ref, W0) > 1e-3


def test_epsilon_zero_rank_deficient_uses_pseudo_inverse():
    # Low-rank updates and epsilon = 0: sum_t R_t is singular; the rule falls back to A^+.
    W0, experts = make_experts((30, 16), 2, [1.0, 1.0], seed=11, rank=2)
    out = ace_merge(W0, experts, epsilon=0.0, tau=1e9)
    assert torch.isfinite(out).all()
    ref, _ = ace_reference(W0, experts, epsilon=0.0, tau=1e9, force_pinv=True)
    assert rel_err(out, ref, W0) < 1e-4
