"""Run one weight's rule under a memory budget: plan, retry smaller on out-of-memory, CPU fallback.

Policy (``docs/execution.md``):

1. Compute where mergekit put the tensors (``--cuda``, ``--device``, ``--multi-gpu``: each worker
   thread's own GPU). The budget is :func:`~mergekit_ace.execution.budget.memory_budget` of that
   device.
2. :func:`choose_plan` estimates every (strategy, row chunk) with :mod:`.memory` and takes the one
   with the fewest flops among those that fit (ties: larger chunks); if none fits, the smallest.
3. On an out-of-memory error the weight is retried with the next plan whose estimate is at most
   half the failed one's; when none is left (or none fitted at all) it is merged on the CPU and
   the result moved back. The first CPU fallback in a process is logged as a warning, later ones
   at debug level. A merge never dies of accelerator memory.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mergekit_ace.execution.budget import memory_budget
from mergekit_ace.execution.memory import (
    ADAM_ITERATIONS,
    RULE_STRATEGIES,
    WUDI_ADAM,
    Estimate,
    estimate,
    format_bytes,
    solve_of,
)
from mergekit_ace.rules.checks import describe
from mergekit_ace.rules.precision import (
    float32_products_can_serve,
    float64_recompute_count,
    precision_counts,
    record_precision,
    thread_float64_recompute_count,
)

LOG = logging.getLogger(__name__)

#: Smallest row block the planner proposes for large matrices (smaller blocks only add overhead).
MIN_ROW_CHUNK = 64
#: Row blocks this tall already run matrix products at full speed; the planner uses the smallest
#: such block (least memory) when the budget allows a bigger one.
EFFICIENT_ROWS = 1024
#: Precision of the O(d_out d_in^2) products: "auto" (default: float32 where the weight's
#: conditioning allows, checked per weight, else float64; rules/precision.py), "float32" (unchecked:
#: measured to lose 1e-4 accuracy for low-rank or large updates) or "float64".
MATMUL_DTYPE_ENV = "MERGEKIT_ACE_MATMUL_DTYPE"
MATMUL_DTYPES = ("auto", "float32", "float64")
#: Rules that take ``matmul_dtype`` and ``output_dtype`` (the precision contract): ace, actmat and
#: wudi (float32 products), the SVD rules (the whole rule in float32 where the contract allows it).
MATMUL_DTYPE_RULES = ("ace", "actmat", "wudi", "tsv_m", "iso_c", "iso_cts")
#: Rules whose "auto" is float64 through the executor (mergekit): the SVD peers' float32 attempt
#: is priced by error estimates that are far too pessimistic for their top-r/T and polar steps
#: (rejected on 7 of 9 TinyLlama-shaped weights whose unchecked float32 error was <= 0.02 of the bf16
#: rounding, costing 1.1-1.6x float64; benchmarks/RESULTS.md); called directly, they keep "auto".
AUTO_IS_FLOAT64_RULES = ("tsv_m", "iso_c", "iso_cts")
COMPUTE_DTYPE = torch.float64

_fallback_lock = threading.Lock()
_fallback_count = 0
_retry_count = 0


@dataclass(frozen=True)
class WeightPlan:
    strategy: str
    row_chunk: int | None  # None: the whole matrix is one block
    estimate: Estimate
    fits: bool


def matmul_dtype():
    """The rules' ``matmul_dtype`` from ``MERGEKIT_ACE_MATMUL_DTYPE`` (default ``"auto"``)."""
    name = os.environ.get(MATMUL_DTYPE_ENV, "auto")
    if name not in MATMUL_DTYPES:
        raise ValueError(f"{MATMUL_DTYPE_ENV} must be one of {', '.join(MATMUL_DTYPES)}, got {name!r}")
    return name if name == "auto" else getattr(torch, name)


_tf32_warned = False
_tf32_lock = threading.Lock()


def float32_products_are_ieee(device: torch.device) -> bool:
    """Whether float32 matrix products on ``device`` are full float32 (what "auto"'s error estimates
    assume). ``torch.set_float32_matmul_precision("high")`` (TF32 or bfloat16 passes on recent GPUs
    and CPUs) gives ~1e-3 relative products instead of ~6e-8; "auto" then uses float64 products."""
    exact = torch.get_float32_matmul_precision() == "highest"
    if device.type == "cuda":
        exact = exact and not torch.backends.cuda.matmul.allow_tf32
    global _tf32_warned
    with _tf32_lock:
        warn = not exact and not _tf32_warned
        _tf32_warned = _tf32_warned or warn
    if warn:
        LOG.warning("float32 matmul precision is reduced (TF32/bfloat16 passes allowed); %s=auto uses "
                    "float64 products", MATMUL_DTYPE_ENV)
    return exact


def _bytes_of(dtype) -> int:
    """Element size the estimates assume: "auto" may fall back to float64, so 8."""
    return 8 if isinstance(dtype, str) else torch.finfo(dtype).bits // 8


def candidate_plans(rule: str, d_out: int, d_in: int, n_experts: int, budget: float, *,
                    matmul_bytes: int = 8, refine: bool = True, k_frac: float = 0.3,
                    iterations: int = ADAM_ITERATIONS, solve: str = "exact") -> list[WeightPlan]:
    """Every (strategy, chunk) the planner considers, chunks halving from the whole matrix."""
    chunks: list[int | None] = [None]
    c = d_out // 2
    smallest = max(1, min(MIN_ROW_CHUNK, d_out // 64))  # small matrices: blocks down to d_out/64
    while c >= smallest:
        chunks.append(c)
        c //= 2
    plans = []
    if rule not in RULE_STRATEGIES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {tuple(RULE_STRATEGIES)}")
    for strategy in RULE_STRATEGIES[rule]:
        for chunk in chunks:
            est = estimate(rule, strategy, d_out, d_in, n_experts, chunk, matmul_bytes=matmul_bytes,
                           refine=refine, k_frac=k_frac, iterations=iterations, solve=solve)
            plans.append(WeightPlan(strategy, chunk, est, est.peak_bytes <= budget))
    return plans


def choose_plan(rule: str, d_out: int, d_in: int, n_experts: int, budget: float, **kw) -> WeightPlan:
    """The plan with the fewest flops that fits ``budget``; among those, the least memory with row
    blocks of at least ``EFFICIENT_ROWS`` (matmul efficiency), else the biggest blocks. If nothing
    fits: the plan with the smallest estimate."""
    plans = candidate_plans(rule, d_out, d_in, n_experts, budget, **kw)
    fitting = [p for p in plans if p.fits]
    if not fitting:
        return min(plans, key=lambda p: p.estimate.peak_bytes)
    least = min(p.estimate.flops for p in fitting)
    cheapest = [p for p in fitting if p.estimate.flops <= least * (1 + 1e-9)]
    rows = lambda p: p.row_chunk or d_out  # noqa: E731
    efficient = [p for p in cheapest if rows(p) >= min(d_out, EFFICIENT_ROWS)]
    if efficient:
        return min(efficient, key=lambda p: (p.estimate.peak_bytes, -rows(p)))
    return max(cheapest, key=rows)


def is_out_of_memory(error: BaseException) -> bool:
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _smaller(plans: Sequence[WeightPlan], failed: WeightPlan) -> WeightPlan | None:
    limit = failed.estimate.peak_bytes / 2
    smaller = [p for p in plans if p.estimate.peak_bytes <= limit]
    if not smaller:
        return None
    return min(smaller, key=lambda p: (p.estimate.flops, -p.estimate.peak_bytes))


def _on_accelerator(device: torch.device) -> bool:
    """Whether a weight on ``device`` may fall back to the CPU (tests pretend the CPU is one)."""
    return device.type != "cpu"


def _free_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _log_fallback(name: str | None, device: torch.device, reason: str) -> None:
    global _fallback_count
    with _fallback_lock:
        _fallback_count += 1
        first = _fallback_count == 1
    level = logging.WARNING if first else logging.DEBUG
    LOG.log(level, "%s: %s on %s; merging this weight on the CPU%s", describe(name), reason, device,
            " (further CPU fallbacks are logged at debug level)" if first else "")


def fallback_count() -> int:
    """How many weights this process merged on the CPU after the accelerator ran out of memory."""
    return _fallback_count


def oom_retry_count() -> int:
    """How many times this process retried a weight with a smaller plan after running out of memory."""
    return _retry_count


def _count_retry() -> None:
    global _retry_count
    with _fallback_lock:
        _retry_count += 1


#: "auto" products: after this many consecutive weights of one kind (rule, shape, expert count,
#: device, parameters) needed float64, later weights of that kind skip the float32 attempt
#: (a model's layers repeat the same shapes: 28-32 weights of each kind in a 3B-7B model).
#: The device is part of the kind: under ``--multi-gpu`` each GPU's worker thread keeps its own
#: streaks, so a weight's decision depends only on the weights merged before it on that device
#: (the same in every run), not on how the threads interleave.
AUTO_SKIP_AFTER = 2
_auto_lock = threading.Lock()
_auto_float64_streak: dict = {}
#: Per thread: ``.auto_outcome`` of the last :func:`execute_rule` call (:func:`last_auto_outcome`).
_this_thread = threading.local()


def refines(parameters: dict) -> bool:
    """Whether ACE's step 6 can run with these parameters (k_frac > 0 and refinement not "none");
    the estimates for "rescale" are those of "add", an upper bound (it keeps no F)."""
    return float(parameters.get("k_frac", 0.3)) > 0 and parameters.get("refinement", "add") != "none"


def _auto_kind(rule_kind: str, base: torch.Tensor, n_experts: int, parameters: dict) -> tuple:
    params = tuple(sorted((k, v) for k, v in parameters.items()
                          if k not in ("ids", "scale") and isinstance(v, (int, float, str))))
    return (rule_kind, tuple(base.shape), n_experts, str(base.device), str(parameters.get("output_dtype")),
            params)


def _resolved_matmul_dtype(rule_kind: str, rule_parameters: dict, device: torch.device):
    """``matmul_dtype`` as :func:`execute_rule` will use it: the argument, else the environment;
    "auto" becomes float64 for :data:`AUTO_IS_FLOAT64_RULES`, where float32 products are not full
    float32, or where they cannot serve the output dtype's precision contract (``output_dtype``
    float32/float64, or none given)."""
    mdt = rule_parameters.get("matmul_dtype") or matmul_dtype()
    if mdt == "auto" and rule_kind in AUTO_IS_FLOAT64_RULES:
        mdt = torch.float64
    if mdt == "auto" and not float32_products_are_ieee(device):
        mdt = torch.float64
    if mdt == "auto" and not float32_products_can_serve(rule_parameters.get("output_dtype")):
        mdt = torch.float64  # float32/float64 outputs: the contract leaves float32 products no room
    return mdt


def _note_auto(kind: tuple, outcome: str) -> None:
    """Update a kind's float64 streak after a call whose "auto" ``outcome`` is "float32" (accepted)
    or "float64" (recomputed); "skipped" leaves it (the streak already reached AUTO_SKIP_AFTER)."""
    if outcome == "skipped":
        return
    with _auto_lock:
        _auto_float64_streak[kind] = _auto_float64_streak.get(kind, 0) + 1 if outcome == "float64" else 0


def last_auto_outcome() -> str | None:
    """What "auto" did in this thread's last :func:`execute_rule` call: ``"float32"`` (the float32
    attempt was accepted), ``"float64"`` (recomputed with float64 products), ``"skipped"`` (float64
    directly, :data:`AUTO_SKIP_AFTER`) or ``None`` (products were not "auto")."""
    return getattr(_this_thread, "auto_outcome", None)


def replay_auto_outcome(rule_kind: str, base: torch.Tensor, n_experts: int, outcome: str | None,
                        **rule_parameters) -> None:
    """Update "auto"'s bookkeeping as an :func:`execute_rule` call with these arguments and this
    :func:`last_auto_outcome` did, without computing anything: a weight taken from the resume cache
    (:mod:`.cache`) replays its outcome, so that the weights computed after it take the same
    float32/float64 decisions as in an uninterrupted run."""
    if outcome is None or rule_kind not in MATMUL_DTYPE_RULES:
        return
    if _resolved_matmul_dtype(rule_kind, rule_parameters, base.device) != "auto":
        return
    rule_parameters.pop("matmul_dtype", None)
    _note_auto(_auto_kind(rule_kind, base, n_experts, rule_parameters), outcome)


def execute_rule(
    rule_kind: str,
    rule: Callable[..., torch.Tensor],
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    name: str | None = None,
    budget: float | None = None,
    fault_injector: Callable[[WeightPlan, torch.device], None] | None = None,
    **rule_parameters,
) -> torch.Tensor:
    """``rule(base, experts, strategy=..., row_chunk=..., **rule_parameters)`` under the policy above.

    ``rule_kind`` is ``"ace"``, ``"actmat"``, ``"wudi"``, ``"wudi_adam"``, ``"tsv_m"``, ``"iso_c"`` or
    ``"iso_cts"`` (for the estimates); all but ``wudi_adam`` (float32, as the official solver) take
    ``matmul_dtype`` and ``output_dtype``, the dtype the result will be stored in, which sets the
    precision contract (docs/execution.md). ``budget`` in bytes overrides
    the device's budget. ``fault_injector(plan, device)`` is called before every attempt (tests use
    it to raise an out-of-memory error). Returns the rule's result on the inputs' device.

    With ``matmul_dtype="auto"`` (the default), a weight whose kind (:data:`AUTO_SKIP_AFTER`) needed
    float64 products the last times is computed in float64 directly, without a float32 attempt
    that would be thrown away; float64 is what "auto" would have fallen back to.
    """
    _summary_at_exit()
    run = functools.partial(_execute, rule_kind, rule, base, experts, name=name, budget=budget,
                            fault_injector=fault_injector)
    _this_thread.auto_outcome = None
    if rule_kind not in MATMUL_DTYPE_RULES:  # wudi's Adam solver: float32, as the official code
        rule_parameters.pop("output_dtype", None)
        out = run(**rule_parameters)
        record_precision(torch.float32)
        return out
    mdt = _resolved_matmul_dtype(rule_kind, rule_parameters, base.device)
    rule_parameters.pop("matmul_dtype", None)
    if mdt != "auto":
        return run(matmul_dtype=mdt, **rule_parameters)
    kind = _auto_kind(rule_kind, base, len(experts), rule_parameters)
    with _auto_lock:
        skip = _auto_float64_streak.get(kind, 0) >= AUTO_SKIP_AFTER
    if skip:
        out = run(matmul_dtype=torch.float64, **rule_parameters)
        _this_thread.auto_outcome = "skipped"
        return out
    before = thread_float64_recompute_count()  # this thread's: other threads' do not count
    out = run(matmul_dtype=mdt, **rule_parameters)
    outcome = "float64" if thread_float64_recompute_count() > before else "float32"
    _note_auto(kind, outcome)
    _this_thread.auto_outcome = outcome
    return out


_summary_registered = False


def merge_summary() -> str:
    """One line on what this process merged by rule: weights by the precision of their products
    (how many of the float64 ones after a float32 attempt), out-of-memory retries, CPU fallbacks."""
    counts = precision_counts()
    total = sum(counts.values())
    parts = [f"{n} with {label} products" for label, n in sorted(counts.items())]
    redone = float64_recompute_count()
    if redone:
        parts.append(f"{redone} recomputed in float64 after a float32 attempt")
    return (f"mergekit-ace: {total} weight(s) merged by rule: {', '.join(parts) or 'none'}; "
            f"{oom_retry_count()} out-of-memory retries, {fallback_count()} CPU fallbacks")


def _summary_at_exit() -> None:
    """Print :func:`merge_summary` to stderr when the process ends (registered at the first weight)."""
    global _summary_registered
    with _auto_lock:
        if _summary_registered:
            return
        _summary_registered = True
    atexit.register(lambda: print(merge_summary(), file=sys.stderr))


def _execute(
    rule_kind: str,
    rule: Callable[..., torch.Tensor],
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    name: str | None = None,
    budget: float | None = None,
    fault_injector: Callable[[WeightPlan, torch.device], None] | None = None,
    **rule_parameters,
) -> torch.Tensor:
    """:func:`execute_rule` once the products' dtype is decided (``matmul_dtype`` in
    ``rule_parameters``)."""
    device = base.device
    d_out, d_in = base.shape
    rule_parameters.setdefault("compute_dtype", COMPUTE_DTYPE)
    if rule_kind in MATMUL_DTYPE_RULES:
        mdt = rule_parameters["matmul_dtype"]
        kw = dict(matmul_bytes=_bytes_of(mdt), k_frac=rule_parameters.get("k_frac", 0.3),
                  refine=refines(rule_parameters), solve=solve_of(rule_kind, rule_parameters))
    elif rule_kind == WUDI_ADAM:
        kw = dict(iterations=max(0, int(rule_parameters.get("iterations", ADAM_ITERATIONS))))  # the rule checks it
    else:
        kw = {}

    def attempt(plan: WeightPlan, on: torch.device, b, e):
        if fault_injector is not None:
            fault_injector(plan, on)
        return rule(b, e, name=name, strategy=plan.strategy, row_chunk=plan.row_chunk, **rule_parameters)

    dev_budget = budget if budget is not None else memory_budget(device)
    plans = candidate_plans(rule_kind, d_out, d_in, len(experts), dev_budget, **kw)
    plan = choose_plan(rule_kind, d_out, d_in, len(experts), dev_budget, **kw)
    reason = None
    if _on_accelerator(device) and not plan.fits:
        reason = (f"no plan fits the memory budget ({format_bytes(dev_budget)}; smallest needs "
                  f"{format_bytes(plan.estimate.peak_bytes)})")
        plan = None
    while plan is not None:
        try:
            LOG.debug("%s: %s, row_chunk=%s, estimated peak %s on %s", describe(name), plan.strategy,
                      plan.row_chunk, format_bytes(plan.estimate.peak_bytes), device)
            return attempt(plan, device, base, experts)
        except Exception as error:  # noqa: BLE001 - only out-of-memory errors are handled
            if not is_out_of_memory(error):
                raise
            _free_cache(device)
            failed = plan
            plan = _smaller(plans, failed)
            if plan is not None:
                _count_retry()
            LOG.info("%s: out of memory with %s/row_chunk=%s on %s; %s", describe(name), failed.strategy,
                     failed.row_chunk, device, "retrying smaller" if plan else "no smaller plan")
            reason = "out of memory"
    if not _on_accelerator(device):
        raise MemoryError(f"{describe(name)}: out of memory on the CPU even with the smallest plan")
    _log_fallback(name, device, reason)
    cpu = torch.device("cpu")
    b = base.to(cpu)
    e = [x.to(cpu) for x in experts]
    cpu_budget = memory_budget(cpu)
    plan = choose_plan(rule_kind, d_out, d_in, len(experts), cpu_budget, **kw)
    return attempt(plan, cpu, b, e).to(device)
