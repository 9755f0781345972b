"""TSV-M, Iso-C and Iso-CTS against the independent float64 references (tests/reference_peers.py),
their exact properties, both routes, and the executor."""

import pytest
import torch

from mergekit_ace.execution.executor import execute_rule
from mergekit_ace.rules import MergeInputError, iso_c_merge, iso_cts_merge, tsv_m_merge
from mergekit_ace.rules.iso import common_space_size
from mergekit_ace.rules.tsv_m import per_task_rank
from tests.reference_peers import REFERENCES, rel_err

RULES = {"tsv_m": tsv_m_merge, "iso_c": iso_c_merge, "iso_cts": iso_cts_merge}
TOL = 1e-6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These matrices are tiny: with two threads on a busy 2-core machine, thread hand-offs made
    the module 15x slower (measured: 50 s instead of 3 s). One thread for torch and the BLAS."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


def experts64(shape, T, norms, seed=0, rank=None):
    """float64 base and experts whose task vectors have Frobenius norms ``norms`` (exactly rank
    ``rank`` if given: float64 throughout, so the zero singular values are at roundoff)."""
    g = torch.Generator().manual_seed(seed)
    W0 = torch.randn(*shape, generator=g, dtype=torch.float64)
    experts = []
    for t in range(T):
        if rank is None:
            d = torch.randn(*shape, generator=g, dtype=torch.float64)
        else:
            d = torch.randn(shape[0], rank, generator=g, dtype=torch.float64) @ torch.randn(
                rank, shape[1], generator=g, dtype=torch.float64)
        experts.append(W0 + d / d.norm() * norms[t % len(norms)])
    return W0, experts


CASES = {
    "tall": dict(shape=(60, 24), norms=[1.0, 0.5, 0.8]),
    "wide": dict(shape=(24, 60), norms=[1.0, 0.5, 0.8]),
    "low_rank": dict(shape=(40, 32), norms=[1.0, 0.5, 0.8], rank=3),
    "norms_100x": dict(shape=(48, 30), norms=[1.0, 0.01, 0.3]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("method", list(RULES))
def test_matches_float64_reference(method, T, case):
    spec = CASES[case]
    W0, experts = experts64(spec["shape"], T, spec["norms"], seed=10 * T + len(case), rank=spec.get("rank"))
    for alpha in (1.0, 0.7):
        ref = REFERENCES[method](W0, experts, alpha=alpha)
        for route in ("auto", "svd"):
            out = RULES[method](W0, experts, alpha=alpha, route=route)
            assert rel_err(out, ref, W0) < TOL, (method, route, alpha)


def test_routes_are_taken_as_the_conditioning_says():
    W0, experts = experts64((60, 24), 3, [1.0, 0.5, 0.8], seed=1)
    _, diag = tsv_m_merge(W0, experts, return_diagnostics=True)
    assert set(diag.routes) == {"gram"}  # well-conditioned full-rank updates: Gram/eigh everywhere
    W0, experts = experts64((40, 32), 2, [1.0, 0.5], seed=2, rank=3)
    _, diag = tsv_m_merge(W0, experts, return_diagnostics=True)
    assert diag.routes[:2] == ["svd", "svd"] and diag.ranks == [3, 3]  # rank 3 < k = 16: SVD, zeros left out
    _, diag = iso_c_merge(W0, experts, return_diagnostics=True)
    assert diag.routes == ["svd"] and diag.rank == 6


def test_tsv_m_of_one_expert_is_the_expert():
    W0, experts = experts64((30, 20), 1, [0.4], seed=3)
    out, diag = tsv_m_merge(W0, experts, return_diagnostics=True)
    assert diag.k == 20
    torch.testing.assert_close(out, experts[0], rtol=0, atol=1e-12)


def test_iso_c_spectrum_is_flat_at_the_mean_singular_value():
    W0, experts = experts64((50, 20), 3, [1.0, 0.1, 0.4], seed=4)
    delta = sum(e - W0 for e in experts)
    out = iso_c_merge(W0, experts, alpha=2.0)
    sigma = torch.linalg.svdvals(out - W0)
    expected = 2.0 * torch.linalg.svdvals(delta).mean()
    torch.testing.assert_close(sigma, torch.full_like(sigma, float(expected)), rtol=1e-12, atol=0)


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    W0, experts = experts64((40, 24), 3, [1.0, 0.2, 0.5], seed=5)
    torch.testing.assert_close(iso_cts_merge(W0, experts, common_space_fraction=1.0), iso_c_merge(W0, experts),
                               rtol=1e-10, atol=1e-12)


def test_sizes_follow_the_authors_code():
    # k = int(r * (1/T)); common = r - round((r - int(0.8 r)) / T) * T (Python round)
    assert per_task_rank(2048, 3) == 682 and per_task_rank(30, 10) == 3 and per_task_rank(100, 3, 0.1) == 10
    assert common_space_size(2048, 3, 0.8) == 1637  # 2048 - round(410 / 3) * 3
    assert common_space_size(4096, 8, 0.8) == 3280
    assert common_space_size(5, 3, 0.0) == 2  # the code's rounding would need 6 > 5 dimensions
    out, diag = iso_cts_merge(*experts64((20, 5), 3, [1.0], seed=6), common_space_fraction=0.0,
                              return_diagnostics=True)
    assert (diag.common_size, diag.per_task) == (2, 1)


def test_zero_task_vector_contributes_nothing():
    W0, experts = experts64((30, 20), 2, [1.0, 0.5], seed=7)
    with_twin = [experts[0], experts[1], W0.clone()]
    for method in RULES:
        out = RULES[method](W0, with_twin)
        assert torch.isfinite(out).all()
        assert rel_err(out, REFERENCES[method](W0, with_twin), W0) < TOL
    torch.testing.assert_close(iso_c_merge(W0, with_twin), iso_c_merge(W0, experts[:2]), rtol=1e-10, atol=1e-12)
    all_base = iso_cts_merge(W0, [W0.clone(), W0.clone()])
    torch.testing.assert_close(all_base, W0, rtol=0, atol=0)


@pytest.mark.parametrize("method", list(RULES))
def test_float32_and_bfloat16_inputs_untouched_result_float64(method):
    W0, experts = experts64((24, 16), 3, [1.0, 0.1, 0.5], seed=8)
    for dtype in (torch.float32, torch.bfloat16):
        b, es = W0.to(dtype), [e.to(dtype) for e in experts]
        copies = [b.clone()] + [e.clone() for e in es]
        out = RULES[method](b, es, row_chunk=5)
        assert out.dtype == torch.float64
        for before, after in zip(copies, [b] + es):
            assert torch.equal(before, after)
        assert rel_err(out, REFERENCES[method](b, es), b) < TOL


@pytest.mark.parametrize("method", list(RULES))
def test_row_chunks_do_not_change_the_result(method):
    W0, experts = experts64((50, 12), 3, [1.0, 0.01, 0.2], seed=9)
    whole = RULES[method](W0, experts)
    for chunk in (1, 7, 50):
        torch.testing.assert_close(RULES[method](W0, experts, row_chunk=chunk), whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", list(RULES))
def test_executor_plans_and_runs_them(method):
    W0, experts = experts64((64, 24), 3, [1.0, 0.01, 0.3], seed=11)
    out = execute_rule(method, RULES[method], W0.float(), [e.float() for e in experts], budget=1e9, alpha=1.0)
    assert rel_err(out, REFERENCES[method](W0.float(), [e.float() for e in experts]), W0.float()) < TOL


def test_parameter_checks_name_the_parameter_and_tensor():
    W0, experts = experts64((8, 6), 2, [1.0], seed=12)
    with pytest.raises(MergeInputError, match=r"'w'.*sv_reduction=1.5"):
        tsv_m_merge(W0, experts, sv_reduction=1.5, name="w")
    with pytest.raises(MergeInputError, match=r"'w'.*common_space_fraction=-0.1"):
        iso_cts_merge(W0, experts, common_space_fraction=-0.1, name="w")
    with pytest.raises(MergeInputError, match=r"'w'.*alpha=nan"):
        iso_c_merge(W0, experts, alpha=float("nan"), name="w")
    with pytest.raises(MergeInputError, match=r"Iso-C's rule applies to 2-D weights"):
        iso_c_merge(W0[0], [e[0] for e in experts], name="w")
    with pytest.raises(ValueError, match="route"):
        tsv_m_merge(W0, experts, route="lanczos")
