"""Planner choices under small budgets, out-of-memory retries and the CPU fallback."""

import logging

import pytest
import torch

from mergekit_ace.execution import executor
from mergekit_ace.execution.executor import candidate_plans, choose_plan, execute_rule
from mergekit_ace.rules.ace import ace_merge
from mergekit_ace.rules.actmat import actmat_merge
from mergekit_ace.rules.wudi import wudi_merge
from tests.reference import make_experts

RULES = {"ace": ace_merge, "actmat": actmat_merge, "wudi": wudi_merge}


def _recorder():
    seen = []

    def injector(plan, device):
        seen.append((plan, device))

    return seen, injector


@pytest.mark.parametrize("rule", ["ace", "actmat", "wudi"])
@pytest.mark.parametrize("shape", [(512, 64), (64, 256)])
def test_every_strategy_the_planner_picks_gives_the_same_result(rule, shape):
    W0, experts = make_experts(shape, 3, [1.0, 0.05, 0.3], seed=7)
    reference = RULES[rule](W0, experts)
    plans = candidate_plans(rule, *shape, 3, budget=float("inf"))
    budgets = sorted({p.estimate.peak_bytes for p in plans}, reverse=True)
    picked = set()
    for budget in budgets:
        seen, injector = _recorder()
        out = execute_rule(rule, RULES[rule], W0, experts, budget=budget, fault_injector=injector,
                           matmul_dtype=torch.float64)
        (plan, _), = seen
        assert plan.estimate.peak_bytes <= budget
        picked.add((plan.strategy, plan.row_chunk))
        torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)
    # Small budgets drive the planner through row chunks, and for tall ACE weights through all
    # three strategies (wide ones: expert-streamed is both smaller and cheaper). Tall ACTMat weights
    # (d_out > T d_in) keep the C_t: solving for C_t A^+ once is cheaper than N A^+ row by row.
    if shape[0] > shape[1]:
        assert any(chunk is not None for _, chunk in picked)
        # actmat, wudi: row_chunked only
        expected = {"row_chunked", "expert_streamed", "row_recomputed"} if rule == "ace" else {"row_chunked"}
        assert {s for s, _ in picked} == expected


def test_planner_prefers_expert_streamed_for_wide_and_row_chunks_for_tall():
    # Wide: the 3 float64 proxies (96 MiB) on top of M, L, Sbar (96 MiB) do not fit 160 MiB.
    wide = choose_plan("ace", 1536, 2048, 3, 400 * 2**20)
    assert wide.fits and wide.strategy == "expert_streamed"
    # Very wide (d_out < d_in / 2): the products through the d_out x d_out Grams take fewer flops.
    very_wide = choose_plan("ace", 256, 2048, 3, 160 * 2**20)
    assert very_wide.fits and very_wide.strategy == "output_gram"
    # Tall: P with Q or with a kept F (62.5 MiB each) does not fit 100 MiB; the proxies are 1.5 MiB,
    # so F is recomputed block by block.
    tall = choose_plan("ace", 32000, 256, 3, 100 * 2**20)
    assert tall.fits and tall.strategy == "row_recomputed" and tall.row_chunk is not None
    # With room for F, it is kept (fewer products).
    roomy = choose_plan("ace", 32000, 256, 3, 400 * 2**20)
    assert roomy.fits and roomy.strategy != "row_recomputed"


@pytest.mark.parametrize("rule", ["ace", "actmat"])
def test_output_gram_is_planned_for_down_proj_shapes_only(rule):
    """The 3B and 7B down_proj (d_out < d_in / 2, T d_out > d_in) take the output-space Gram route,
    which the estimates count as fewer flops (4 d_out^2 d_in instead of 2 d_out d_in^2 per expert);
    square, tall and lm_head-shaped weights keep the d_in x d_in route."""
    for shape in [(3072, 8192), (4096, 11008)]:
        plan = choose_plan(rule, *shape, 3, 8 * 2**30)
        assert plan.fits and plan.strategy == "output_gram", shape
        streamed = min((p for p in candidate_plans(rule, *shape, 3, 8 * 2**30) if p.strategy == "expert_streamed"),
                       key=lambda p: p.estimate.flops)
        m, n = shape
        saved = streamed.estimate.matmul_flops - plan.estimate.matmul_flops
        assert saved == pytest.approx(3 * (2.0 * m * n * n - 4.0 * m * m * n))
    for shape in [(8192, 3072), (4096, 4096), (11008, 4096), (128256, 3072)]:
        assert choose_plan(rule, *shape, 3, 8 * 2**30).strategy != "output_gram", shape


def test_injected_out_of_memory_retries_smaller_with_the_same_result():
    W0, experts = make_experts((512, 64), 3, [1.0, 0.05, 0.3], seed=8)
    reference = ace_merge(W0, experts)
    seen = []

    def injector(plan, device):
        seen.append(plan)
        if len(seen) <= 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    out = execute_rule("ace", ace_merge, W0, experts, budget=1e9, fault_injector=injector,
                       matmul_dtype=torch.float64)
    torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)
    assert len(seen) == 3
    assert seen[1].estimate.peak_bytes <= seen[0].estimate.peak_bytes / 2
    assert seen[2].estimate.peak_bytes <= seen[1].estimate.peak_bytes / 2


def test_other_errors_are_not_swallowed():
    W0, experts = make_experts((64, 32), 2, [1.0], seed=9)

    def injector(plan, device):
        raise RuntimeError("something else")

    with pytest.raises(RuntimeError, match="something else"):
        execute_rule("ace", ace_merge, W0, experts, budget=1e9, fault_injector=injector,
                     matmul_dtype=torch.float64)


def test_out_of_memory_everywhere_falls_back_to_cpu_once_logged(monkeypatch, caplog):
    """Pretend the CPU tensors live on an accelerator: every on-device attempt runs out of memory,
    the weight is merged on the CPU with the same result, and only the first fallback warns."""
    monkeypatch.setattr(executor, "_on_accelerator", lambda device: True)
    monkeypatch.setattr(executor, "_fallback_count", 0)
    W0, experts = make_experts((256, 48), 3, [1.0, 0.05, 0.3], seed=10)
    calls = []

    def injector(plan, device):
        calls.append(plan)
        if not injector.fallback_phase:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    injector.fallback_phase = False
    original = executor._log_fallback

    def log_and_switch(*args):
        injector.fallback_phase = True  # from here on the attempts run "on the CPU"
        original(*args)

    monkeypatch.setattr(executor, "_log_fallback", log_and_switch)
    with caplog.at_level(logging.DEBUG, logger=executor.LOG.name):
        for rule in ("ace", "actmat"):
            injector.fallback_phase = False
            reference = RULES[rule](W0, experts)
            out = execute_rule(rule, RULES[rule], W0, experts, budget=1e9, fault_injector=injector,
                               matmul_dtype=torch.float64)
            torch.testing.assert_close(out, reference, rtol=1e-10, atol=1e-12)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "CPU" in r.getMessage()]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "on the CPU" in r.getMessage()]
    assert len(warnings) == 1 and len(debug) == 1
    assert executor.fallback_count() == 2
    assert len(calls) > 4  # several smaller retries before each fallback


def test_nothing_fits_goes_straight_to_the_cpu(monkeypatch):
    monkeypatch.setattr(executor, "_on_accelerator", lambda device: True)
    W0, experts = make_experts((128, 32), 2, [1.0, 0.1], seed=11)
    seen, injector = _recorder()
    out = execute_rule("actmat", actmat_merge, W0, experts, budget=1, fault_injector=injector,
                       matmul_dtype=torch.float64)
    torch.testing.assert_close(out, actmat_merge(W0, experts), rtol=1e-10, atol=1e-12)
    assert len(seen) == 1  # no doomed on-device attempt


def test_memory_budget_setting(monkeypatch):
    from mergekit_ace.execution.budget import ENV_VAR, memory_budget, parse_size, set_memory_budget

    assert parse_size("24GiB") == 24 * 2**30 and parse_size("512MB") == 512e6 and parse_size("2e9") == 2e9
    monkeypatch.setenv(ENV_VAR, "3GiB")
    assert memory_budget(torch.device("cpu")) == 3 * 2**30
    monkeypatch.setenv(ENV_VAR, "0.5")
    assert 0 < memory_budget(torch.device("cpu")) < 2**50
    set_memory_budget("1MiB")
    try:
        assert memory_budget(torch.device("cpu")) == 2**20
    finally:
        set_memory_budget(None)
    with pytest.raises(ValueError):
        parse_size("lots")


def test_auto_uses_float64_products_when_float32_matmuls_are_reduced_precision():
    # torch.set_float32_matmul_precision("high") allows TF32 (CUDA) / bf16 passes (CPU): float32
    # products then carry ~1e-3 errors, which "auto"'s error estimates do not model.
    seen = []

    def rule(base, experts, **kw):
        seen.append(kw["matmul_dtype"])
        return base.double()

    W0, experts = make_experts((64, 32), 2, [1.0, 0.5], seed=1)
    previous = torch.get_float32_matmul_precision()
    try:
        bf16 = dict(output_dtype=torch.bfloat16)  # an output whose contract float32 products can serve
        execute_rule("ace", rule, W0, experts, matmul_dtype="auto", **bf16)
        torch.set_float32_matmul_precision("high")
        assert not executor.float32_products_are_ieee(torch.device("cpu"))
        execute_rule("ace", rule, W0, experts, matmul_dtype="auto", **bf16)
        execute_rule("ace", rule, W0, experts, matmul_dtype=torch.float32, **bf16)  # asked for: kept
    finally:
        torch.set_float32_matmul_precision(previous)
    assert seen == ["auto", torch.float64, torch.float32]
    # without an output dtype (a float64 result) "auto" is float64 from the start
    execute_rule("ace", rule, W0, experts, matmul_dtype="auto")
    assert seen[-1] == torch.float64
    assert executor.float32_products_are_ieee(torch.device("cpu"))


def test_oom_retries_are_counted():
    W0, experts = make_experts((256, 32), 2, [1.0, 0.5], seed=2)
    before = executor.oom_retry_count()
    failed = []

    def injector(plan, device):
        if not failed:
            failed.append(plan)
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    execute_rule("actmat", actmat_merge, W0, experts, budget=float("inf"), fault_injector=injector,
                 matmul_dtype=torch.float64)
    assert executor.oom_retry_count() == before + 1


@pytest.mark.parametrize("rule", ["tsv_m", "iso_c", "iso_cts"])
def test_svd_rules_out_of_memory_fall_back_to_the_cpu(rule, monkeypatch):
    """The SVD rules have one plan per weight (their full-SVD peak does not shrink with row
    blocks): an out-of-memory error on the accelerator sends the weight straight to the CPU."""
    from mergekit_ace.rules import iso_c_merge, iso_cts_merge, tsv_m_merge

    fn = {"tsv_m": tsv_m_merge, "iso_c": iso_c_merge, "iso_cts": iso_cts_merge}[rule]
    monkeypatch.setattr(executor, "_on_accelerator", lambda device: True)
    monkeypatch.setattr(executor, "_fallback_count", 0)
    W0, experts = make_experts((96, 40), 3, [1.0, 0.05, 0.3], seed=12)
    calls = []

    def injector(plan, device):
        calls.append(plan)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    plans = candidate_plans(rule, 96, 40, 3, budget=1e9)
    assert {p.strategy for p in plans} == {"whole_matrix"}
    out = execute_rule(rule, fn, W0, experts, budget=1e9, fault_injector=injector, alpha=1.0)
    torch.testing.assert_close(out, fn(W0, experts), rtol=1e-10, atol=1e-12)
    assert len(calls) == 2 and executor.fallback_count() == 1
    # they take the precision options too: unchecked float32 decompositions, float32-close
    out32 = execute_rule(rule, fn, W0, experts, budget=1e9, matmul_dtype=torch.float32)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), out, rtol=1e-4, atol=1e-5)


def test_wudi_adam_runs_as_one_whole_matrix_plan_with_the_same_result():
    W0, experts = make_experts((24, 16), 3, [1.0, 0.05, 0.3], seed=7)
    seen, injector = _recorder()
    out = execute_rule("wudi_adam", wudi_merge, W0, experts, budget=float("inf"), fault_injector=injector,
                       solver="adam", iterations=20)
    (plan, _), = seen
    assert plan.strategy == "whole_matrix"
    torch.testing.assert_close(out, wudi_merge(W0, experts, solver="adam", iterations=20), rtol=0, atol=0)
    # the estimate follows the iteration count
    plans = {it: choose_plan("wudi_adam", 24, 16, 3, float("inf"), iterations=it) for it in (10, 1000)}
    assert plans[1000].estimate.flops > 50 * plans[10].estimate.flops


def test_plans_count_the_truncated_solves_eigendecomposition():
    """ACTMat's default solve (the papers' truncation) decomposes the d_in x d_in sum; the exact solve
    factors it by Cholesky: the planner's flops follow the solve the merge will run."""
    from mergekit_ace.execution.executor import candidate_plans
    from mergekit_ace.execution.memory import EIGH_FLOP_FACTOR, solve_of

    assert solve_of("actmat", {}) == "truncated" and solve_of("wudi", {}) == "exact"
    assert solve_of("actmat", {"solve": "exact"}) == "exact" and solve_of("ace", {}) == "exact"
    exact = candidate_plans("actmat", 1024, 2816, 3, 1e12, solve="exact")
    truncated = candidate_plans("actmat", 1024, 2816, 3, 1e12, solve="truncated")
    assert all(p.estimate.eigh_flops == 0 for p in exact)
    assert all(p.estimate.eigh_flops == EIGH_FLOP_FACTOR * 2816 ** 3 for p in truncated)
    assert [p.estimate.matmul_flops for p in exact] == [p.estimate.matmul_flops for p in truncated]
