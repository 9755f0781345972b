"""ACTMat against the independent float64 reference, its singular case and the literal option."""

import pytest
import torch

from mergekit_ace.rules.actmat import actmat_merge, covariance_alignment
from tests.reference import actmat_reference, make_experts, rel_err


@pytest.mark.parametrize("shape", [(48, 20), (20, 48)], ids=["tall", "wide"])
@pytest.mark.parametrize("T", [1, 2, 3, 4, 5])
def test_matches_reference(shape, T):
    W0, experts = make_experts(shape, T, [1.0, 0.2, 0.05, 0.5, 0.01], seed=20 + T)
    for scale in (1.0, 0.5):
        ref = actmat_reference(W0, experts, scale=scale)
        out = actmat_merge(W0, experts, scale=scale)
        assert rel_err(out, ref, W0) < 1e-4


@pytest.mark.parametrize("T", [1, 2, 3, 5, 8])
def test_update_norms_differing_100x(T):
    W0, experts = make_experts((64, 24), T, [1.0, 0.01, 0.1, 0.03, 0.3, 0.05, 0.5, 0.02], seed=30 + T)
    assert rel_err(actmat_merge(W0, experts), actmat_reference(W0, experts), W0) < 1e-4


def test_invertible_case_is_regmean_closed_form():
    # Tall weights with full-rank updates: A is invertible and W = (sum W_t C_t)(sum C_t)^-1.
    W0, experts = make_experts((60, 16), 3, [1.0, 0.3, 0.1], seed=2)
    Ws = [e.double() for e in experts]
    Cs = [(w - W0.double()).T @ (w - W0.double()) for w in Ws]
    expected = sum(w @ c for w, c in zip(Ws, Cs)) @ torch.linalg.inv(sum(Cs))
    out = actmat_merge(W0, experts)
    assert rel_err(out, expected, W0) < 1e-8
    assert rel_err(actmat_merge(W0, experts, keep_base=False), expected, W0) < 1e-8


def test_singular_case_keeps_base_outside_covariance_range():
    # Low-rank updates of a wide weight: A = sum_t D_t^T D_t has rank <= 2T < d_in.
    W0, experts = make_experts((16, 40), 2, [1.0, 0.5], seed=3, rank=3)
    out, diag = actmat_merge(W0, experts, return_diagnostics=True)
    assert diag.rank == 6
    D = torch.cat([e.double() - W0.double() for e in experts])
    # Directions orthogonal to every expert's row space: the merge must act exactly like the base.
    _, _, Vh = torch.linalg.svd(D)
    null = Vh[6:].T  # d_in x (d_in - 6)
    torch.testing.assert_close(out @ null, W0.double() @ null, rtol=0, atol=1e-10)
    assert rel_err(out, actmat_reference(W0, experts), W0) < 1e-4


def test_literal_option_reproduces_paper_minimum_norm_solution():
    W0, experts = make_experts((16, 40), 2, [1.0, 0.5], seed=4, rank=3)
    out = actmat_merge(W0, experts, keep_base=False)
    A = sum((e.double() - W0.double()).T @ (e.double() - W0.double()) for e in experts)
    paper = sum(e.double() @ ((e.double() - W0.double()).T @ (e.double() - W0.double())) for e in experts)
    paper = paper @ torch.linalg.pinv(A, rtol=1e-10)
    assert rel_err(out, paper, W0) < 1e-6
    assert rel_err(out, actmat_reference(W0, experts, keep_base=False), W0) < 1e-6
    # The literal solution zeroes the base outside A's range; the default does not.
    _, _, Vh = torch.linalg.svd(torch.cat([e.double() - W0.double() for e in experts]))
    null = Vh[6:].T
    assert float((out @ null).abs().max()) < 1e-10
    assert float((W0.double() @ null).abs().max()) > 0.1


def test_row_chunks_do_not_change_the_result():
    W0, experts = make_experts((50, 12), 3, [1.0, 0.01, 0.2], seed=6)
    whole = actmat_merge(W0, experts)
    for chunk in (1, 9, 50):
        torch.testing.assert_close(actmat_merge(W0, experts, row_chunk=chunk), whole, rtol=1e-10, atol=1e-12)


def test_covariance_alignment_is_cosine_of_grams():
    W0, experts = make_experts((30, 10), 3, [1.0, 0.5, 0.2], seed=7)
    D = [e.double() - W0.double() for e in experts]
    cos = covariance_alignment(D)
    G = [d.T @ d for d in D]
    expected01 = float((G[0] * G[1]).sum() / (G[0].norm() * G[1].norm()))
    assert float(cos[0, 1]) == pytest.approx(expected01, rel=1e-10)
    torch.testing.assert_close(torch.diagonal(cos), torch.ones(3, dtype=torch.float64))
