"""``mergekit-ace plan CONFIG``: a dry run reading only safetensors headers (no tensor data).

Local models: the headers of their files. Hub ids: the headers served by range request (a few
hundred kB per model, never the weights; ``HF_TOKEN`` for gated repos, the local Hub cache under
``HF_HUB_OFFLINE``), see :mod:`mergekit_ace.execution.hub_headers`.

Prints each weight's shape, what happens to it (the rule or the experts' average), the strategy and
row chunk the planner picks, its estimated peak extra memory and flops, then totals: whether the
merge fits a GPU of ``--gpu-memory`` and roughly how long the rule arithmetic takes on this
machine's devices, from a throughput measured at start-up (a float64 matmul and a float64 eigh),
or on a GPU of ``--gpu-tflops`` (a figure you supply, e.g. from the vendor's data sheet).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mergekit_ace.errors import UserError

#: merge_method -> the execution layer's rule (every method this package adds).
RULES = {name: name for name in ("ace", "actmat", "tsv_m", "iso_c", "iso_cts", "wudi")}


def rule_kind(method: str, params: dict):
    """The execution layer's rule for a config (wudi with ``solver: adam``: wudi_adam)."""
    rule = RULES.get(method)
    if rule == "wudi" and params.get("solver") == "adam":
        return "wudi_adam"
    return rule


def add_arguments(parser) -> None:
    parser.add_argument("config", help="mergekit YAML config (models: form; base_model required for this package's "
                                        "methods); models are local directories or Hub ids, of which only the "
                                        "safetensors headers are read (range requests; HF_TOKEN for gated repos; "
                                        "the local Hub cache under HF_HUB_OFFLINE=1)")
    parser.add_argument("--gpu-memory", default=None,
                        help="plan for a GPU with this much memory (e.g. 24GiB); default: this machine's devices")
    parser.add_argument("--gpu-tflops", type=float, default=None,
                        help="float64 throughput of that GPU in TFLOP/s for the time estimate (not measured)")
    parser.add_argument("--budget", default=None,
                        help="memory budget: fraction of --gpu-memory (default 0.9) or a size; "
                             "overrides MERGEKIT_ACE_MEMORY_BUDGET")
    parser.add_argument("--all", action="store_true", help="list every weight (default: the 40 largest)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


# --------------------------------------------------------------------------- headers
def read_shapes(model_dir: str, revision: str | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) from a model's safetensors headers (no tensor data). As mergekit does,
    an existing path is local (a directory, its index json or its ``*.safetensors``, or one
    ``.safetensors`` file); anything else is a Hub repo id, read at ``revision`` by range request (or
    from the local Hub cache under ``HF_HUB_OFFLINE``, see :mod:`.hub_headers`)."""
    from mergekit_ace.execution.hub_headers import is_hub_repo_id, read_hub_shapes, safetensors_file_shapes

    path = Path(model_dir)
    if path.is_file() and path.suffix == ".safetensors":
        files = [path]
    elif path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({path / f for f in weight_map.values()})
        else:
            files = sorted(path.glob("*.safetensors"))
    elif path.exists():
        raise UserError(f"{model_dir}: not a model directory or a .safetensors file")
    elif is_hub_repo_id(model_dir):
        return read_hub_shapes(model_dir, revision)
    else:
        raise UserError(f"{model_dir}: no such local directory, and not a Hub repo id (org/name)")
    if not files:
        raise UserError(f"{model_dir}: no .safetensors files")
    return safetensors_file_shapes(files)


def load_config(path: str):
    import yaml
    from mergekit.config import MergeConfiguration

    try:
        with open(path) as fh:
            data = yaml.safe_load(fh)
        config = MergeConfiguration.model_validate(data)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except Exception as error:  # pydantic / yaml errors are the user's
        raise UserError(f"{path}: not a valid mergekit config: {error}") from error
    if not config.models:
        raise UserError(f"{path}: plan supports the 'models:' form of mergekit configs (not slices/modules)")
    return config


def _model_path(ref) -> str:
    return str(ref.model.path)


def _read_model_shapes(ref):
    """The headers of a config's model reference: its path (local or Hub id) at its revision
    (``org/name@revision`` in the config)."""
    return read_shapes(_model_path(ref), ref.model.revision)


# --------------------------------------------------------------------------- throughput
def median_seconds(fn: Callable[[], object], device: str = "cpu", min_run_time: float = 0.2) -> float:
    """The median time of one ``fn()`` call: :class:`torch.utils.benchmark.Timer`'s blocked
    autorange (repeated blocks of calls for at least ``min_run_time`` seconds, CUDA synchronised),
    with this process's thread count. One slow call (a page fault, a thread pool waking, another
    process's burst) moves a median but barely; a single timed call it can move 10-40x (seen on
    this 2-core VM, 2026-12-03: a whole-7B estimate 14.7x too long)."""
    import torch
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(timer.blocked_autorange(min_run_time=min_run_time).median)


def measure_throughput(device: str = "cpu") -> tuple[float, float]:
    """Measured float64 (matmul, eigh) throughput in flop/s on ``device`` (under a second): the
    median time of a 1024-wide product and of a 512-wide symmetric eigendecomposition."""
    import torch

    from mergekit_ace.execution.memory import EIGH_FLOP_FACTOR

    g = torch.Generator().manual_seed(0)
    a = torch.randn(1024, 1024, dtype=torch.float64, generator=g).to(device)
    b = torch.randn(512, 512, dtype=torch.float64, generator=g).to(device)
    s = b @ b.T
    mm = 2.0 * 1024 ** 3 / median_seconds(lambda: a @ a, device)
    eig = EIGH_FLOP_FACTOR * 512 ** 3 / median_seconds(lambda: torch.linalg.eigh(s), device)
    return mm, eig


# --------------------------------------------------------------------------- plan
def build_plan(config, budget_bytes: float) -> dict:
    from mergekit_ace.execution.executor import choose_plan, refines
    from mergekit_ace.execution.memory import average_estimate, solve_of
    from mergekit_ace.rules.scope import RULE

    method = config.merge_method
    params = dict(config.parameters or {})
    rule = rule_kind(method, params)
    base_ref = config.base_model
    model_refs = [m.model for m in config.models]
    if rule and base_ref is None:
        raise UserError(f"merge_method {method} requires base_model")
    base = base_ref if base_ref is not None else model_refs[0]
    base_path = str(base.model)
    experts = [r for r in model_refs if base_ref is None or r.model != base_ref.model]
    base_shapes = _read_model_shapes(base)
    for ref in experts:
        other = _read_model_shapes(ref)
        missing = [k for k, (shape, _) in base_shapes.items() if other.get(k, (None,))[0] != shape]
        if missing:
            raise UserError(f"{ref.model}: {len(missing)} weight(s) missing or shaped differently "
                            f"from the base, e.g. {missing[0]}")
    T = len(experts)
    merge_embeddings = bool(params.get("merge_embeddings", False))
    k_frac = float(params.get("k_frac", 0.3))
    rows = []
    for name, (shape, dtype) in base_shapes.items():
        itemsize = 2 if dtype in ("F16", "BF16") else 4 if dtype == "F32" else 8
        inputs = (T + 1) * _numel(shape) * itemsize
        treatment = _treatment(name, shape, params, merge_embeddings) if rule else None
        if treatment == RULE:
            plan = choose_plan(rule, shape[0], shape[1], T, budget_bytes, k_frac=k_frac,
                               refine=refines(params), iterations=max(0, int(params.get("iterations", 300))),
                               solve=solve_of(rule, params))
            est, what, strategy, chunk = plan.estimate, rule, plan.strategy, plan.row_chunk
        else:
            est = average_estimate(shape, T, out_bytes=itemsize)
            what = treatment if rule else f"{method} (elementwise)"
            strategy, chunk = "-", None
        rows.append(dict(name=name, shape=list(shape), dtype=dtype, rule=what, strategy=strategy,
                         row_chunk=chunk, peak_bytes=est.peak_bytes, input_bytes=inputs,
                         matmul_flops=est.matmul_flops, eigh_flops=est.eigh_flops))
    return dict(method=method, experts=T, base=base_path, weights=rows)


def _treatment(name: str, shape, params: dict, merge_embeddings: bool) -> str:
    """rule / average / base for one weight, with ``scope`` and ``average_from_dim`` resolved for
    this tensor name by mergekit's own filter matching (rules/scope.py ``weight_scope``)."""
    from mergekit.config import evaluate_setting

    from mergekit_ace.errors import MergeInputError
    from mergekit_ace.rules.scope import weight_scope

    def setting(key, default):
        if key not in params:
            return default
        value = evaluate_setting(name, params[key], 0, validate=lambda v: v)
        return default if value is None else value

    try:
        return weight_scope(name, shape, setting("scope", "default"), merge_embeddings=merge_embeddings,
                            average_from_dim=setting("average_from_dim", 0))
    except MergeInputError as exc:
        raise UserError(str(exc)) from None


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def run(args) -> int:
    from mergekit_ace.execution.budget import memory_budget, parse_budget, parse_size
    from mergekit_ace.execution.memory import SVD_RULES, format_bytes

    config = load_config(args.config)
    try:
        if args.gpu_memory:
            gpu_bytes = parse_size(args.gpu_memory)
            kind, value = parse_budget(args.budget if args.budget is not None else 0.9)
            budget = value * gpu_bytes if kind == "fraction" else value
            where = f"a GPU with {format_bytes(gpu_bytes)} (budget {format_bytes(budget)})"
        else:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
            budget = memory_budget(torch.device(device), args.budget)
            where = f"this machine's {device} (budget {format_bytes(budget)})"
    except ValueError as error:
        raise UserError(str(error)) from None
    plan = build_plan(config, budget)
    method = plan["method"]
    rule = RULES.get(method)
    weights = plan["weights"]
    worst = max(weights, key=lambda r: r["peak_bytes"] + r["input_bytes"])
    need = worst["peak_bytes"] + worst["input_bytes"]
    mm = sum(r["matmul_flops"] for r in weights)
    eig = sum(r["eigh_flops"] for r in weights)
    throughputs = {}
    import torch

    throughputs["cpu (measured now, float64)"] = measure_throughput("cpu")
    if torch.cuda.is_available():
        throughputs[f"{torch.cuda.get_device_name()} (measured now, float64)"] = measure_throughput("cuda")
    if args.gpu_tflops:
        throughputs[f"GPU at {args.gpu_tflops} TFLOP/s (given; eigh assumed 10x slower per flop)"] = (
            args.gpu_tflops * 1e12, args.gpu_tflops * 1e11)
    times = {k: mm / v[0] + eig / v[1] for k, v in throughputs.items()}
    summary = dict(planned_for=where, budget_bytes=budget, worst_weight=worst["name"],
                   worst_weight_bytes=need, fits=need <= budget, matmul_flops=mm, eigh_flops=eig,
                   seconds=times, throughput_flops={k: list(v) for k, v in throughputs.items()})
    if args.json:
        print(json.dumps(dict(plan, summary=summary), indent=1))
        return 0
    shown = weights if args.all else sorted(weights, key=lambda r: -r["peak_bytes"])[:40]
    print(f"merge_method {plan['method']}, {plan['experts']} expert(s), base {plan['base']}")
    print(f"planned for {where}; estimates: extra memory of the rule (inputs not counted), flops")
    print(f"{'weight':58s} {'shape':>14s} {'rule':>8s} {'strategy':>16s} {'chunk':>6s} {'peak':>11s} {'GFLOP':>9s}")
    for r in shown:
        shape = "x".join(str(s) for s in r["shape"])
        print(f"{r['name'][:58]:58s} {shape:>14s} {r['rule'][:8]:>8s} {r['strategy']:>16s} "
              f"{str(r['row_chunk'] or 'all'):>6s} {format_bytes(r['peak_bytes']):>11s} "
              f"{(r['matmul_flops'] + r['eigh_flops']) / 1e9:9.1f}")
    if not args.all and len(weights) > len(shown):
        print(f"... {len(weights) - len(shown)} smaller weight(s) not shown (--all)")
    print(f"\nweights: {len(weights)}, rule on {sum(r['strategy'] != '-' for r in weights)}; "
          f"total {mm / 1e12:.2f} TFLOP in products/solves + {eig / 1e12:.2f} TFLOP in decompositions (eigh/SVD)")
    print(f"largest need: {worst['name']}: {format_bytes(need)} (its inputs + the rule's peak): "
          f"{'fits' if summary['fits'] else 'does NOT fit'} {where}")
    for k, v in times.items():
        tp = throughputs[k]
        print(f"rule arithmetic on {k}: ~{v:,.0f} s  "
              f"(matmul {tp[0] / 1e9:.1f} GFLOP/s, eigh {tp[1] / 1e9:.1f} GFLOP/s)")
    if rule in SVD_RULES:
        print(f"({method}: memory and flops of the full-SVD route, an upper bound; the exact Gram route, "
              "taken where its error estimate allows, needs less)")
    if rule_kind(method, dict(config.parameters or {})) == "wudi_adam":
        print("(wudi, solver: adam: the official float32 Adam iterations, counted at the float64 rate above; "
              "meant for GPUs, the closed form is the default)")
    print("(reading and writing the weights is not included)")
    return 0
