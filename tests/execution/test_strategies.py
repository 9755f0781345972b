"""Chunked, expert-streamed and output-Gram results equal the one-shot result; accuracy with 100x
norm ratios."""

import itertools

import pytest
import torch

from mergekit_ace.execution.executor import execute_rule
from mergekit_ace.rules.ace import ace_merge
from mergekit_ace.rules.actmat import actmat_merge
from tests.reference import ace_reference, actmat_truncated_reference, make_experts, rel_err

# tall (refinement via F^T F), wide (via F F^T; ACTMat's small-Gram route, T d_out = d_in) and wide
# with T d_out > d_in (ACTMat's d_in x d_in route)
SHAPES = [(72, 24), (24, 72), (30, 72)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [0.3, 1e9])  # heterogeneous / homogeneous branch
def test_ace_strategies_and_chunks_equal_one_shot(shape, tau):
    W0, experts = make_experts(shape, 3, [1.0, 0.01, 0.3], seed=3)
    whole, diag = ace_merge(W0, experts, tau=tau, return_diagnostics=True)
    assert diag.heterogeneous == (tau < 1)
    for strategy, chunk in itertools.product(["row_chunked", "expert_streamed", "row_recomputed", "output_gram"],
                                             [None, 1, 5, 16]):
        out = ace_merge(W0, experts, tau=tau, strategy=strategy, row_chunk=chunk)
        torch.testing.assert_close(out, whole, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("keep_base", [True, False])
def test_actmat_strategies_and_chunks_equal_one_shot(shape, keep_base):
    W0, experts = make_experts(shape, 3, [1.0, 0.01, 0.3], seed=4, rank=5)
    whole = actmat_merge(W0, experts, keep_base=keep_base)
    for strategy, chunk in itertools.product(["row_chunked", "expert_streamed", "output_gram"], [None, 1, 5, 16]):
        out = actmat_merge(W0, experts, keep_base=keep_base, strategy=strategy, row_chunk=chunk)
        # rank-5 updates: A is singular and pseudo-inverted, which carries its rounding a little further
        assert rel_err(out, whole, W0) < 1e-10, (strategy, chunk)


def test_unknown_strategy_is_refused():
    W0, experts = make_experts((8, 4), 2, [1.0], seed=0)
    with pytest.raises(ValueError, match="strategy"):
        ace_merge(W0, experts, strategy="magic")


@pytest.mark.parametrize("rank", [None, 8])
@pytest.mark.parametrize("shape", [(256, 64), (64, 256), (72, 192)])
def test_executor_default_precision_holds_1e4_with_100x_norm_ratios(shape, rank):
    """The executor's default precision keeps 1e-4 relative accuracy on the merged task vector
    when the experts' update norms differ by 100x (full-rank and low-rank updates, both ACE
    branches, ACTMat), against the naive float64 reference."""
    W0, experts = make_experts(shape, 3, [10.0, 0.1, 3.0], seed=5, rank=rank)
    for tau in (0.3, 1e9):
        ref, _ = ace_reference(W0, experts, tau=tau)
        out = execute_rule("ace", ace_merge, W0, experts, tau=tau, budget=1e9)
        assert rel_err(out, ref, W0) < 1e-4
    ref = actmat_truncated_reference(W0, experts)  # the default solve
    out = execute_rule("actmat", actmat_merge, W0, experts, budget=1e9)
    assert rel_err(out, ref, W0) < 1e-4


@pytest.mark.parametrize("matmul_dtype", [torch.float64, "auto"])
def test_output_gram_diagnostics_and_auto_precision_match_expert_streamed(matmul_dtype):
    """The output-space Gram route (what the planner takes for down_proj-like weights) reports the
    same traces, eps/s_t, branch and sigma_iso as the d_in x d_in route, and its "auto" products
    hold 1e-4 against the float64 reference with 100x norm ratios (full-rank and low-rank updates)."""
    for rank in (None, 8):
        W0, experts = make_experts((72, 192), 3, [10.0, 0.1, 3.0], seed=6, rank=rank)
        ref, _ = ace_reference(W0, experts)
        a, da = ace_merge(W0, experts, strategy="output_gram", matmul_dtype=matmul_dtype, return_diagnostics=True)
        b, db = ace_merge(W0, experts, strategy="expert_streamed", matmul_dtype=torch.float64,
                          return_diagnostics=True)
        assert rel_err(a, ref, W0) < (1e-9 if matmul_dtype is torch.float64 else 1e-4)
        assert da.heterogeneous == db.heterogeneous and da.k == db.k
        for x, y in [(da.traces, db.traces), (da.eps_over_s, db.eps_over_s), ([da.sigma_iso], [db.sigma_iso])]:
            torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=1e-6, atol=0)
        ref = actmat_truncated_reference(W0, experts)  # the default solve
        a, da = actmat_merge(W0, experts, strategy="output_gram", matmul_dtype=matmul_dtype,
                             return_diagnostics=True)
        b, db = actmat_merge(W0, experts, strategy="expert_streamed", return_diagnostics=True)
        assert rel_err(a, ref, W0) < (1e-9 if matmul_dtype is torch.float64 else 1e-4)
        assert da.rank == db.rank
        torch.testing.assert_close(torch.tensor(da.traces), torch.tensor(db.traces), rtol=1e-6, atol=0)
