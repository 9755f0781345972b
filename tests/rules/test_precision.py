"""The "auto" precision of the products (rules/precision.py): float32 where the estimates allow it,
float64 otherwise, and 1e-4 of the float64 reference either way; and the exact pieces it relies on
(extreme-eigenvalue estimates, the top-k eigensolver, the symmetric Gram, ACTMat's Cholesky path)."""

import functools
import math

import pytest
import torch

from mergekit_ace.fixtures.synthetic import layer_experts
from mergekit_ace.rules import actmat as actmat_rule
from mergekit_ace.rules.ace import ace_merge, proxy_sum_trace_bound
from mergekit_ace.rules.actmat import CholeskySolve, SymmetricPseudoInverse, actmat_merge, range_solver
from mergekit_ace.rules.linalg import add_gram_, symmetrize_gram_
from mergekit_ace.rules.precision import (
    TRACE_SLACK,
    UNIT_ROUNDOFF_FLOAT32,
    ErrorBudget,
    NeedsFloat64,
    RunningConditionBound,
    condition_lower_bound,
    extreme_eigenvalues,
    resolve_matmul_dtype,
    solve_error_estimate,
    storage_rounding_error,
    top_eigenpairs,
    top_eigenvalue_lower_bound,
    unit_roundoff,
)
from mergekit_ace.rules.task_vectors import TaskVectors
from tests.reference import ace_reference, actmat_reference, contract_ratio, rel_err, stored_ratio


def bf16_experts(shape, scales=(1.0, 0.1, 0.5), std=1e-3, spectrum=None, rank=None, seed=0):
    """A bf16 base and experts as fine-tuned checkpoints store them: W0 ~ N(0, 0.02^2), updates of
    relative size ``scales``; full rank, ``rank``-limited, or with singular values ~ i^-spectrum."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    W0 = (torch.randn(m, n, generator=g) * 0.02).to(torch.bfloat16)
    experts = []
    for s in scales:
        if rank is not None:
            d = torch.randn(m, rank, generator=g) @ torch.randn(rank, n, generator=g) / math.sqrt(rank)
        else:
            d = torch.randn(m, n, generator=g)
        if spectrum is not None:
            U, S, Vh = torch.linalg.svd(d, full_matrices=False)
            S = torch.arange(1, S.numel() + 1, dtype=torch.float32) ** -spectrum
            d = U @ torch.diag(S) @ Vh
            d = d / d.std()
        experts.append((W0.float() + d * std * s).to(torch.bfloat16))
    return W0, experts


WELL_CONDITIONED = [(384, 256), (256, 256), (96, 512)]
BF16 = torch.bfloat16


def assert_contract(out, ref, dtype=BF16):
    """The precision contract against the independent float64 reference: the computation adds at
    most 0.3 of the result's storage rounding, so the stored result is within 1.05x of the best."""
    assert contract_ratio(out, ref, dtype) <= 0.3
    assert stored_ratio(out, ref, dtype) <= 1.05


@pytest.mark.parametrize("shape", WELL_CONDITIONED)
@pytest.mark.parametrize("tau, refinement", [(0.3, "none"), (1e9, "add")], ids=["het-none", "homogeneous"])
def test_ace_auto_uses_float32_where_the_bf16_contract_allows(shape, tau, refinement):
    W0, experts = bf16_experts(shape)
    ref, het = ace_reference(W0, experts, tau=tau, refinement=refinement)
    out, diag = ace_merge(W0, experts, tau=tau, refinement=refinement, matmul_dtype="auto",
                          output_dtype=BF16, return_diagnostics=True)
    assert diag.precision == "float32" and diag.heterogeneous == het
    assert rel_err(out, ref, W0) > 1e-12  # float32 products really ran
    assert_contract(out, ref)


@pytest.mark.parametrize("shape", [(384, 256), (256, 256), (1024, 96)])  # 1024 > 3 x 96: per-expert solve
def test_actmat_auto_uses_float32_for_a_well_conditioned_sum(shape):
    W0, experts = bf16_experts(shape)
    ref = actmat_reference(W0, experts)
    out, diag = actmat_merge(W0, experts, matmul_dtype="auto", output_dtype=BF16, return_diagnostics=True)
    assert diag.precision == "float32"
    assert rel_err(out, ref, W0) > 1e-12
    assert_contract(out, ref)


@pytest.mark.parametrize("output_dtype", [None, torch.float32])
def test_float32_and_float64_outputs_take_float64_products_without_an_attempt(monkeypatch, output_dtype):
    """0.3 of a float32 result's rounding is below float32 products' own error: no attempt at all."""
    seen = []
    original = actmat_rule._actmat
    monkeypatch.setattr(actmat_rule, "_actmat",
                        lambda *a, check, **kw: seen.append(a[-1]) or original(*a, check=check, **kw))
    W0, experts = bf16_experts((384, 256))
    out = actmat_merge(W0, experts, matmul_dtype="auto", output_dtype=output_dtype)
    assert seen == [torch.float64]
    assert rel_err(out, actmat_reference(W0, experts), W0) < 1e-9


def test_ace_refinement_goes_to_float64_before_any_product(monkeypatch):
    """The heterogeneous branch with a refinement: F's top-k subspace sits in its noise bulk, which
    float32 products can turn by more than the contract allows (docs/execution.md: 0.35 on a
    TinyLlama-shaped down_proj, ~10x in the issue's measurement); "auto" decides float64 after
    step 1, before any Gram."""
    W0, experts = layer_experts((512, 512))
    grams = []
    gram = TaskVectors.gram
    monkeypatch.setattr(TaskVectors, "gram", lambda self, *a, **k: grams.append(self.dtype) or gram(self, *a, **k))
    ref, het = ace_reference(W0, experts)
    assert het
    out, diag = ace_merge(W0, experts, matmul_dtype="auto", output_dtype=BF16, return_diagnostics=True)
    assert diag.precision == "float64" and torch.float32 not in grams
    assert_contract(out, ref)


ILL_CONDITIONED = [
    dict(rank=16),  # low-rank updates (+ bf16 rounding noise): tiny gap at the k-th singular value
    dict(spectrum=1.0),  # singular values ~ 1/i, as fine-tuning updates tend to have
    dict(std=0.1, scales=(1.0, 0.01, 0.3)),  # large updates, 100x norm spread
]


@pytest.mark.parametrize("shape", [(256, 256), (96, 512), (512, 128), (1024, 96)])
@pytest.mark.parametrize("case", ILL_CONDITIONED, ids=["rank16", "spectrum", "large"])
def test_auto_holds_the_contract_on_ill_conditioned_weights(shape, case):
    """Where float32 products would break the bf16 contract, "auto" notices and uses float64."""
    W0, experts = bf16_experts(shape, **case)
    for tau in (0.3, 1e9):
        for refinement in ("add", "none"):
            ref, _ = ace_reference(W0, experts, tau=tau, refinement=refinement)
            out, diag = ace_merge(W0, experts, tau=tau, refinement=refinement, matmul_dtype="auto",
                                  output_dtype=BF16, return_diagnostics=True)
            assert contract_ratio(out, ref) <= 0.3, (tau, refinement, diag.precision)
    out, diag = actmat_merge(W0, experts, solve="exact", matmul_dtype="auto", output_dtype=BF16,
                             return_diagnostics=True)
    assert contract_ratio(out, actmat_reference(W0, experts)) <= 0.3, diag.precision


def test_auto_falls_back_where_unchecked_float32_breaks_the_contract():
    """A nearly singular ACTMat sum (T d_out just above d_in, as the 3B/7B down_proj): unchecked
    float32 products miss the bf16 contract; "auto" takes float64 there."""
    W0, experts = bf16_experts((176, 512), spectrum=1.0)  # 3 x 176 = 528 vs d_in = 512
    ref = actmat_reference(W0, experts)
    assert contract_ratio(actmat_merge(W0, experts, solve="exact", matmul_dtype=torch.float32), ref) > 0.3
    out, diag = actmat_merge(W0, experts, solve="exact", matmul_dtype="auto", output_dtype=BF16,
                             return_diagnostics=True)
    assert diag.precision == "float64" and rel_err(out, ref, W0) < 1e-7
    assert_contract(out, ref)


def test_singular_actmat_sum_skips_float32_before_any_eigendecomposition(monkeypatch):
    """A rank-deficient sum_t C_t is detected from the Cholesky factor; the pseudo-inverse's
    eigendecomposition then runs once, in the float64 pass."""
    calls = []
    original = SymmetricPseudoInverse.of.__func__

    def counting(cls, A, rcond=None):
        calls.append(A.dtype)
        return original(cls, A, rcond)

    monkeypatch.setattr(SymmetricPseudoInverse, "of", classmethod(counting))
    g = torch.Generator().manual_seed(3)
    W0 = torch.randn(200, 64, generator=g, dtype=torch.float64)
    experts = [W0 + torch.randn(200, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 64, generator=g,
                                                                                         dtype=torch.float64)
               for _ in range(3)]  # rank(A) = 12 < 64
    out, diag = actmat_merge(W0, experts, matmul_dtype="auto", output_dtype=BF16, return_diagnostics=True)
    assert diag.precision == "float64" and diag.rank == 12 and calls == [torch.float64]
    assert rel_err(out, actmat_reference(W0, experts), W0) < 1e-9


def test_wide_actmat_is_known_singular_and_goes_straight_to_float64(monkeypatch):
    """T d_out <= d_in: A cannot be well conditioned, so not even the float32 Grams are computed."""
    seen = []
    original = actmat_rule._actmat

    def spy(*args, check, **kw):
        seen.append(args[-1])
        return original(*args, check=check, **kw)

    monkeypatch.setattr(actmat_rule, "_actmat", spy)
    W0, experts = bf16_experts((32, 256))
    out = actmat_merge(W0, experts, matmul_dtype="auto", output_dtype=BF16)
    assert seen == [torch.float64]
    assert rel_err(out, actmat_reference(W0, experts), W0) < 1e-9


def test_range_solver_uses_cholesky_when_invertible_with_the_pseudo_inverses_result():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(300, 80, generator=g, dtype=torch.float64)
    A = X.T @ X
    N = torch.randn(7, 80, generator=g, dtype=torch.float64)
    solver, kappa = range_solver(A)
    assert isinstance(solver, CholeskySolve) and 1 < kappa < 1e3
    torch.testing.assert_close(solver.apply(N), SymmetricPseudoInverse.of(A).apply(N), rtol=1e-10, atol=1e-12)
    singular = X[:, :20].T @ X[:, :20]
    singular = torch.block_diag(singular, torch.zeros(5, 5, dtype=torch.float64))
    solver, kappa = range_solver(singular)
    assert isinstance(solver, SymmetricPseudoInverse) and solver.rank == 20 and kappa == math.inf


@pytest.mark.parametrize("smallest, cholesky", [(1e-8, True), (3e-9, True), (5e-10, False), (5e-11, False)])
def test_range_solver_near_the_cutoff(smallest, cholesky):
    # lambda_min / lambda_max from an 8192-wide down_proj's 6e-8 down to below the 1e-10 cutoff,
    # the smallest 30 eigenvalues clustered (the hard case for the estimate): Cholesky only
    # where every eigenvalue clears the cutoff by the margin, and the pseudo-inverse's result
    g = torch.Generator().manual_seed(6)
    n = 200
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    spectrum = torch.cat([torch.full((30,), smallest, dtype=torch.float64),
                          torch.logspace(math.log10(smallest) + 1, 0, n - 30, dtype=torch.float64)])
    A = (Q * spectrum) @ Q.T
    A = 0.5 * (A + A.T)
    solver, kappa = range_solver(A)
    assert isinstance(solver, CholeskySolve) is cholesky
    if cholesky:
        assert kappa == pytest.approx(1 / smallest, rel=0.05)
        N = torch.randn(7, n, generator=g, dtype=torch.float64)
        expected = SymmetricPseudoInverse.of(A).apply(N)
        # both are backward stable: forward errors ~ kappa u
        assert float((solver.apply(N) - expected).norm() / expected.norm()) < 1e-5


def test_extreme_eigenvalue_estimates():
    g = torch.Generator().manual_seed(5)
    Q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    spectrum = torch.logspace(-4, 1, 300, dtype=torch.float64)
    M = Q @ torch.diag(spectrum) @ Q.T
    lam_min, lam_max = extreme_eigenvalues(M, torch.linalg.cholesky(M))
    assert lam_max == pytest.approx(10.0, rel=0.02)
    assert lam_min == pytest.approx(1e-4, rel=0.1)
    assert lam_min >= 1e-4 * (1 - 1e-3) and lam_max <= 10.0 * (1 + 1e-3)  # they err towards smaller kappa


@pytest.mark.parametrize("count", [1, 37, 99, 100, 399])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_eigenpairs_equal_a_full_eigendecomposition(dtype, count):
    """Both CPU drivers: below FULL_DECOMPOSITION_FRACTION of the pairs MRRR (evr), from it divide
    and conquer (evd); the same pairs, descending, either way."""
    from mergekit_ace.rules import precision

    assert precision.FULL_DECOMPOSITION_FRACTION * 400 == 100  # 1-99 take evr, 100 and 399 evd
    g = torch.Generator().manual_seed(6)
    X = torch.randn(500, 400, generator=g, dtype=torch.float64)
    G = (X.T @ X).to(dtype)
    values, vectors = top_eigenpairs(G, count)
    full_values, full_vectors = torch.linalg.eigh(G.double())
    assert values.shape == (count,) and vectors.shape == (400, count)
    assert bool((values[:-1] >= values[1:]).all())
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(values.double(), full_values.flip(0)[:count], rtol=tol, atol=0)
    overlap = (vectors.double().T @ full_vectors.flip(1)[:, :count]).abs()
    torch.testing.assert_close(overlap.diagonal(), torch.ones(count, dtype=torch.float64), rtol=0, atol=100 * tol)
    assert top_eigenpairs(G, 400)[0].shape == (400,)  # the whole spectrum


@pytest.mark.parametrize("n", [100, 700, 2100])
def test_symmetric_gram_equals_full_product(n):
    g = torch.Generator().manual_seed(7)
    gram = torch.zeros(n, n, dtype=torch.float64)
    blocks = [torch.randn(rows, n, generator=g, dtype=torch.float64) for rows in (13, 50)]
    for X in blocks:
        add_gram_(gram, X)
    symmetrize_gram_(gram)
    X = torch.cat(blocks)
    torch.testing.assert_close(gram, X.T @ X, rtol=1e-12, atol=1e-10)


def test_error_estimates():
    u = UNIT_ROUNDOFF_FLOAT32
    assert solve_error_estimate(4.0) == pytest.approx(20 * u)  # 10 sqrt(kappa) dominates
    assert solve_error_estimate(1e4, amplification=2.0) == pytest.approx(2e4 * u)
    assert solve_error_estimate(math.inf) == math.inf
    assert unit_roundoff(torch.bfloat16) == 2.0 ** -8 and unit_roundoff(torch.float32) == u


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_storage_rounding_error_matches_measured_rounding(dtype):
    """0.4247 u ||W||: the RMS rounding of values spread over many binades (Gaussian weights, and
    the same weights scaled by a non-power of two)."""
    g = torch.Generator().manual_seed(0)
    for scale in (0.02, 0.0137, 3.0):
        W = torch.randn(512, 384, generator=g, dtype=torch.float64) * scale
        measured = float((W.to(dtype).double() - W).norm())
        assert measured == pytest.approx(storage_rounding_error(float(W.norm()), dtype), rel=0.03)


def test_error_budget_charges_at_the_update_norm_and_settles_at_the_true_norms():
    rho = storage_rounding_error(10.0, torch.bfloat16)
    budget = ErrorBudget(torch.bfloat16, base_norm=10.0, scale=2.0, update_norm=0.5)
    assert budget.allowed == pytest.approx(0.3 * rho / 2.0)
    assert budget.relative() == pytest.approx(0.3 * rho / 2.0 / 0.5)
    budget.charge(0.5 * budget.relative(), "half")
    assert budget.remaining == pytest.approx(0.5 * budget.allowed)
    with pytest.raises(NeedsFloat64, match="too much"):
        budget.charge(0.6 * budget.relative(), "too much")
    # the true ||P|| is 4x the guess: the same relative error is 4x larger in absolute terms
    with pytest.raises(NeedsFloat64, match="settled"):
        budget.settle(10.0, 2.0, "settled")
    assert ErrorBudget(torch.bfloat16, 10.0, 0.0, 1.0).relative() == math.inf
    assert ErrorBudget(None, 10.0, 1.0, 1.0).allowed < 1e-14  # float64 output: no room


def test_resolve_matmul_dtype():
    assert resolve_matmul_dtype("auto", torch.float64, torch.bfloat16) == (torch.float32, True)
    assert resolve_matmul_dtype("auto", torch.float64, torch.float16) == (torch.float32, True)
    assert resolve_matmul_dtype("auto", torch.float64) == (torch.float64, False)  # float64 output
    assert resolve_matmul_dtype("auto", torch.float64, torch.float32) == (torch.float64, False)
    assert resolve_matmul_dtype("auto", torch.float32, torch.bfloat16) == (torch.float32, False)
    assert resolve_matmul_dtype(None, torch.float64) == (torch.float64, False)
    assert resolve_matmul_dtype("float32", torch.float64) == (torch.float32, False)
    with pytest.raises(ValueError, match="matmul_dtype"):
        resolve_matmul_dtype("float16x", torch.float64)


def test_executor_skips_the_float32_attempt_for_a_kind_that_keeps_needing_float64(monkeypatch):
    """A model repeats its weight shapes every layer: once AUTO_SKIP_AFTER weights of a kind fell
    back to float64, the next ones of that kind go straight to float64 (same result, no discarded
    float32 pass); a kind whose float32 attempt succeeds keeps trying float32."""
    from mergekit_ace.execution import executor

    monkeypatch.setattr(executor, "_auto_float64_streak", {})
    tried = []
    original = executor._execute

    def spy(*args, matmul_dtype, **kw):
        tried.append(matmul_dtype)
        return original(*args, matmul_dtype=matmul_dtype, **kw)

    monkeypatch.setattr(executor, "_execute", spy)
    # Low-rank updates, 100x norm spread (heterogeneous branch): float32 is not enough.
    W0, experts = bf16_experts((160, 96), rank=8, std=1e-2, scales=(1.0, 0.01, 0.1))
    ref, _ = ace_reference(W0, experts)
    outs = [executor.execute_rule("ace", ace_merge, W0, experts, matmul_dtype="auto", output_dtype=BF16)
            for _ in range(4)]
    assert tried == ["auto", "auto", torch.float64, torch.float64]
    for out in outs:
        assert_contract(out, ref)
    tried.clear()
    W1, experts1 = bf16_experts((384, 256))  # well conditioned: float32 accepted every time
    for _ in range(3):
        executor.execute_rule("ace", ace_merge, W1, experts1, matmul_dtype="auto", output_dtype=BF16)
    assert tried == ["auto"] * 3


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape, case", [((192, 128), {}), ((64, 160), {}), ((256, 96), dict(rank=6)),
                                         ((300, 120), dict(spectrum=1.5))])
def test_condition_lower_bound_never_exceeds_the_true_condition_number(shape, case, seed):
    """The early bound kappa(M) >= lambda_max(S~_t) n / tr(M), with tr(M) bounded from step 1's energies,
    stays below the exact float64 kappa of ACE's M (both branches) and of ACTMat's A, from float32
    Grams as the first attempt computes them; and lambda_max's bound is close for a dominant direction."""
    W0, experts = bf16_experts(shape, seed=seed, **case)
    d_out, d_in = shape
    tv32, tv64 = TaskVectors(W0, experts, torch.float32), TaskVectors(W0, experts, torch.float64)
    traces, mus = tv64.energies_and_means(torch.float64)
    for het in (True, False):
        eps = 1e-5
        grams64 = [tv64.gram(t, mus[t]) for t in range(len(experts))]
        s = [float(torch.trace(g)) + 1e-12 for g in grams64]
        M = sum(g / si if het else g for g, si in zip(grams64, s))
        M += torch.eye(d_in, dtype=torch.float64) * sum(eps / si if het else eps for si in s)
        lam = torch.linalg.eigvalsh(M)
        kappa = float(lam[-1] / lam[0])
        bound = proxy_sum_trace_bound(traces, mus, d_out, d_in, het, eps)
        assert float(torch.trace(M)) <= bound
        for t in range(len(experts)):
            g32 = tv32.gram(t, mus[t])
            if het:
                g32 /= float(torch.trace(g32)) + 1e-12
            lower = top_eigenvalue_lower_bound(g32)
            assert lower <= float(torch.linalg.eigvalsh(g32.double())[-1])
            assert condition_lower_bound(lower, bound, d_in) <= kappa
    A = sum(tv64.gram(t) for t in range(len(experts)))
    lam = torch.linalg.eigvalsh(A)
    for t in range(len(experts)):
        lower = top_eigenvalue_lower_bound(tv32.gram(t))
        assert condition_lower_bound(lower, TRACE_SLACK * sum(traces), d_in) <= float(lam[-1] / lam[0])
    # one dominant direction: the power-iteration bound finds most of lambda_max
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(200, 1, generator=g, dtype=torch.float64)
    X = torch.randn(300, 200, generator=g, dtype=torch.float64)
    S = X.T @ X / 300 + 50 * v @ v.T / float(v.square().sum())
    top = float(torch.linalg.eigvalsh(S)[-1])
    assert 0.9 * top <= top_eigenvalue_lower_bound(S) <= top


def test_energies_pass_with_and_without_the_means():
    """Step 1's pass: ||D_t||_F^2 and the row means of D_t over row blocks; ACTMat's trace bound
    asks for the energies only and gets the same numbers without the means."""
    W0, experts = bf16_experts((70, 40), seed=3)
    tv = TaskVectors(W0, experts, torch.float32, row_chunk=16)
    traces, mus = tv.energies_and_means(torch.float64)
    only, none = tv.energies_and_means(torch.float64, means=False)
    assert none is None and only == traces
    for t, e in enumerate(experts):
        D = e.double() - W0.double()
        assert traces[t] == pytest.approx(float(D.square().sum()), rel=1e-6)
        torch.testing.assert_close(mus[t], D.mean(dim=0), rtol=1e-6, atol=1e-12)


def test_running_condition_bound_raises_at_the_first_term_that_rules_float32_out():
    """The running bound keeps the largest lambda_max lower bound over the terms fed so far and
    raises NeedsFloat64, naming the sum and the term count, once lambda_max n / tr(M) makes the
    float32 solve's error estimate exceed the tolerance; with no trace bound (float64) it checks nothing."""
    n = 1000  # kappa_lb <= n: the trace includes lambda_max
    well = torch.eye(n, dtype=torch.float64)
    spike = torch.diag(torch.tensor([1e7] + [1.0] * (n - 1), dtype=torch.float64))
    trace = float(torch.trace(well + spike))
    kappa_after_spike = 1e7 * n / trace
    tolerance = 3e-5
    assert solve_error_estimate(1.0 * n / trace) <= tolerance < solve_error_estimate(kappa_after_spike)
    bound = RunningConditionBound(trace, n, "the test sum", terms=2, tolerance=tolerance)
    bound.add(well)
    assert bound.seen == 1 and bound.lambda_lower == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(NeedsFloat64, match=r"the test sum \(after 2 of 2 terms\)"):
        bound.add(spike)
    assert bound.lambda_lower == pytest.approx(1e7, rel=1e-3)
    unchecked = RunningConditionBound(math.inf, n, "the test sum", terms=2)
    unchecked.add(spike)
    assert not unchecked.active and unchecked.seen == 1 and unchecked.lambda_lower == 0.0


def dominant_direction_experts(shape, seed=0):
    """bf16 checkpoints whose updates share one strong direction (as low-rank fine-tunes do): the
    early bound rules float32 out from the first Gram."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    W0 = (torch.randn(m, n, generator=g) * 0.02).to(torch.bfloat16)
    v = torch.randn(1, n, generator=g)
    experts = []
    for s in (1.0, 0.05):  # two experts: the heterogeneous branch's bound is ~ d_in / T
        d = 3.0 * torch.randn(m, 1, generator=g) @ v + 0.1 * torch.randn(m, n, generator=g)
        experts.append((W0.float() + 1e-2 * s * d).to(torch.bfloat16))
    return W0, experts


@pytest.mark.parametrize("strategy", ["expert_streamed", "row_chunked"])
@pytest.mark.parametrize("rule", ["ace", "actmat"])
@pytest.mark.slow
def test_float32_attempt_gives_up_after_the_first_gram_when_the_bound_rules_it_out(monkeypatch, rule, strategy):
    """Where even the lower bound of the condition number rules float32 out, the float32 attempt
    stops after its first Gram, before any product, and the float64 result is the same as asked
    for directly."""
    W0, experts = dominant_direction_experts((1024, 1536))
    grams, products = [], []
    gram, add_product = TaskVectors.gram, TaskVectors.add_product
    monkeypatch.setattr(TaskVectors, "gram", lambda self, *a, **k: grams.append(self.dtype) or gram(self, *a, **k))
    monkeypatch.setattr(TaskVectors, "add_product",
                        lambda self, *a, **k: products.append(self.dtype) or add_product(self, *a, **k))
    merge = (functools.partial(ace_merge, refinement="none") if rule == "ace"
             else functools.partial(actmat_merge, solve="exact"))
    # float16 output: the contract's relative tolerance (~4e-5 here) is below what kappa >= ~1.5e3
    # allows float32 products (a bf16 output, 8x coarser, would accept them)
    out, diag = merge(W0, experts, matmul_dtype="auto", output_dtype=torch.float16, strategy=strategy,
                      return_diagnostics=True)
    assert diag.precision.startswith("float64")
    assert grams.count(torch.float32) == 1 and products.count(torch.float32) == 0
    assert torch.equal(out, merge(W0, experts, matmul_dtype=torch.float64, strategy=strategy))


@pytest.mark.parametrize("strategy", ["expert_streamed", "row_chunked"])
@pytest.mark.parametrize("rule", ["ace", "actmat"])
@pytest.mark.slow
def test_float32_attempt_forms_the_largest_update_first(monkeypatch, rule, strategy):
    """A small, flat (noise-like) update listed before a large one with a dominant direction (as a
    small fine-tune's bf16 rounding flattens its spectrum): the attempt forms the large update's
    Gram first, so the bound gives up after one float32 Gram, not two; the float64 result keeps
    the experts' order and equals the one asked for directly."""
    W0, (strong, _) = dominant_direction_experts((1024, 1536))
    g = torch.Generator().manual_seed(1)
    flat = (W0.float() + 2e-3 * torch.randn(W0.shape, generator=g)).to(torch.bfloat16)
    experts = [flat, strong]
    grams = []
    gram = TaskVectors.gram
    monkeypatch.setattr(TaskVectors, "gram",
                        lambda self, t, *a, **k: grams.append((self.dtype, t)) or gram(self, t, *a, **k))
    merge = (functools.partial(ace_merge, refinement="none") if rule == "ace"
             else functools.partial(actmat_merge, solve="exact"))
    # float16 output: the contract's relative tolerance (~4e-5 here) is below what kappa >= ~1.5e3
    # allows float32 products (a bf16 output, 8x coarser, would accept them)
    out, diag = merge(W0, experts, matmul_dtype="auto", output_dtype=torch.float16, strategy=strategy,
                      return_diagnostics=True)
    assert diag.precision.startswith("float64")
    assert [t for dt, t in grams if dt == torch.float32] == [1]
    assert [t for dt, t in grams if dt == torch.float64] == [0, 1]
    assert torch.equal(out, merge(W0, experts, matmul_dtype=torch.float64, strategy=strategy))


# --------------------------------------------------------------------------- the SVD peers
@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
@pytest.mark.parametrize("shape", [(384, 256), (96, 512)])
def test_svd_peers_hold_the_bf16_contract_and_take_float32_where_it_allows(method, shape):
    """The SVD rules in float32 where every decomposition's estimated error fits the contract,
    else float64; either way within 0.3 of the bf16 rounding of the float64 reference
    (tests/reference_peers.py, NumPy, full SVDs)."""
    from mergekit_ace.rules import iso_c_merge, iso_cts_merge, tsv_m_merge
    from tests.reference_peers import REFERENCES

    merge = {"tsv_m": tsv_m_merge, "iso_c": iso_c_merge, "iso_cts": iso_cts_merge}[method]
    for case in (dict(), dict(spectrum=1.0), dict(rank=16)):
        W0, experts = bf16_experts(shape, **case)
        ref = torch.from_numpy(REFERENCES[method](W0, experts))
        out, diag = merge(W0, experts, matmul_dtype="auto", output_dtype=BF16, return_diagnostics=True)
        assert contract_ratio(out, ref) <= 0.3, (case, diag.precision, diag.routes)
        assert stored_ratio(out, ref) <= 1.05
        if not case:  # full-rank random updates: well separated enough for float32
            assert diag.precision == "float32", diag.routes
        # float64 outputs: float64, as before
        out64, diag64 = merge(W0, experts, matmul_dtype="auto", return_diagnostics=True)
        assert diag64.precision == "float64"


@pytest.mark.parametrize("shape", [(384, 256), (176, 512)])  # well conditioned; nearly square stacked system
def test_wudi_closed_form_holds_the_bf16_contract(shape):
    """WUDI's closed form rides on ACTMat's kernel: the same contract against its float64 reference."""
    from mergekit_ace.rules.wudi import wudi_merge
    from tests.reference import wudi_reference

    W0, experts = bf16_experts(shape, spectrum=1.0)
    ref = wudi_reference(W0, experts)
    out, diag = wudi_merge(W0, experts, matmul_dtype="auto", output_dtype=BF16, return_diagnostics=True)
    assert_contract(out, ref)
    if shape == (384, 256):
        assert diag.precision == "float32"


def test_output_gram_attempt_forms_no_product_before_the_condition_check(monkeypatch):
    """ACTMat's output_gram strategy on a nearly square stacked system (T d_out just above d_in, as
    the 3B/7B down_proj): the float32 attempt forms the Grams, finds kappa too large, and stops
    before any product D_t C_t; the result is the float64 one, within the contract."""
    from mergekit_ace.rules import actmat as actmat_module

    W0, experts = bf16_experts((176, 512), spectrum=1.0)
    products = []
    original = actmat_module.add_left_product_
    monkeypatch.setattr(actmat_module, "add_left_product_",
                        lambda out, K, D, **kw: products.append(K.dtype) or original(out, K, D, **kw))
    out, diag = actmat_merge(W0, experts, solve="exact", matmul_dtype="auto", output_dtype=BF16, strategy="output_gram",
                             return_diagnostics=True)
    assert diag.precision == "float64" and torch.float32 not in products
    assert torch.equal(out, actmat_merge(W0, experts, solve="exact", matmul_dtype=torch.float64,
                                         strategy="output_gram"))
    assert_contract(out, actmat_reference(W0, experts))
    # where the check passes, the deferred products give the float32 result of every other strategy
    W1, experts1 = bf16_experts((96, 256))  # 3 x 96 = 288 > 256, well conditioned
    products.clear()
    a, d1 = actmat_merge(W1, experts1, matmul_dtype="auto", output_dtype=BF16, strategy="output_gram",
                         return_diagnostics=True)
    b = actmat_merge(W1, experts1, matmul_dtype="auto", output_dtype=BF16, strategy="row_chunked")
    assert d1.precision == "float32" and products.count(torch.float32) == 3
    assert_contract(a, actmat_reference(W1, experts1))
    assert contract_ratio(a, b.double()) <= 0.3


@pytest.mark.parametrize("strategy", ["row_chunked", "expert_streamed", "output_gram"])
def test_truncated_actmat_takes_float32_products_on_a_nearly_singular_sum(strategy):
    """The papers' truncated solve (cutoff d_in eps_float32) caps what is solved at condition 1 / cutoff,
    so the nearly square system on which the exact solve needs float64 (the test above) meets the bf16
    contract with float32 products, against the independent float64 truncated pseudo-inverse."""
    from tests.reference import actmat_truncated_reference

    W0, experts = bf16_experts((176, 512), spectrum=1.0)  # 3 x 176 = 528 vs d_in = 512
    ref = actmat_truncated_reference(W0, experts)
    out, diag = actmat_merge(W0, experts, solve="truncated", matmul_dtype="auto", output_dtype=BF16,
                             strategy=strategy, row_chunk=64, return_diagnostics=True)
    assert diag.precision == "float32" and diag.rank < 512
    assert rel_err(out, ref, W0) > 1e-12  # float32 products really ran
    assert_contract(out, ref)


def test_truncated_actmat_recomputes_in_float64_when_an_eigenvalue_sits_at_the_cutoff():
    """An eigenvalue of sum_t C_t at the truncation's cutoff: the float32 products' error could move it
    across, so "auto" merges in float64 and keeps exactly the float64 reference's directions."""
    from mergekit_ace.rules.precision import thread_float64_recompute_count as float64_recompute_count
    from tests.reference import actmat_truncated_reference

    d_out, d_in = 96, 64
    cut = d_in * torch.finfo(torch.float32).eps
    g = torch.Generator().manual_seed(5)
    V = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=torch.float64))[0]
    lam = torch.logspace(0, -6, d_in, dtype=torch.float64)
    lam[20] = cut  # exactly at the cutoff (lambda_max = 1)

    def expert_with_gram(share):  # D^T D = share * V diag(lam) V^T
        U = torch.linalg.qr(torch.randn(d_out, d_in, generator=g, dtype=torch.float64))[0]
        return U @ torch.diag((share * lam).sqrt()) @ V.T

    W0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.02
    experts = [(W0 + 1e-3 * expert_with_gram(s)).float() for s in (0.5, 0.3, 0.2)]
    W0 = W0.float()
    ref = actmat_truncated_reference(W0, experts)
    before = float64_recompute_count()
    out, diag = actmat_merge(W0, experts, solve="truncated", matmul_dtype="auto", output_dtype=BF16,
                             return_diagnostics=True)
    assert diag.precision == "float64" and float64_recompute_count() == before + 1
    assert rel_err(out, ref, W0) < 1e-9
    # moved to 3x the cutoff, the decision is clear and float32 products serve
    lam[20] = 3 * cut
    experts = [(W0.double() + 1e-3 * expert_with_gram(s)).float() for s in (0.5, 0.3, 0.2)]
    out, diag = actmat_merge(W0, experts, solve="truncated", matmul_dtype="auto", output_dtype=BF16,
                             return_diagnostics=True)
    assert diag.precision == "float32"
    assert_contract(out, actmat_truncated_reference(W0, experts))


def test_gram_error_estimate_bounds_the_float32_grams_error_from_below():
    """The probes' estimate of ||A_float32 - A||_2 against the independent float64 Gram: never above
    the true norm (a lower bound), and within 20x of it (what the cutoff check's margin covers)."""
    W0, experts = bf16_experts((300, 128), spectrum=1.0)
    D64 = [e.double() - W0.double() for e in experts]
    D32 = [e.float() - W0.float() for e in experts]
    exact = sum(d.T @ d for d in D64)
    A32 = sum((d.T @ d).double() for d in D32)
    true = float(torch.linalg.matrix_norm(A32 - exact, ord=2))
    estimate = actmat_rule.gram_error_estimate(A32, W0, experts, [1.0] * 3)
    assert 0 < estimate <= true * (1 + 1e-9) and estimate > true / 20
