"""Run lm-evaluation-harness on every model and write the tables: :func:`evaluate_models`.

The run is a grid of (model, task) *cells*. Each model is loaded once with lm-eval's model
registry; each of its tasks is then scored by ``lm_eval.simple_evaluate`` with lm-eval's own
``TaskManager`` (stock task YAMLs plus an optional ``include_path``) and ``EvaluationTracker``
(lm-eval's results file and, with ``log_samples``, per-sample logs). Three offline adaptations
wrap the run, each leaving the stock tasks unchanged: ``--data-dir`` (:mod:`.data`), HumanEval's
``code_eval`` metric (:mod:`.code_exec`) and NLTK's Punkt model for IFEval (:mod:`.nltk_data`).

Each cell is written to the output directory as soon as it finishes (:mod:`.store`), with the
settings it was computed with (:mod:`.record`), so ``resume`` keeps it; a cell that fails is
recorded with its error and lm-eval stage (:mod:`.lm_calls`) and the run goes on; generation is
fitted to each model's context length (:mod:`.lm_calls`). ``results.json``, ``report.md`` and the
charts are rebuilt from the cells at the end, also when the run fails or is interrupted
(:mod:`.summary`).
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import functools
import gc
import logging
import re
import signal
import threading
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergekit_ace.errors import UserError
from mergekit_ace.evaluation import record as records
from mergekit_ace.evaluation.lm_calls import Stage, observe
from mergekit_ace.evaluation.presets import expand_tasks, metric_keys
from mergekit_ace.evaluation.store import RESULTS_FILE, OutputStore
from mergekit_ace.evaluation.summary import clean_json, failure_line

log = logging.getLogger(__name__)

BACKENDS = ("hf", "vllm")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
    "vocab.txt",
)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# "owner/name" with no local directory of that name: a Hugging Face Hub repository id.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# --------------------------------------------------------------------------- argument checks
def parse_model_args(model_args: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """``"k=v,k2=v2"`` (lm-eval's syntax, values typed by lm-eval) or a dict -> dict."""
    if model_args is None or model_args == "":
        return {}
    if isinstance(model_args, Mapping):
        return dict(model_args)
    from lm_eval.utils import simple_parse_args_string

    try:
        return dict(simple_parse_args_string(str(model_args)))
    except Exception as error:
        raise UserError(f"--model-args {model_args!r} is not of the form key=value,key=value: {error}") from error


def build_model_args(
    backend: str,
    path: str | Path,
    model_args: str | Mapping[str, Any] | None = None,
    *,
    tensor_parallel_size: int | None = None,
    data_parallel_size: int | None = None,
) -> dict[str, Any]:
    """The ``model_args`` lm-eval gets for one model.

    ``pretrained`` is the model's path; ``model_args`` is passed through (``dtype``,
    ``parallelize=True`` for the hf backend, ``gpu_memory_utilization`` for vLLM, ...). For
    ``backend="vllm"`` the tensor/data parallel sizes become vLLM's ``tensor_parallel_size`` and
    ``data_parallel_size``; a size given twice with different values is an error.
    """
    args = parse_model_args(model_args)
    if "pretrained" in args:
        raise UserError("--model-args must not set pretrained=...: each --model NAME=PATH gives it")
    out: dict[str, Any] = {"pretrained": str(path)}
    sizes = {"tensor_parallel_size": tensor_parallel_size, "data_parallel_size": data_parallel_size}
    for key, value in sizes.items():
        if value is None:
            continue
        if backend != "vllm":
            raise UserError(
                f"--{key.replace('_', '-')} is for --backend vllm; with the hf backend use "
                "`accelerate launch` for data parallelism or --model-args parallelize=True "
                "to shard one model over the GPUs (see docs/evaluation.md)"
            )
        if int(value) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        if key in args and int(args[key]) != int(value):
            raise UserError(f"{key} given twice: {args[key]} in --model-args and {value}")
        out[key] = int(value)
    out.update({k: v for k, v in args.items() if k not in out})
    return out


def check_models(
    models: Mapping[str, str | Path], backend: str, model_args: Mapping[str, Any]
) -> dict[str, Path]:
    """Names are simple and unique; for hf/vllm each path is a model directory with a config and
    a tokenizer (unless ``tokenizer=`` is in ``model_args``), or a Hub id ``owner/name`` that is not a
    local directory (lm-eval loads it from the Hub). Returns absolute paths (Hub ids unchanged)."""
    if not models:
        raise UserError("no models given: use --model NAME=PATH (once per model)")
    out: dict[str, Path] = {}
    for name, path in models.items():
        if not _NAME_RE.match(str(name)):
            raise UserError(
                f"model name {name!r} must start with a letter or digit and contain only "
                "letters, digits, '.', '_', '+', '-'"
            )
        if _HUB_ID_RE.match(str(path)) and not Path(path).exists():
            out[str(name)] = Path(str(path))
            continue
        path = Path(path).expanduser()
        if backend in BACKENDS:
            if not path.is_dir():
                raise UserError(f"model {name!r}: directory {path} does not exist")
            if not (path / "config.json").is_file():
                raise UserError(
                    f"model {name!r}: {path} is not a Hugging Face model directory (no config.json)"
                )
            if "tokenizer" not in model_args and not any(
                (path / f).is_file() for f in TOKENIZER_FILES
            ):
                raise UserError(
                    f"model {name!r}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                    "save the tokenizer with the model or pass --model-args tokenizer=PATH"
                )
            path = path.resolve()
        out[str(name)] = path
    return out


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: tuple[str, ...], include_defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def task_manager(include_path=None, tasks: Sequence[str] | None = None):
    """lm-eval's ``TaskManager`` for ``tasks``, cached per process.

    Indexing lm-eval's ~15,000 stock tasks takes many seconds, so when every one of ``tasks`` is
    defined under ``include_path`` the manager indexes only ``include_path``; otherwise it indexes
    the stock tasks too (``include_path`` taking precedence, as in lm-eval).
    """
    if include_path is None:
        paths: tuple[str, ...] = ()
    elif isinstance(include_path, (list, tuple)):
        paths = tuple(str(Path(p).resolve()) for p in include_path)
    else:
        paths = (str(Path(include_path).resolve()),)
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"--include-path {p} is not a directory")
    if paths and tasks:
        local = _task_manager(paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return _task_manager(paths)


def check_tasks(tm, tasks: Sequence[str]) -> None:
    """Every name is an lm-eval task, group or tag; else name it and suggest close ones."""
    known = set(tm.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(
                f"unknown task {task!r}: not an lm-eval task, group or tag, nor a preset "
                f"(ace-llama, actmat-olmo){hint}"
            )


def plan_tasks(
    task_names: Sequence[str],
    *,
    include_path=None,
    allow_code_execution: bool = False,
    data_dir: Path | None = None,
    num_fewshot: int | None = None,
) -> tuple[Any, set[str], dict[str, list[Path]]]:
    """Check ``task_names`` before any model loads: each is known to lm-eval, a task that runs
    model-written code is allowed, and its data files are under ``data_dir`` (when given).

    Returns ``(task manager, code tasks, {task: data files read})``; code tasks are those that run
    model-written code, and groups (which may hold one). Raises :class:`UserError` naming the task.
    """
    from mergekit_ace.evaluation.data import DataFileMissing, check_task_data

    tm = task_manager(include_path, task_names)
    check_tasks(tm, task_names)
    task_files: dict[str, list[Path]] = {}
    code_tasks: set[str] = set()
    for task in task_names:
        cfg = task_config(tm, task)
        if cfg is None or cfg.get("unsafe_code"):
            code_tasks.add(task)
        if cfg and cfg.get("unsafe_code") and not allow_code_execution:
            raise UserError(
                f"task {task!r} runs model-generated code to score it; pass "
                "--allow-code-execution to allow that (each program runs in its own process "
                "with a timeout and no network; see docs/evaluation.md)"
            )
        task_files[task] = []
        if cfg and data_dir is not None:
            try:
                task_files[task] = check_task_data(task, cfg, data_dir, num_fewshot)
            except DataFileMissing as error:
                raise UserError(str(error)) from None
    return tm, code_tasks, task_files


def task_config(tm, task: str) -> dict[str, Any] | None:
    """The task's YAML config (functions unresolved), or None for groups/tags/Python tasks."""
    entry = tm.task_index.get(task)
    if entry is None or entry.cfg is None or "task" not in entry.cfg:
        return None
    return entry.cfg


def extract_scores(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{task: {"metric,filter": value}}`` from ``simple_evaluate``'s ``results["results"]``."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k: float(metrics[k]) for k in metric_keys(metrics)}
    return out


def parse_gen_kwargs(gen_kwargs: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``--gen-kwargs "k=v,..."`` (lm-eval's syntax and typing) or a dict -> dict (None: none)."""
    if gen_kwargs is None or gen_kwargs == "":
        return None
    if isinstance(gen_kwargs, Mapping):
        return dict(gen_kwargs)
    from lm_eval.utils import simple_parse_args_string

    try:
        return dict(simple_parse_args_string(str(gen_kwargs))) or None
    except Exception as error:
        raise UserError(f"--gen-kwargs {gen_kwargs!r} is not of the form key=value,key=value: {error}") from error


# --------------------------------------------------------------------------- interrupts
class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where the run is, as Ctrl-C raises KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(f"interrupted by signal {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block (main thread only), SIGTERM raises :class:`Interrupted`, so the run stops
    the way Ctrl-C stops it: the cell under way is dropped, the finished ones stay."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _environment_collected_once():
    """lm-eval's ``simple_evaluate`` records torch's environment report (which runs ``pip list``
    and other commands, ~0.5 s) in every result; within one run it is the same for every cell,
    so it is collected once and reused."""
    try:
        import torch.utils.collect_env as collect_env
    except Exception:  # pragma: no cover - lm-eval then records the error itself
        yield
        return
    original = collect_env.get_pretty_env_info
    collect_env.get_pretty_env_info = functools.lru_cache(maxsize=1)(original)
    try:
        yield
    finally:
        collect_env.get_pretty_env_info = original


def _main_process() -> bool:
    """False on the non-main processes of ``accelerate launch``/``torchrun`` (they only help)."""
    import os

    return int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("LOCAL_RANK", "0")) == 0


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- one model, one cell
def load_model(backend: str, model_args: dict[str, Any], options: Mapping[str, Any]):
    """The lm-eval model object, created as ``simple_evaluate`` creates it from a name."""
    import lm_eval.api.registry

    try:
        cls = lm_eval.api.registry.get_model(backend)
        return cls.create_from_arg_obj(
            model_args,
            {"batch_size": options.get("batch_size"), "max_batch_size": None,
             "device": options.get("device")},
        )
    except ImportError as error:
        if backend == "vllm":
            raise UserError(f"--backend vllm needs vLLM: pip install vllm ({error})") from None
        raise


def _data_record(served: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The data a cell read (from :func:`.data.redirect_datasets`), with file hashes."""
    out: list[dict[str, Any]] = []
    for entry in served:
        item: dict[str, Any] = {"dataset": entry["dataset"], "name": entry["name"]}
        files = entry.get("files")
        if files is None and entry.get("data_files") is not None:
            given = entry["data_files"]
            given = given.values() if isinstance(given, Mapping) else [given]
            files = [f for g in given for f in ([g] if isinstance(g, str) else g)]
        if files is not None:
            item["files"] = records.data_files_record(files) or [str(f) for f in files]
        else:
            item["revision"] = entry.get("revision")
        if item not in out:
            out.append(item)
    return out


def run_cell(
    lm,
    name: str,
    task: str,
    *,
    store: OutputStore,
    settings: Mapping[str, Any],
    tm,
    model_args: Mapping[str, Any],
    options: Mapping[str, Any],
    log_samples: bool,
    served: list[dict[str, Any]],
) -> dict[str, Any] | None:
    """Score ``lm`` on one task and write the cell (scores, or the error and its stage); return
    the cell, or None on a non-main process. Only an interrupt escapes (the cell is dropped)."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    staging = store.begin_cell(name, task)
    stage = Stage()
    started, clock = _now(), time.monotonic()
    cell: dict[str, Any] = {"model": name, "task": task, "settings": settings, "started": started}
    calls = None
    first_served = len(served)
    try:
        tracker = None
        if staging is not None:
            tracker = EvaluationTracker(output_path=str(staging / "lm_eval" / "results.json"))
        with observe(lm, name, task, stage) as calls:
            results = lm_eval.simple_evaluate(
                model=lm, model_args=dict(model_args), tasks=[task], task_manager=tm,
                log_samples=log_samples, evaluation_tracker=tracker, **options,
            )
        if results is None:  # not the main process of a distributed run
            store.discard(staging)
            return None
        stage.name = "save"
        samples = results.pop("samples", None) or {}
        if tracker is not None:
            tracker.save_results_aggregated(results=dict(results), samples=samples)
            for task_name in results.get("configs", {}):
                if task_name in samples:
                    tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
            if not list((staging / "lm_eval").glob("results_*.json")):  # the tracker only warns
                raise OSError(f"lm-eval could not write its results file into {staging / 'lm_eval'}")
        cell.update(
            status="ok",
            scores=extract_scores(results),
            lm_eval=clean_json(results),
            samples_logged=bool(log_samples),
        )
    except Exception as error:
        cell.update(status="failed", error={
            "type": type(error).__name__,
            "message": str(error) or repr(error),
            "stage": stage.name,
            "traceback": traceback.format_exc(),
        })
        log.error("failed: %s", failure_line({"model": name, "task": task, **cell["error"]}))
    except BaseException:
        store.discard(staging)
        raise
    if cell["status"] == "failed":  # free what the failed attempt held (e.g. after CUDA OOM)
        gc.collect()
        _empty_cuda_cache()
    cell.update(
        generation=clean_json(calls.generation) if calls and calls.generation else None,
        warnings=list(calls.warnings) if calls else [],
        data_files=_data_record(served[first_served:]),
        finished=_now(),
        seconds=round(time.monotonic() - clock, 2),
    )
    try:
        store.commit_cell(staging, cell)
    except BaseException:
        store.discard(staging)
        raise
    if cell["status"] == "ok":
        log.info("finished %s on %s in %.1f s", name, task, cell["seconds"])
    return cell


def _failed_cell(name: str, task: str, settings, error: BaseException, stage: str) -> dict[str, Any]:
    return {
        "model": name, "task": task, "settings": settings, "status": "failed",
        "started": _now(), "finished": _now(), "seconds": 0.0, "warnings": [], "data_files": [],
        "generation": None,
        "error": {"type": type(error).__name__, "message": str(error) or repr(error),
                  "stage": stage, "traceback": "".join(traceback.format_exception(error))},
    }


# --------------------------------------------------------------------------- the run
def evaluate_models(
    models: Mapping[str, str | Path],
    tasks: Sequence[str],
    output_dir: str | Path,
    *,
    owners: Mapping[str, str] | str | Path | None = None,
    base: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int | str = 1,
    backend: str = "hf",
    model_args: str | Mapping[str, Any] | None = None,
    data_dir: str | Path | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    allow_code_execution: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    device: str | None = "cpu",
    gen_kwargs: str | Mapping[str, Any] | None = None,
    primary_metrics: Mapping[str, str] | None = None,
    tensor_parallel_size: int | None = None,
    data_parallel_size: int | None = None,
    code_timeout: float = 3.0,
    apply_chat_template: bool = False,
    bootstrap_iters: int = 100000,
    seed: int = 0,
    log_samples: bool = False,
) -> dict[str, Any]:
    """Score every model on every task with lm-eval and write the report; return results.json.

    Args:
        models: ``{name: model directory}``; names label rows (letters, digits, ``._+-``).
        tasks: lm-eval task/group/tag names or presets (``ace-llama``, ``actmat-olmo``);
            comma-separated strings are split.
        output_dir: the result directory. Each (model, task) cell is written into it as soon as
            it finishes; ``results.json``, ``report.md`` and the charts are rebuilt at the end.
            An existing non-empty one is refused unless ``resume`` or ``overwrite``.
        owners: ``{task: owning model}`` (or ``{model: [tasks]}``, or a JSON/YAML file path) for the
            normalised table; every task needs an owner that is one of ``models``.
        base: the base model's name (its role in the report; optional).
        limit, num_fewshot, batch_size, device, gen_kwargs, apply_chat_template, bootstrap_iters:
            passed to ``lm_eval.simple_evaluate``. ``device=None`` means ``cuda`` when available,
            else ``cpu``; it is not passed with vLLM (which places the model itself).
            ``max_gen_toks`` is capped per model to fit its context length (with a warning).
        backend: ``"hf"`` or ``"vllm"`` (any other registered lm-eval model type is passed through
            as is, without the model-directory checks).
        model_args: extra lm-eval model arguments (``"k=v,..."`` or dict) for every model.
        data_dir: read every Hub data set from ``data_dir/<dataset_path>/<name or default>/<split>.jsonl``.
        include_path: directory (or list) of extra lm-eval task YAMLs.
        allow_code_execution: required for tasks that run model-written code (HumanEval).
        overwrite: replace an existing ``output_dir`` (it is replaced when the first cell is written).
        resume: keep the cells of ``output_dir`` computed with the same settings and compute the
            rest (and the failed ones).
        primary_metrics: ``{task: "metric,filter"}`` overriding the default primary metrics.
        tensor_parallel_size, data_parallel_size: vLLM parallelism.
        code_timeout: seconds each generated program may run.
        seed: lm-eval's python/numpy/torch/fewshot seeds.
        log_samples: write lm-eval's per-sample outputs into each cell.

    Returns:
        The content of ``results.json``: ``scores`` (``{model: {task: {metric: value}}}``),
        ``primary_metrics``, ``roles``, ``raw``, ``normalised``, ``averages``, ``status``
        (``{model: {task: "ok" | "failed" | "not run"}}``), ``failures``, ``cells``, ``record``,
        ``config`` and ``lm_eval`` (lm-eval's results per model, samples excluded). A failed cell
        does not raise: it is in ``failures``. On a non-main rank of an ``accelerate launch`` run
        nothing is written and ``{}`` is returned.
    """
    plan = plan_evaluation(
        models, tasks, output_dir, owners=owners, base=base, limit=limit, num_fewshot=num_fewshot,
        batch_size=batch_size, backend=backend, model_args=model_args, data_dir=data_dir,
        include_path=include_path, allow_code_execution=allow_code_execution, overwrite=overwrite,
        resume=resume, device=device, gen_kwargs=gen_kwargs, tensor_parallel_size=tensor_parallel_size,
        data_parallel_size=data_parallel_size, code_timeout=code_timeout,
        apply_chat_template=apply_chat_template, bootstrap_iters=bootstrap_iters, seed=seed,
        log_samples=log_samples)
    main = _main_process()
    store = OutputStore(plan.output_dir, resume=resume, overwrite=overwrite, write=main)
    reused = _plan_resume(store, plan.settings, log_samples) if resume else set()
    if resume and main:
        log.info("--resume: %d of %d cells are already done and are kept", len(reused), len(plan.settings))
    run = EvaluationRun(plan, store, reused, main=main, primary_metrics=primary_metrics,
                        allow_code_execution=allow_code_execution, code_timeout=code_timeout,
                        log_samples=log_samples)
    run.score_keeping_finished()
    if not main:
        return {}
    return run.summarise()


@dataclass
class EvaluationPlan:
    """What :func:`evaluate_models` runs, checked before any model loads (:func:`plan_evaluation`)."""

    paths: dict[str, Path]  # {model name: path or Hub id}
    per_model_args: dict[str, dict[str, Any]]  # lm-eval's model_args per model
    output_dir: Path
    owners: dict[str, str] | None
    base: str | None
    task_names: list[str]
    backend: str
    data_dir: Path | None
    tm: Any  # lm-eval's TaskManager
    code_tasks: set[str]
    options: dict[str, Any]  # simple_evaluate's options
    config: dict[str, Any]  # results.json's "config"
    identities: dict[str, Any]  # each model's identity (config hash, files fingerprint)
    versions: dict[str, Any]
    settings: dict[tuple[str, str], dict[str, Any]]  # what each (model, task) cell depends on
    seed: int


def plan_evaluation(models, tasks, output_dir, *, owners, base, limit, num_fewshot, batch_size, backend,
                    model_args, data_dir, include_path, allow_code_execution, overwrite, resume, device,
                    gen_kwargs, tensor_parallel_size, data_parallel_size, code_timeout, apply_chat_template,
                    bootstrap_iters, seed, log_samples) -> EvaluationPlan:
    """Every check and setting, cheap checks first: models, output, owners and tasks
    (:func:`check_inputs`); the tasks known, allowed and their data present (:func:`prepare_tasks`);
    lm-eval's options, the run's record and what each cell depends on."""
    paths, per_model_args, output_dir, owners, task_names, data_dir, generation_overrides = check_inputs(
        models, tasks, output_dir, owners=owners, base=base, backend=backend, model_args=model_args,
        data_dir=data_dir, overwrite=overwrite, resume=resume, gen_kwargs=gen_kwargs,
        tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size)
    tm, code_tasks, task_files = prepare_tasks(
        task_names, include_path=include_path, allow_code_execution=allow_code_execution,
        data_dir=data_dir, num_fewshot=num_fewshot)
    options = simple_evaluate_options(
        limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, gen_kwargs=generation_overrides,
        allow_code_execution=allow_code_execution, apply_chat_template=apply_chat_template,
        bootstrap_iters=bootstrap_iters, seed=seed, backend=backend, device=device)
    config = run_config(paths, task_names, per_model_args=per_model_args, options=options,
                        generation_overrides=generation_overrides, backend=backend, limit=limit,
                        num_fewshot=num_fewshot, batch_size=batch_size, data_dir=data_dir,
                        include_path=include_path, allow_code_execution=allow_code_execution,
                        code_timeout=code_timeout, owners=owners, base=base, seed=seed, resume=resume,
                        log_samples=log_samples)
    identities = {name: records.model_identity(path, per_model_args[name]) for name, path in paths.items()}
    versions = records.package_versions()
    settings = cell_settings(
        paths, task_names, identities=identities, versions=versions, per_model_args=per_model_args, tm=tm,
        code_tasks=code_tasks, task_files=task_files, backend=backend, limit=limit, num_fewshot=num_fewshot,
        gen_kwargs=generation_overrides, apply_chat_template=apply_chat_template, seed=seed,
        bootstrap_iters=bootstrap_iters, code_timeout=code_timeout, data_dir=data_dir)
    return EvaluationPlan(paths=paths, per_model_args=per_model_args, output_dir=output_dir, owners=owners,
                          base=base, task_names=task_names, backend=backend, data_dir=data_dir, tm=tm,
                          code_tasks=code_tasks, options=options, config=config, identities=identities,
                          versions=versions, settings=settings, seed=seed)


def run_config(paths, task_names, *, per_model_args, options, generation_overrides, backend, limit,
               num_fewshot, batch_size, data_dir, include_path, allow_code_execution, code_timeout, owners,
               base, seed, resume, log_samples) -> dict[str, Any]:
    """results.json's ``config``: the run's settings as given (the summary adds ``seconds`` and
    ``programs_run``)."""
    return {
        "models": {n: str(p) for n, p in paths.items()},
        "tasks": task_names,
        "backend": backend,
        "model_args": clean_json(per_model_args),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "device": options.get("device"),
        "gen_kwargs": clean_json(generation_overrides),
        "data_dir": str(data_dir) if data_dir else None,
        "include_path": (
            [str(p) for p in include_path]
            if isinstance(include_path, (list, tuple))
            else None if include_path is None else str(include_path)
        ),
        "allow_code_execution": bool(allow_code_execution),
        "code_timeout": code_timeout,
        "owners": owners,
        "base": base,
        "seed": seed,
        "resume": bool(resume),
        "log_samples": bool(log_samples),
    }


def check_inputs(models, tasks, output_dir, *, owners, base, backend, model_args, data_dir, overwrite,
                 resume, gen_kwargs, tensor_parallel_size, data_parallel_size):
    """The cheap checks, before lm-eval indexes its tasks: the models and their lm-eval
    ``model_args``, the output directory, the owners and roles against the tasks, ``data_dir``
    and ``gen_kwargs``. Returns ``(paths, per-model args, output dir, owners, task names, data
    dir, generation overrides)``."""
    from mergekit_ace.evaluation import normalise

    extra_args = parse_model_args(model_args)
    paths = check_models(models, backend, extra_args)
    per_model_args = {
        name: build_model_args(
            backend,
            path,
            extra_args,
            tensor_parallel_size=tensor_parallel_size,
            data_parallel_size=data_parallel_size,
        )
        for name, path in paths.items()
    }
    output_dir = Path(output_dir).expanduser().resolve()
    OutputStore.check_target(output_dir, resume, overwrite)
    try:
        if owners is not None and not isinstance(owners, Mapping):
            owners = normalise.load_owners(owners)
        elif owners is not None:
            owners = normalise.parse_owners(owners)
        task_names = expand_tasks([tasks] if isinstance(tasks, str) else tasks)
        if not task_names:
            raise UserError("no tasks given: use --tasks with lm-eval task names or a preset")
        if owners is not None:
            normalise.check_owners(owners, list(paths), task_names)
        normalise.roles(list(paths), owners, base)
    except normalise.TableError as error:
        raise UserError(str(error)) from None
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser().resolve()
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir} is not a directory")
    generation_overrides = parse_gen_kwargs(gen_kwargs)
    return paths, per_model_args, output_dir, owners, task_names, data_dir, generation_overrides


def prepare_tasks(task_names, *, include_path, allow_code_execution, data_dir, num_fewshot):
    """:func:`plan_tasks` (each task known, allowed, its data present), then what some stock tasks
    import offline: SQuAD's metrics (xquad) and NLTK's Punkt model (IFEval). Returns
    ``(task manager, code tasks, {task: data files})``."""
    from mergekit_ace.evaluation import squad_metrics
    from mergekit_ace.evaluation.nltk_data import ensure_punkt_tab

    tm, code_tasks, task_files = plan_tasks(
        task_names, include_path=include_path, allow_code_execution=allow_code_execution,
        data_dir=data_dir, num_fewshot=num_fewshot)
    squad_metrics.install()  # xquad imports SQuAD metrics from where transformers 4 had them
    try:
        ensure_punkt_tab()  # IFEval's sentence splitter, without nltk.download
    except Exception as error:  # only IFEval needs it; lm-eval says so if it is then missing
        log.warning("could not provide NLTK's punkt_tab model: %s", error)
    return tm, code_tasks, task_files


def simple_evaluate_options(*, limit, num_fewshot, batch_size, gen_kwargs, allow_code_execution,
                            apply_chat_template, bootstrap_iters, seed, backend, device) -> dict[str, Any]:
    """The keyword arguments every ``lm_eval.simple_evaluate`` call gets: one ``seed`` for
    python, numpy, torch and the few-shot sampler; ``device`` (None: cuda when available, else
    cpu) except with vLLM, which places the model itself."""
    options: dict[str, Any] = dict(
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        gen_kwargs=gen_kwargs,
        confirm_run_unsafe_code=bool(allow_code_execution),
        apply_chat_template=apply_chat_template,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if backend != "vllm":
        options["device"] = device if device is not None else _default_device()
    return options


def cell_settings(paths, task_names, *, identities, versions, per_model_args, tm, code_tasks, task_files,
                  backend, limit, num_fewshot, gen_kwargs, apply_chat_template, seed, bootstrap_iters,
                  code_timeout, data_dir) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(model, task): settings}``: everything a cell's result depends on (the model's identity,
    the task's config hash, lm-eval's options and version, the data files read); ``--resume``
    keeps a cell only when these are unchanged."""
    settings: dict[tuple[str, str], dict[str, Any]] = {}
    for name in paths:
        for task in task_names:
            settings[(name, task)] = records.normalised({
                "model": identities[name],
                "backend": backend,
                "model_args": per_model_args[name],
                "task": task,
                "task_config_sha256": records.config_sha256(task_config(tm, task)),
                "limit": limit,
                "num_fewshot": num_fewshot,
                "gen_kwargs": gen_kwargs,
                "apply_chat_template": apply_chat_template,
                "seed": seed,
                "bootstrap_iters": bootstrap_iters,
                "code_timeout": code_timeout if task in code_tasks else None,
                "data_dir": str(data_dir) if data_dir else None,
                "data_files": records.data_files_record(task_files[task]),
                "lm_eval": versions.get("lm_eval"),
            })
    return settings


class EvaluationRun:
    """One run over a plan: one model at a time, one cell at a time, each cell written as it
    finishes; the summary rebuilt from the cells on disk."""

    def __init__(self, plan: EvaluationPlan, store: OutputStore, reused: set[tuple[str, str]], *, main: bool,
                 primary_metrics, allow_code_execution: bool, code_timeout: float, log_samples: bool):
        from mergekit_ace.evaluation.code_exec import CodeEvalMetric

        self.plan, self.store, self.reused, self.main = plan, store, reused, main
        self.primary_metrics = primary_metrics
        self.log_samples = log_samples
        self.metric = CodeEvalMetric(allow_code_execution=allow_code_execution, timeout=code_timeout)
        self.served: list[dict[str, Any]] = []  # the data files lm-eval read (from --data-dir)
        self.started = time.time()

    def summarise(self) -> dict[str, Any]:
        """Rebuild results.json, report.md and the charts from the cells on disk; return results.json."""
        plan = self.plan
        plan.config["seconds"] = round(time.time() - self.started, 1)
        plan.config["programs_run"] = self.metric.programs_run
        record = {"versions": plan.versions, "seed": plan.seed, "models": plan.identities}
        return _write_summary(self.store, plan.paths, plan.task_names, plan.settings, self.reused, plan.config,
                              record, owners=plan.owners, base=plan.base, primary_metrics=self.primary_metrics)

    def score_keeping_finished(self) -> None:
        """:meth:`score_all` within the run's adaptations (SIGTERM as Ctrl-C, ``--data-dir``,
        offline ``code_eval``, torch's environment report collected once). Whatever stops it, the
        summary is rebuilt from the finished cells before the error is re-raised."""
        from mergekit_ace.evaluation.code_exec import use_offline_code_eval
        from mergekit_ace.evaluation.data import redirect_datasets

        # a code-execution task, or a group that may hold one
        code_eval = use_offline_code_eval(self.metric) if self.plan.code_tasks else contextlib.nullcontext()
        self.store.open()
        try:
            with sigterm_as_interrupt(), redirect_datasets(self.plan.data_dir, self.served), code_eval, \
                    _environment_collected_once():
                self.score_all()
        except BaseException as error:
            if self.main and self.store.has_cells():
                try:
                    self.summarise()
                except Exception as summary_error:  # never hide why the run stopped
                    log.error("could not rebuild %s: %s", self.plan.output_dir / RESULTS_FILE, summary_error)
                if isinstance(error, KeyboardInterrupt):
                    log.warning("interrupted: the finished cells are in %s; rerun the same command "
                                "with --resume to compute the rest", self.plan.output_dir)
            raise
        finally:
            self.store.close()

    def score_all(self) -> None:
        """Each model's cells that ``--resume`` did not keep."""
        for name in self.plan.paths:
            todo = [t for t in self.plan.task_names if (name, t) not in self.reused]
            if todo:
                self.score_model(name, todo)

    def score_model(self, name: str, todo: Sequence[str]) -> None:
        """Load the model once and score it on each task of ``todo``; a model that fails to load
        fails each of those cells (a :class:`UserError` stops the run); its memory is freed after."""
        plan = self.plan
        log.info("loading %s (%s)", name, plan.paths[name])
        try:
            lm = load_model(plan.backend, plan.per_model_args[name], plan.options)
        except UserError:
            raise
        except Exception as error:
            self.record_load_failure(name, todo, error)
            gc.collect()
            _empty_cuda_cache()
            return
        for task in todo:
            log.info("scoring %s on %s", name, task)
            run_cell(lm, name, task, store=self.store, settings=plan.settings[(name, task)], tm=plan.tm,
                     model_args=plan.per_model_args[name], options=plan.options,
                     log_samples=self.log_samples, served=self.served)
        del lm
        gc.collect()
        _empty_cuda_cache()

    def record_load_failure(self, name: str, todo: Sequence[str], error: Exception) -> None:
        """Each cell of ``todo`` written as failed at the stage ``load model``."""
        for task in todo:
            cell = _failed_cell(name, task, self.plan.settings[(name, task)], error, "load model")
            log.error("failed: %s", failure_line({"model": name, "task": task, **cell["error"]}))
            if self.main:
                self.store.commit_cell(self.store.begin_cell(name, task), cell)


def _plan_resume(store: OutputStore, settings, log_samples: bool) -> set[tuple[str, str]]:
    """The cells of OUT that ``--resume`` keeps: finished, with the same settings (and with
    per-sample logs when ``log_samples``). Says what it keeps and why it recomputes the others."""
    reused: set[tuple[str, str]] = set()
    for (name, task), wanted in settings.items():
        old = store.read_cell(name, task)
        if old is None:
            continue
        changes = records.settings_changes(old.get("settings") or {}, wanted)
        if old.get("status") != "ok":
            log.info("recomputing %s on %s: it failed before (%s)", name, task,
                     (old.get("error") or {}).get("type"))
        elif changes:
            log.info("recomputing %s on %s: settings changed (%s)", name, task, "; ".join(changes))
        elif log_samples and not old.get("samples_logged"):
            log.info("recomputing %s on %s: --log-samples asks for per-sample outputs the earlier "
                     "run did not write", name, task)
        else:
            log.info("skipping %s on %s: done %s with the same settings", name, task, old.get("finished"))
            reused.add((name, task))
    return reused


def _write_summary(store, paths, task_names, settings, reused, config, record, *, owners, base,
                   primary_metrics) -> dict[str, Any]:
    """Rebuild results.json, report.md and the charts from the cells on disk."""
    from mergekit_ace.evaluation import summary

    cells: dict[str, dict[str, dict[str, Any] | None]] = {}
    dirs: dict[tuple[str, str], str] = {}
    for name in paths:
        cells[name] = {}
        for task in task_names:
            cell = store.read_cell(name, task)
            if cell is not None and records.normalised(cell.get("settings") or {}) != settings[(name, task)]:
                cell = None  # computed with other settings: never mixed in
            cells[name][task] = cell
            if cell is not None:
                dirs[(name, task)] = str(store.cell_dir(name, task).relative_to(store.target))
    content, tables = summary.assemble(
        list(paths), task_names, cells, owners=owners, base=base, primary_metrics=primary_metrics,
        config=config, record=record, reused=reused, cell_dirs=dirs,
    )
    summary.write(store.target, content, tables)
    return content


def _default_device() -> str:
    """``cuda`` when torch sees a GPU, else ``cpu`` (lm-eval's hf default is always ``cuda``)."""
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except Exception:  # pragma: no cover
        return "cpu"


def _empty_cuda_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass
