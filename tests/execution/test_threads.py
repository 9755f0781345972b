"""The execution layer under concurrent calls, as ``mergekit-yaml --multi-gpu`` makes them (one
worker thread per device): several threads merging different weights at once give exactly the
sequential results, the counters add up and "auto"'s bookkeeping ends where the sequential run's does."""

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from mergekit_ace.execution import cache, executor
from mergekit_ace.rules import precision
from mergekit_ace.rules.ace import ace_merge
from mergekit_ace.rules.actmat import actmat_merge
from tests.rules.test_precision import bf16_experts

RULES = {"ace": ace_merge, "actmat": actmat_merge}
THREADS = 8


def _weights():
    """Eight weights of different shapes (so different "auto" kinds): half with low-rank updates of
    very different sizes, which "auto" recomputes in float64, half well conditioned (float32 kept)."""
    shapes = [(96, 64), (64, 96), (128, 48), (80, 80), (112, 56), (56, 112), (72, 40), (48, 88)]
    weights = []
    for i, shape in enumerate(shapes):
        if i % 2:
            W0, experts = bf16_experts(shape, rank=4, std=1e-2, scales=(1.0, 0.01, 0.1), seed=i)
        else:
            W0, experts = bf16_experts(shape, seed=i)
        weights.append((f"w{i}", W0, experts))
    return weights


def _jobs():
    return [(rule, name, W0, experts) for rule in RULES for name, W0, experts in _weights()]


def _merge(job, barrier=None, **kw):
    rule, name, W0, experts = job
    if barrier is not None:
        barrier.wait()
    before = precision.thread_float64_recompute_count()
    out = executor.execute_rule(rule, RULES[rule], W0, experts, name=name, matmul_dtype="auto",
                                output_dtype=torch.bfloat16, **kw)
    return out, executor.last_auto_outcome(), precision.thread_float64_recompute_count() - before


def _concurrently(jobs, fn):
    barrier = threading.Barrier(THREADS)
    with ThreadPoolExecutor(THREADS) as pool:
        # every job waits at the barrier with seven others: they really run at the same time
        return list(pool.map(lambda job: fn(job, barrier), jobs))


def test_threads_give_the_sequential_results_and_counters_add_up(monkeypatch):
    jobs = _jobs()
    assert len(jobs) % THREADS == 0
    monkeypatch.setattr(executor, "_auto_float64_streak", {})
    before = precision.float64_recompute_count()
    sequential = [_merge(job) for job in jobs]
    sequential_recomputes = precision.float64_recompute_count() - before
    sequential_streaks = dict(executor._auto_float64_streak)
    outcomes = [outcome for _, outcome, _ in sequential]
    # the weights exercise both of "auto"'s outcomes, and each call's own signal says which
    assert {"float32", "float64"} <= set(outcomes)
    assert sequential_recomputes == sum(delta for _, _, delta in sequential) == outcomes.count("float64")

    monkeypatch.setattr(executor, "_auto_float64_streak", {})
    before = precision.float64_recompute_count()
    threaded = _concurrently(jobs, _merge)
    assert precision.float64_recompute_count() - before == sequential_recomputes
    for (out_s, outcome_s, delta_s), (out_t, outcome_t, delta_t) in zip(sequential, threaded):
        assert torch.equal(out_s, out_t)
        assert (outcome_s, delta_s) == (outcome_t, delta_t)
    assert executor._auto_float64_streak == sequential_streaks


def test_threads_out_of_memory_retries_and_cpu_fallbacks_add_up(monkeypatch):
    """Every weight's first attempt runs out of memory (a smaller plan is retried, or the weight
    goes to the CPU where none is left), or every on-device attempt does (CPU fallback): the counts
    are the sums over the threads' weights and the results those of the same calls made one after
    another."""
    monkeypatch.setattr(executor, "_on_accelerator", lambda device: True)
    jobs = _jobs()
    state = threading.local()  # per thread: what the current weight's attempts have seen

    def first_attempt_fails(plan, device):
        if not state.failed:
            state.failed = True
            raise torch.OutOfMemoryError("out of memory (injected)")

    def device_always_fails(plan, device):
        if not state.on_cpu:
            raise torch.OutOfMemoryError("out of memory (injected)")

    original_log = executor._log_fallback

    def log_and_switch(*args):  # from here on this thread's attempts run "on the CPU"
        state.on_cpu = True
        original_log(*args)

    monkeypatch.setattr(executor, "_log_fallback", log_and_switch)

    def counts():
        return executor.oom_retry_count(), executor.fallback_count()

    for injector in (first_attempt_fails, device_always_fails):
        def run(job, barrier=None, injector=injector):
            state.failed, state.on_cpu = False, False
            return _merge(job, barrier, budget=1e9, fault_injector=injector)

        monkeypatch.setattr(executor, "_auto_float64_streak", {})
        start = counts()
        sequential = [run(job) for job in jobs]
        per_run = tuple(b - a for a, b in zip(start, counts()))
        if injector is device_always_fails:
            assert per_run[1] == len(jobs)  # one fallback per weight
        else:
            assert sum(per_run) >= len(jobs)  # one retry or fallback at least per weight
        monkeypatch.setattr(executor, "_auto_float64_streak", {})
        start = counts()
        threaded = _concurrently(jobs, run)
        assert tuple(b - a for a, b in zip(start, counts())) == per_run
        for (out_s, *_), (out_t, *_) in zip(sequential, threaded):
            assert torch.equal(out_s, out_t)


def test_threads_share_one_resume_cache(monkeypatch, tmp_path):
    """Eight threads storing into one cache directory at once, then loading from it: every weight
    stored once, all loaded on the rerun, results identical."""
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path))
    jobs = _jobs()

    def cached(job, barrier=None):
        rule, name, W0, experts = job
        if barrier is not None:
            barrier.wait()
        return cache.cached_execute_rule(rule, RULES[rule], W0, experts, name=f"{rule}.{name}",
                                         out_dtype=torch.bfloat16, matmul_dtype="auto")

    reference = [_merge(job)[0].to(torch.bfloat16) for job in jobs]
    first = _concurrently(jobs, cached)
    second = _concurrently(jobs, cached)
    events = [(r["event"], r["name"]) for r in cache.read_log(tmp_path)]
    names = {f"{rule}.{name}" for rule, name, _, _ in jobs}
    assert sorted(n for e, n in events if e == "computed") == sorted(names)
    assert sorted(n for e, n in events if e == "loaded") == sorted(names)
    assert not list(tmp_path.glob(cache.TMP_PREFIX + "*"))
    for ref, a, b in zip(reference, first, second):
        assert torch.equal(ref, a) and torch.equal(a, b)


@pytest.fixture(autouse=True)
def _fresh_cache_state(monkeypatch):
    monkeypatch.setattr(cache, "_dirs", {})
