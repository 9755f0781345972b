"""ACE's step-6 variants (``refinement``: add | rescale | none) and the exact refinement of low-rank
(LoRA-like) task vectors, against the independent float64 reference (tests/reference.py)."""

import itertools
import math

import pytest
import torch

from mergekit_ace.errors import MergeInputError
from mergekit_ace.execution.executor import execute_rule
from mergekit_ace.rules import ace as ace_rule
from mergekit_ace.rules.ace import REFINEMENTS, ace_merge
from tests.reference import ace_reference, contract_ratio, make_experts, rel_err

SHAPES = [(72, 24), (24, 72)]  # tall (Gram X^T X) and wide (Gram X X^T)
STRATEGIES = ["row_chunked", "expert_streamed", "row_recomputed", "output_gram"]


@pytest.mark.parametrize("shape", SHAPES, ids=["tall", "wide"])
@pytest.mark.parametrize("refinement", REFINEMENTS)
def test_each_refinement_matches_reference_in_every_strategy(shape, refinement):
    W0, experts = make_experts(shape, 3, [1.0, 0.02, 0.3], seed=7)
    ref, het = ace_reference(W0, experts, refinement=refinement)
    assert het
    for strategy, chunk in itertools.product(STRATEGIES, [None, 5]):
        out, diag = ace_merge(W0, experts, refinement=refinement, strategy=strategy, row_chunk=chunk,
                              return_diagnostics=True)
        assert rel_err(out, ref, W0) < 1e-9, (strategy, chunk)
        assert diag.refinement == refinement
    # "auto" products (float32 where the checks allow it) stay within the package's 1e-4.
    out = ace_merge(W0, experts, refinement=refinement, matmul_dtype="auto")
    assert rel_err(out, ref, W0) < 1e-4


def test_the_three_variants_differ_as_the_math_says():
    W0, experts = make_experts((60, 30), 3, [1.0, 0.05, 0.3], seed=8)
    k = int(0.3 * 30)
    add = ace_merge(W0, experts) - W0.double()
    rescale = ace_merge(W0, experts, refinement="rescale") - W0.double()
    none = ace_merge(W0, experts, refinement="none") - W0.double()
    # none is the preliminary solution P: k_frac = 0 gives the same.
    torch.testing.assert_close(none, ace_merge(W0, experts, k_frac=0.0) - W0.double(), rtol=0, atol=0)
    # rescale keeps P's singular vectors: its top-k singular values are all equal to their mean,
    # and the rest of P's spectrum is untouched.
    s_p = torch.linalg.svdvals(none)
    s_r = torch.linalg.svdvals(rescale)
    mean_k = float(s_p[:k].mean())
    top = s_r[s_r > mean_k * (1 - 1e-9)]
    assert top.numel() == k and float((top - mean_k).abs().max()) < 1e-9 * mean_k
    torch.testing.assert_close(torch.sort(s_r, descending=True).values[k:], s_p[k:], rtol=1e-9, atol=1e-12)
    # add is P + sigma_iso U_k V_k^T of F, a different matrix from the rescaling.
    assert float((add - rescale).norm()) > 1e-3 * float(add.norm())


def test_homogeneous_branch_ignores_refinement():
    W0, experts = make_experts((40, 20), 3, [3.0, 3.3, 2.7], seed=9)
    outs = [ace_merge(W0, experts, refinement=r) for r in REFINEMENTS]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)


def test_unknown_refinement_is_refused_naming_weight_and_parameter():
    W0, experts = make_experts((8, 4), 2, [1.0, 0.1], seed=0)
    with pytest.raises(MergeInputError, match=r"model\.layers\.0\.q\.weight.*refinement='foo'.*add, rescale, none"):
        ace_merge(W0, experts, refinement="foo", name="model.layers.0.q.weight")


def test_executor_plans_without_refinement_buffers_for_none():
    from mergekit_ace.execution.executor import refines

    assert refines({}) and refines({"refinement": "rescale"})
    assert not refines({"refinement": "none"}) and not refines({"k_frac": 0.0})
    W0, experts = make_experts((64, 32), 3, [1.0, 0.05, 0.3], seed=10)
    for refinement in REFINEMENTS:
        ref, _ = ace_reference(W0, experts, refinement=refinement)
        out = execute_rule("ace", ace_merge, W0, experts, refinement=refinement, budget=1e9)
        assert rel_err(out, ref, W0) < 1e-4


# --------------------------------------------------------------------------- low-rank updates
def low_rank_experts(shape, rank, norms, seed, decades=3.0):
    """Rank-``rank`` task vectors whose singular values span ``decades`` decades."""
    g = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    experts = []
    for norm in norms:
        U = torch.linalg.qr(torch.randn(d_out, rank, generator=g, dtype=torch.float64)).Q
        V = torch.linalg.qr(torch.randn(d_in, rank, generator=g, dtype=torch.float64)).Q
        s = torch.logspace(0, -decades, rank, dtype=torch.float64)
        D = U @ torch.diag(s) @ V.T
        experts.append(W0 + D / D.norm() * norm)
    return W0, experts


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)], ids=["tall", "wide"])
@pytest.mark.parametrize("refinement", ["add", "rescale"])
def test_rank_r_updates_with_r_much_below_k_are_refined_exactly(shape, refinement):
    """k = 36 >> T * r = 24: the null directions of F (or P) get no term, so every strategy gives
    the well-defined answer (the float64 SVD reference with null pairs dropped) to 1e-8."""
    # Norms 1-3x apart: the smallest non-null singular value of F is ~1e-4 of the largest, which
    # the float64 Gram route resolves to ~1e-9 (with 20x apart, ~5e-5 and ~5e-6: the Gram's limit).
    W0, experts = low_rank_experts(shape, rank=8, norms=[1.0, 0.3, 0.5], seed=11)
    ref, het = ace_reference(W0, experts, refinement=refinement)
    assert het
    outs = []
    for strategy, chunk in itertools.product(STRATEGIES, [None, 7]):
        out = ace_merge(W0, experts, refinement=refinement, strategy=strategy, row_chunk=chunk)
        assert rel_err(out, ref, W0) < 1e-8, (strategy, chunk)
        outs.append(out)
    for out in outs[1:]:
        assert rel_err(out, outs[0], W0) < 1e-8
    # "auto" products fall back to float64 where float32 cannot tell null directions apart.
    auto = ace_merge(W0, experts, refinement=refinement, matmul_dtype="auto")
    assert rel_err(auto, ref, W0) < 1e-6


def test_null_mask_cuts_on_gram_eigenvalues():
    lam = torch.tensor([4.0, 1e-6, 1e-13, 0.0, -1e-14], dtype=torch.float64)
    keep = ace_rule.gram_null_mask(lam, 4.0, 1000, torch.float64)
    assert keep.tolist() == [True, True, False, False, False]
    # float32 Grams resolve much less: 1e-6 of lambda_max is within 1000 float32 roundoffs.
    keep32 = ace_rule.gram_null_mask(lam, 4.0, 1000, torch.float32)
    assert keep32.tolist() == [True, False, False, False, False]


# --------------------------------------------------------------------------- Gram route or SVD
def test_a_gram_that_cannot_tell_a_small_direction_from_a_null_one_hands_over_to_the_svd():
    """X = U diag(1, ..., 1, sqrt(5e-4)) V^T, 8192 x 256, k = rank = 200: lambda_k = 5e-4 lambda_1 is
    below the float32 null floor (8192 * eps32 = 9.8e-4) but the gap after it is large, so the error
    estimate of the kept pairs alone would accept the float32 Gram and drop the k-th direction's
    sigma_iso term (7% of the correction). The null decision sends it to the SVD."""
    from mergekit_ace.rules.precision import null_decision_is_clear

    g = torch.Generator().manual_seed(0)
    m, n, r = 8192, 256, 200
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64)).Q
    s = torch.ones(r, dtype=torch.float64)
    s[-1] = 5e-4 ** 0.5
    X = U @ torch.diag(s) @ V.T
    X32 = X.float()
    exact = float(s.sum() / r) * U @ V.T  # sigma_iso U_k V_k^T, every direction kept
    P = torch.zeros(m, n, dtype=torch.float64)
    sigma_iso, route = ace_rule._refine(P, lambda rows: X32[rows], r, torch.float32, None, allowed_error=1.0)
    assert route == "svd"
    assert abs(sigma_iso - float(s.mean())) < 1e-7
    assert float((P - exact).norm() / exact.norm()) < 1e-6
    lam = torch.tensor([1.0] * (r - 1) + [5e-4, 0.0], dtype=torch.float64)
    assert not null_decision_is_clear(lam, r, m, torch.float32)
    assert null_decision_is_clear(lam, r, m, torch.float64)
    lam[r - 1] = 1e-2  # 10x above the float32 margin (9.8e-3)
    assert null_decision_is_clear(lam, r, m, torch.float32)
    lam[r - 1] = 1e-5  # 10x below the floor: clearly null
    assert null_decision_is_clear(lam, r, m, torch.float32)


def spread_low_rank_experts(shape, seed):
    """The issue's hard case: rank-8 task vectors with singular values 1 .. 1e-3 and norms
    1e-2 : 1e-1 : 1, float64 inputs."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    experts = []
    for norm in (1e-2, 1e-1, 1.0):
        Uq = torch.linalg.qr(torch.randn(m, 8, generator=g, dtype=torch.float64)).Q
        Vq = torch.linalg.qr(torch.randn(n, 8, generator=g, dtype=torch.float64)).Q
        D = (Uq * torch.logspace(0, -3, 8, dtype=torch.float64)) @ Vq.T
        experts.append(W0 + D * (norm / D.norm()))
    return W0, experts


@pytest.mark.parametrize("shape", [(120, 90), (90, 150)], ids=["tall", "wide"])
@pytest.mark.parametrize("refinement", ["add", "rescale"])
def test_rank8_refinement_within_1e6_of_the_svd_reference_for_float64_outputs(shape, refinement):
    """The Gram route's singular vectors of directions near its floor are off by ~u sigma_1^2 /
    (sigma gap); for a float64 result the contract leaves no room for that, so the refinement takes
    the SVD and every strategy lands within 1e-6 of the float64 SVD reference."""
    W0, experts = spread_low_rank_experts(shape, seed=3)
    ref, het = ace_reference(W0, experts, refinement=refinement)
    assert het
    for strategy in STRATEGIES:
        out, diag = ace_merge(W0, experts, refinement=refinement, strategy=strategy, row_chunk=40,
                              return_diagnostics=True)
        assert rel_err(out, ref, W0) < 1e-6, strategy
        assert "SVD" in diag.precision


@pytest.mark.parametrize("refinement", ["add", "rescale"])
def test_bf16_outputs_keep_the_gram_route_where_it_meets_their_contract(refinement):
    """The same merge stored in bf16: with ``add`` the Gram route's error estimate is below 0.3 of
    the bf16 rounding, so the eigendecomposition of the smaller Gram serves; ``rescale`` lifts P's
    own near-floor directions (coefficients up to sigma_iso / sigma_min) and takes the SVD. Both
    within the contract."""
    W0, experts = spread_low_rank_experts((120, 90), seed=3)
    ref, _ = ace_reference(W0, experts, refinement=refinement)
    out, diag = ace_merge(W0, experts, refinement=refinement, output_dtype=torch.bfloat16, return_diagnostics=True)
    assert diag.precision == ("float64" if refinement == "add" else "float64 (SVD of P)")
    assert contract_ratio(out, ref) <= 0.3


@pytest.mark.parametrize("case", ["noise", "rank8-tall", "rank8-wide"])
def test_refinement_error_estimate_is_not_below_the_gram_routes_true_error(case):
    """The estimate (precision.refinement_error_estimate) against the difference between the Gram
    route and a full float64 SVD of the same matrix: never below it, at most ~100x above."""
    from mergekit_ace.rules.precision import refinement_error_estimate

    g = torch.Generator().manual_seed(5)
    if case == "noise":
        X = torch.randn(300, 160, generator=g, dtype=torch.float64)
    else:
        m, n = (128, 96) if case == "rank8-tall" else (96, 160)
        X = torch.zeros(m, n, dtype=torch.float64)
        for norm in (1e-2, 1e-1, 1.0):
            Uq = torch.linalg.qr(torch.randn(m, 8, generator=g, dtype=torch.float64)).Q
            Vq = torch.linalg.qr(torch.randn(n, 8, generator=g, dtype=torch.float64)).Q
            X += norm * (Uq * torch.logspace(0, -3, 8, dtype=torch.float64)) @ Vq.T
    k = int(0.3 * min(X.shape))
    gram_route = torch.zeros_like(X)
    ace_rule._refine(gram_route, lambda rows: X[rows], k, torch.float64, allowed_error=math.inf)
    svd_route = torch.zeros_like(X)
    ace_rule._refine(svd_route, lambda rows: X[rows], k, torch.float64, allowed_error=0.0)
    true_error = float((gram_route - svd_route).norm())
    m, n = X.shape
    gram = X.T @ X if m >= n else X @ X.T
    lam = torch.linalg.eigvalsh(gram).flip(0)[:k + 1]
    keep = ace_rule.gram_null_mask(lam[:k], float(lam[0]), max(m, n), torch.float64)
    sigma = lam[:k].clamp_min(0).sqrt() * keep
    sigma_iso = float(sigma.mean())
    coef = torch.where(keep, sigma_iso / sigma.clamp_min(1e-300), torch.zeros(()))
    estimate = refinement_error_estimate(lam, int(keep.sum()), sigma_iso, coef, torch.float64)
    assert true_error <= estimate <= 100 * true_error


@pytest.mark.parametrize("shape", [(300, 120), (120, 300)], ids=["tall", "wide"])
def test_rank_r_updates_auto_products_in_every_strategy(shape):
    W0, experts = low_rank_experts(shape, rank=8, norms=[1.0, 0.3, 0.5], seed=12)
    for refinement in ("add", "rescale"):
        ref, _ = ace_reference(W0, experts, refinement=refinement)
        for strategy in STRATEGIES:
            out = ace_merge(W0, experts, refinement=refinement, strategy=strategy, row_chunk=50,
                            matmul_dtype="auto")
            assert rel_err(out, ref, W0) < 1e-6, (refinement, strategy)


def test_memory_estimate_drops_refinement_buffers_for_none():
    from mergekit_ace.execution.executor import refines
    from mergekit_ace.execution.memory import estimate

    for strategy in STRATEGIES:
        for shape in [(4096, 1024), (1024, 4096)]:
            full = estimate("ace", strategy, *shape, 3, refine=refines({"refinement": "add"}))
            none = estimate("ace", strategy, *shape, 3, refine=refines({"refinement": "none"}))
            assert none.peak_bytes < full.peak_bytes and none.matmul_flops < full.matmul_flops, strategy
            assert none == estimate("ace", strategy, *shape, 3, refine=False)
