"""Run lm-evaluation-harness on every model and write the tables: :func:`evaluate_models`.

Each model is scored by ``lm_eval.simple_evaluate`` with lm-eval's own ``TaskManager`` (stock task
YAMLs plus an optional ``include_path``) and its ``EvaluationTracker`` (aggregated results and
per-sample logs). Three offline adaptations wrap the run, each leaving the stock tasks unchanged:
``--data-dir`` (:mod:`.data`), HumanEval's ``code_eval`` metric (:mod:`.code_exec`) and NLTK's
Punkt model for IFEval (:mod:`.nltk_data`).

Output directory (written to a temporary sibling and renamed into place at the end)::

    results.json            scores, tables, config, lm-eval's raw results per model
    report.md               raw and normalised tables with averages
    scores_raw.png          grouped bar chart of the raw primary metrics
    scores_normalised.png   grouped bar chart of the normalised scores (with owners)
    lm_eval/<model>/        lm-eval's results_<date>.json and samples_<task>_<date>.jsonl
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import gc
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from mergekit_ace.cli import UserError
from mergekit_ace.evaluation.presets import expand_tasks, metric_keys

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
RESULTS_FILE = "results.json"


# --------------------------------------------------------------------------- argument checks
def parse_model_args(model_args: Union[str, Mapping[str, Any], None]) -> Dict[str, Any]:
    """``"k=v,k2=v2"`` (lm-eval's syntax, values typed by lm-eval) or a dict -> dict."""
    if model_args is None or model_args == "":
        return {}
    if isinstance(model_args, Mapping):
        return dict(model_args)
    from lm_eval.utils import simple_parse_args_string

    try:
        return dict(simple_parse_args_string(str(model_args)))
    except Exception as error:
        raise UserError(f"--model-args {model_args!r} is not of the form key=value,key=value: {error}")


def build_model_args(
    backend: str,
    path: Union[str, Path],
    model_args: Union[str, Mapping[str, Any], None] = None,
    *,
    tensor_parallel_size: Optional[int] = None,
    data_parallel_size: Optional[int] = None,
) -> Dict[str, Any]:
    """The ``model_args`` lm-eval gets for one model.

    ``pretrained`` is the model's path; ``model_args`` is passed through (``dtype``,
    ``parallelize=True`` for the hf backend, ``gpu_memory_utilization`` for vLLM, ...). For
    ``backend="vllm"`` the tensor/data parallel sizes become vLLM's ``tensor_parallel_size`` and
    ``data_parallel_size``; a size given twice with different values is an error.
    """
    args = parse_model_args(model_args)
    if "pretrained" in args:
        raise UserError("--model-args must not set pretrained=...: each --model NAME=PATH gives it")
    out: Dict[str, Any] = {"pretrained": str(path)}
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
    models: Mapping[str, Union[str, Path]], backend: str, model_args: Mapping[str, Any]
) -> Dict[str, Path]:
    """Names are simple and unique; for hf/vllm each path is a model directory with a config and
    a tokenizer (unless ``tokenizer=`` is in ``model_args``), or a Hub id ``owner/name`` that is not a
    local directory (lm-eval loads it from the Hub). Returns absolute paths (Hub ids unchanged)."""
    if not models:
        raise UserError("no models given: use --model NAME=PATH (once per model)")
    out: Dict[str, Path] = {}
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


def check_output_dir(output_dir: Path, overwrite: bool) -> None:
    """Refuse to replace an existing non-empty directory unless ``overwrite``."""
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"--output {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        what = "results" if (output_dir / RESULTS_FILE).exists() else "files"
        raise UserError(
            f"--output {output_dir} already holds {what}; pass --overwrite to replace it"
        )


@functools.lru_cache(maxsize=8)
def _task_manager(include_path: Tuple[str, ...], include_defaults: bool = True):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def task_manager(include_path=None, tasks: Optional[Sequence[str]] = None):
    """lm-eval's ``TaskManager`` for ``tasks``, cached per process.

    Indexing lm-eval's ~15,000 stock tasks takes many seconds, so when every one of ``tasks`` is
    defined under ``include_path`` the manager indexes only ``include_path``; otherwise it indexes
    the stock tasks too (``include_path`` taking precedence, as in lm-eval).
    """
    if include_path is None:
        paths: Tuple[str, ...] = ()
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


def task_config(tm, task: str) -> Optional[Dict[str, Any]]:
    """The task's YAML config (functions unresolved), or None for groups/tags/Python tasks."""
    entry = tm.task_index.get(task)
    if entry is None or entry.cfg is None or "task" not in entry.cfg:
        return None
    return entry.cfg


def _clean_json(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python, unknown objects -> str."""
    from lm_eval.utils import handle_non_serializable

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean_json(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return _clean_json(handle_non_serializable(value))


def extract_scores(results: Mapping[str, Any]) -> Dict[str, Dict[str, float]]:
    """``{task: {"metric,filter": value}}`` from ``simple_evaluate``'s ``results["results"]``."""
    out: Dict[str, Dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        out[task] = {k: float(metrics[k]) for k in metric_keys(metrics)}
    return out


# --------------------------------------------------------------------------- atomic output
def replace_directory(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` directory to ``target``; an old ``target`` is renamed aside
    first and deleted only once the new one is in place (restored if the move fails)."""
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        backup.rmdir()
        os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        if backup is not None:
            os.rename(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


# --------------------------------------------------------------------------- the run
def _run_one(
    name: str,
    backend: str,
    model_args: Dict[str, Any],
    tasks: List[str],
    tm,
    logs_dir: Path,
    options: Dict[str, Any],
):
    """``simple_evaluate`` one model; save lm-eval's results and samples; return the results
    (without samples), or None on a non-main rank (``accelerate launch``)."""
    import lm_eval
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(logs_dir / name / "results.json"))
    try:
        results = lm_eval.simple_evaluate(
            model=backend,
            model_args=model_args,
            tasks=tasks,
            task_manager=tm,
            log_samples=True,
            evaluation_tracker=tracker,
            **options,
        )
    except ImportError as error:
        if backend == "vllm":
            raise UserError(f"--backend vllm needs vLLM: pip install vllm ({error})") from None
        raise
    if results is None:
        return None
    samples = results.pop("samples", {})
    tracker.save_results_aggregated(results=dict(results), samples=samples)
    for task_name in results.get("configs", {}):
        if task_name in samples:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    results.pop("task_hashes", None)
    return results


def evaluate_models(
    models: Mapping[str, Union[str, Path]],
    tasks: Sequence[str],
    output_dir: Union[str, Path],
    *,
    owners: Union[Mapping[str, str], str, Path, None] = None,
    base: Optional[str] = None,
    limit: Union[int, float, None] = None,
    num_fewshot: Optional[int] = None,
    batch_size: Union[int, str] = 1,
    backend: str = "hf",
    model_args: Union[str, Mapping[str, Any], None] = None,
    data_dir: Union[str, Path, None] = None,
    include_path: Union[str, Path, Sequence[Union[str, Path]], None] = None,
    allow_code_execution: bool = False,
    overwrite: bool = False,
    device: Optional[str] = "cpu",
    gen_kwargs: Union[str, Mapping[str, Any], None] = None,
    primary_metrics: Optional[Mapping[str, str]] = None,
    tensor_parallel_size: Optional[int] = None,
    data_parallel_size: Optional[int] = None,
    code_timeout: float = 3.0,
    apply_chat_template: bool = False,
    bootstrap_iters: int = 100000,
    seed: int = 0,
) -> Dict[str, Any]:
    """Score every model on every task with lm-eval and write the report; return results.json.

    Args:
        models: ``{name: model directory}``; names label rows (letters, digits, ``._+-``).
        tasks: lm-eval task/group/tag names or presets (``ace-llama``, ``actmat-olmo``);
            comma-separated strings are split.
        output_dir: the result directory, replaced atomically at the end; an existing non-empty
            one is refused unless ``overwrite``.
        owners: ``{task: owning model}`` (or ``{model: [tasks]}``, or a JSON/YAML file path) for the
            normalised table; every task needs an owner that is one of ``models``.
        base: the base model's name (its role in the report; optional).
        limit, num_fewshot, batch_size, device, gen_kwargs, apply_chat_template, bootstrap_iters:
            passed to ``lm_eval.simple_evaluate``. ``device=None`` means ``cuda`` when available,
            else ``cpu``; it is not passed with vLLM (which places the model itself).
        backend: ``"hf"`` or ``"vllm"`` (any other registered lm-eval model type is passed through
            as is, without the model-directory checks).
        model_args: extra lm-eval model arguments (``"k=v,..."`` or dict) for every model.
        data_dir: read every Hub data set from ``data_dir/<dataset_path>/<name or default>/<split>.jsonl``.
        include_path: directory (or list) of extra lm-eval task YAMLs.
        allow_code_execution: required for tasks that run model-written code (HumanEval).
        primary_metrics: ``{task: "metric,filter"}`` overriding the default primary metrics.
        tensor_parallel_size, data_parallel_size: vLLM parallelism.
        code_timeout: seconds each generated program may run.
        seed: lm-eval's python/numpy/torch/fewshot seeds.

    Returns:
        The content of ``results.json``: ``scores`` (``{model: {task: {metric: value}}}``),
        ``primary_metrics``, ``roles``, ``raw``, ``normalised``, ``averages``, ``config`` and
        ``lm_eval`` (lm-eval's results per model, samples excluded). On a non-main rank of an
        ``accelerate launch`` run nothing is written and ``{}`` is returned.
    """
    from mergekit_ace.evaluation import normalise, report, squad_metrics
    from mergekit_ace.evaluation.code_exec import (
        CodeEvalMetric,
        CodeExecutionNotAllowed,
        use_offline_code_eval,
    )
    from mergekit_ace.evaluation.data import DataFileMissing, check_task_data, redirect_datasets
    from mergekit_ace.evaluation.nltk_data import ensure_punkt_tab

    # ---- cheap checks first: models, output, owners
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
    check_output_dir(output_dir, overwrite)
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

    # ---- tasks: known, allowed, data present
    tm = task_manager(include_path, task_names)
    check_tasks(tm, task_names)
    runs_code = False  # a code-execution task, or a group that may hold one
    for task in task_names:
        cfg = task_config(tm, task)
        runs_code = runs_code or cfg is None or bool(cfg.get("unsafe_code"))
        if cfg and cfg.get("unsafe_code") and not allow_code_execution:
            raise UserError(
                f"task {task!r} runs model-generated code to score it; pass "
                "--allow-code-execution to allow that (each program runs in its own process "
                "with a timeout and no network; see docs/evaluation.md)"
            )
        if cfg and data_dir is not None:
            try:
                check_task_data(task, cfg, data_dir, num_fewshot)
            except DataFileMissing as error:
                raise UserError(str(error)) from None
    squad_metrics.install()  # xquad imports SQuAD metrics from where transformers 4 had them
    try:
        ensure_punkt_tab()  # IFEval's sentence splitter, without nltk.download
    except Exception as error:  # only IFEval needs it; lm-eval says so if it is then missing
        log.warning("could not provide NLTK's punkt_tab model: %s", error)

    options: Dict[str, Any] = dict(
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        gen_kwargs=dict(gen_kwargs) if isinstance(gen_kwargs, Mapping) else gen_kwargs,
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
    config = {
        "models": {n: str(p) for n, p in paths.items()},
        "tasks": task_names,
        "backend": backend,
        "model_args": _clean_json(per_model_args),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": batch_size,
        "device": options.get("device"),
        "gen_kwargs": _clean_json(gen_kwargs),
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
    }

    # ---- run lm-eval per model into a staging directory beside output_dir
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    keep_staging = False
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; results are ordinary files
    try:
        metric = CodeEvalMetric(allow_code_execution=allow_code_execution, timeout=code_timeout)
        raw_results: Dict[str, Any] = {}
        scores: Dict[str, Dict[str, Dict[str, float]]] = {}
        started = time.time()
        code_eval = use_offline_code_eval(metric) if runs_code else contextlib.nullcontext()
        with redirect_datasets(data_dir), code_eval:
            for name in paths:
                log.info("mergekit-ace eval: scoring %s on %s", name, ", ".join(task_names))
                try:
                    results = _run_one(
                        name, backend, per_model_args[name], task_names, tm,
                        staging / "lm_eval", options,
                    )
                except DataFileMissing as error:
                    raise UserError(str(error)) from None
                except CodeExecutionNotAllowed as error:
                    raise UserError(str(error)) from None
                finally:
                    gc.collect()
                    _empty_cuda_cache()
                if results is None:  # not the main process of a distributed run
                    shutil.rmtree(staging, ignore_errors=True)
                    return {}
                raw_results[name] = _clean_json(results)
                scores[name] = extract_scores(results)
        try:
            tables = normalise.build_tables(scores, task_names, owners, base, primary_metrics)
        except normalise.TableError as error:
            raise UserError(str(error)) from None
        config["seconds"] = round(time.time() - started, 1)
        config["programs_run"] = metric.programs_run
        content = {
            "scores": scores,
            "tasks": task_names,
            "primary_metrics": tables["primary_metrics"],
            "roles": tables["roles"],
            "raw": tables["raw"],
            "normalised": tables["normalised"],
            "averages": tables["averages"],
            "owners": tables["owners"],
            "base": base,
            "config": config,
            "lm_eval": raw_results,
        }
        content = _clean_json(content)
        (staging / RESULTS_FILE).write_text(
            json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8"
        )
        report.write_report(staging, tables, config, _lm_eval_tables(raw_results))
        if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
            keep_staging = True  # someone filled output_dir meanwhile: keep both, tell the user
            raise UserError(f"--output {output_dir} was filled while evaluating; "
                            f"the new results are in {staging}")
        replace_directory(staging, output_dir)
    except BaseException:
        if staging.exists() and not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return content


def _lm_eval_tables(raw_results: Mapping[str, Any]) -> Dict[str, str]:
    """lm-eval's own markdown table of all metrics, per model."""
    try:
        from lm_eval.utils import make_table
    except ImportError:  # pragma: no cover
        return {}
    out = {}
    for name, results in raw_results.items():
        try:
            out[name] = make_table(results)
        except Exception as error:  # a cosmetic section; never fail the run for it
            log.warning("could not render lm-eval's table for %s: %s", name, error)
    return out


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
