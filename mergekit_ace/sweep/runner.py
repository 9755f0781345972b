"""``mergekit-ace sweep``: merge one mergekit config over a grid of method parameters, score each
merge with the package's lm-eval wrapper, and pick the best parameters.

Each *grid point* (one value per ``--grid`` key) is a cell of the sweep: the config with the point's
values in its global ``parameters:`` block is merged with ``mergekit-yaml`` (a subprocess, exactly
as the user would run it) and scored with :func:`mergekit_ace.evaluation.evaluate_models`. The
output directory::

    OUT/
      table.md, table.csv, sweep.json, chart.png   rebuilt from the points at the end of every run
      best.yml                     the original config with the winning values, for mergekit-yaml
      reference/                   base and experts scored once (an ``evaluate_models`` output,
                                   reused with its own ``--resume`` machinery on every rerun)
      points/<key>/config.yml      the point's mergekit config
      points/<key>/merge.log       mergekit-yaml's output
      points/<key>/merge/          the merged model: only while it is scored, or with --keep-merges
      points/<key>/eval/           the point's ``evaluate_models`` output (per-task cells)
      points/<key>/point.json      written last, atomically: status, scores, timings

``<key>`` hashes what a point's result depends on: the merge config with the point applied, the
identity of every local model it reads (config hash and a fingerprint of its files, as the
evaluation store records them), the extra ``mergekit-yaml`` options, mergekit's version and the
scoring settings (tasks, their lm-eval configs, limit, few-shot, seed, generation, data files,
lm-eval's version, ...). A point whose ``point.json`` says ``ok`` is never recomputed; change any
of those and the point gets a new key and is computed afresh. ``--cuda`` is not part of the key.

A merge is written into a temporary directory beside its place and renamed into place only when
``mergekit-yaml`` succeeded, so ``merge/`` is complete or absent; one merge is on disk at a time
unless ``keep_merges``. An interrupt (Ctrl-C, SIGTERM) kills a running ``mergekit-yaml``, removes
its partial output, keeps every finished point (and a finished merge whose scoring was cut short,
with its finished task cells, which the next run continues), rebuilds the tables and re-raises.

This module runs the sweep (:func:`run_sweep`, a list of steps); the grid and the config are
:mod:`mergekit_ace.sweep.grid`'s, the tables, chart and ``best.yml`` :mod:`mergekit_ace.sweep.report`'s.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergekit_ace.errors import UserError
from mergekit_ace.sweep.grid import (
    apply_point,
    check_grid,
    grid_points,
    load_config,
    method_spec,
    parse_grid,
    point_label,
    reference_models,
    validate_config,
)
from mergekit_ace.sweep.layout import (
    MERGE_DIR,
    MERGE_MODEL_NAME,
    MERGE_TMP,
    POINT_FILE,
    POINTS_DIR,
    REFERENCE_DIR,
    SWEEP_FILE,
    remove,
)
from mergekit_ace.sweep.report import metric_label, resolve_metric, write_outputs

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- keys
def _digest(content: Any) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _model_identities(models: Mapping[str, str]) -> dict[str, Any]:
    from mergekit_ace.evaluation import record

    return {name: record.model_identity(Path(path).expanduser(), {}) for name, path in models.items()}


def scoring_key(task_names, tm, code_tasks, task_files, scoring: Mapping[str, Any]) -> dict[str, Any]:
    """What a point's scores depend on besides the merge (mirrors the evaluation store's cell
    settings without the model)."""
    from mergekit_ace.evaluation import record
    from mergekit_ace.evaluation.runner import parse_gen_kwargs, parse_model_args, task_config

    return record.normalised({
        "tasks": list(task_names),
        "task_config_sha256": {t: record.config_sha256(task_config(tm, t)) for t in task_names},
        "backend": scoring.get("backend", "hf"),
        "model_args": parse_model_args(scoring.get("model_args")),
        "limit": scoring.get("limit"),
        "num_fewshot": scoring.get("num_fewshot"),
        "gen_kwargs": parse_gen_kwargs(scoring.get("gen_kwargs")),
        "apply_chat_template": bool(scoring.get("apply_chat_template")),
        "seed": scoring.get("seed", 0),
        "bootstrap_iters": scoring.get("bootstrap_iters", 100000),
        "code_timeout": scoring.get("code_timeout", 3.0) if code_tasks else None,
        "data_dir": str(scoring["data_dir"]) if scoring.get("data_dir") else None,
        "data_files": {t: record.data_files_record(task_files[t]) for t in task_names},
        "lm_eval": record.package_versions().get("lm_eval"),
    })



# --------------------------------------------------------------------------- merging
class MergeFailed(RuntimeError):
    """mergekit-yaml did not produce a model."""


def merge_with_mergekit_yaml(config_file: Path, out_path: Path, log_file: Path, *, cuda: bool = False,
                             extra_args: Sequence[str] = ()) -> float:
    """Run ``mergekit-yaml CONFIG OUT`` (the one beside this interpreter), its output into
    ``log_file``; return its wall time. A failure raises :class:`MergeFailed` with the log's tail.
    An interrupt kills the process and propagates."""
    from mergekit_ace.execution.mergekit_yaml import mergekit_yaml_command, run_mergekit_yaml, subprocess_env

    command = mergekit_yaml_command(config_file, out_path, [*extra_args, *(["--cuda"] if cuda else [])])
    proc, seconds = run_mergekit_yaml(command, env=subprocess_env(), log_file=log_file)
    if proc.returncode != 0 or not (Path(out_path) / "config.json").is_file():
        lines = Path(log_file).read_text(encoding="utf-8", errors="replace").strip().splitlines()
        tail = " | ".join(line.strip() for line in lines[-6:] if line.strip())
        raise MergeFailed(f"mergekit-yaml exited with {proc.returncode}: {tail[-600:]}")
    return seconds


# --------------------------------------------------------------------------- the sweep
@dataclass
class SweepPlan:
    """Everything a sweep run needs, checked before anything runs (see :func:`plan_sweep`)."""

    config_path: Path
    output: Path
    config: dict[str, Any]  # the mergekit config as written
    spec: Any  # the merge method's declared spec
    grid: dict[str, list[Any]]
    points: list[dict[str, Any]]
    configs: list[dict[str, Any]]  # the config with each point applied
    merge_config: Any  # the first of them, validated by mergekit
    task_names: list[str]
    scoring: dict[str, Any]  # evaluate_models options
    ref_models: dict[str, str]
    base: str | None
    owners: dict[str, str] | None
    references: bool
    metric: str
    keep_merges: bool
    cuda: bool
    merge_args: list[str]
    eval_key: dict[str, Any] = field(default_factory=dict)
    keys: list[str] = field(default_factory=list)


def run_sweep(
    config_path: str | Path,
    grid: Sequence[str] | Mapping[str, Sequence[Any]],
    tasks: str | Sequence[str],
    output_dir: str | Path,
    *,
    owners: str | Path | Mapping[str, Any] | None = None,
    references: bool = False,
    metric: str = "auto",
    keep_merges: bool = False,
    cuda: bool = False,
    merge_args: Sequence[str] = (),
    **scoring: Any,
) -> dict[str, Any]:
    """Merge ``config_path`` at every grid point, score each merge, write the tables, the chart
    and ``best.yml``; return the content of ``sweep.json``.

    Args:
        grid: ``["NAME=V1,V2", ...]`` or ``{NAME: [V1, V2]}``; each name must be a parameter of the
            config's merge method. Values go into the global ``parameters:`` block and replace the
            same parameter in any per-model/per-slice block (see :func:`apply_point`).
        tasks: lm-eval task names or presets.
        owners: ``{task: model}`` or a file; the models are the config's, named ``base`` and
            after their directories (or given as written in the config). Scores base and
            experts once (``OUT/reference``) and enables the normalised metric.
        references: score base and experts even without owners (for the table).
        metric: ``auto`` (normalised mean over tasks with owners, else the raw mean),
            ``normalised``, ``raw``, or a task name (that task's primary metric). Higher is better.
        keep_merges: keep every merged model (``points/<key>/merge``); else one at a time.
        cuda, merge_args: passed to ``mergekit-yaml`` (``--cuda``; e.g. ``["--lazy-unpickle"]``).
        scoring: ``evaluate_models`` options (limit, num_fewshot, batch_size, device, include_path,
            data_dir, primary_metrics, seed, ...).
    """
    started = time.time()
    plan = plan_sweep(config_path, grid, tasks, output_dir, owners=owners, references=references,
                      metric=metric, keep_merges=keep_merges, cuda=cuda, merge_args=merge_args,
                      scoring=scoring)
    prepare_output(plan)
    state: dict[str, Any] = {"merged": 0, "scored": 0, "reused": 0, "references": None}
    records: list[dict[str, Any] | None] = [None] * len(plan.points)
    run_points_keeping_finished(plan, records, state, started)
    return write_outputs(plan, records, state, started)


def plan_sweep(config_path, grid, tasks, output_dir, *, owners, references, metric, keep_merges, cuda,
               merge_args, scoring: dict[str, Any]) -> SweepPlan:
    """Check everything before anything runs, in this order: the config and the grid, the tasks,
    the references and owners, the metric, the output directory; then the points' keys."""
    config_path = Path(config_path).expanduser().resolve()
    output = Path(output_dir).expanduser().resolve()
    config, spec, grid, points, configs, merge_config = plan_grid(config_path, grid)
    task_names, tm, code_tasks, task_files = plan_scoring(tasks, scoring)
    ref_models, base, owners, references = plan_references(merge_config, owners, references, task_names,
                                                           scoring)
    metric = resolve_metric(metric, owners is not None, task_names)
    check_output(output)
    plan = SweepPlan(config_path=config_path, output=output, config=config, spec=spec, grid=grid,
                     points=points, configs=configs, merge_config=merge_config, task_names=task_names,
                     scoring=scoring, ref_models=ref_models, base=base, owners=owners,
                     references=references, metric=metric, keep_merges=keep_merges, cuda=cuda,
                     merge_args=list(merge_args))
    plan.eval_key, plan.keys = point_keys(plan, tm, code_tasks, task_files)
    return plan


def plan_grid(config_path: Path, grid) -> tuple[dict[str, Any], Any, dict[str, list[Any]],
                                                 list[dict[str, Any]], list[dict[str, Any]], Any]:
    """The config, its method's spec, the checked grid, its points and the config with each point
    applied (each validated by mergekit); warns where the grid replaces per-model settings.
    Returns ``(config, spec, grid, points, configs, first config validated)``."""
    config = load_config(config_path)
    spec = method_spec(str(config["merge_method"]))
    grid = dict(grid) if isinstance(grid, Mapping) else parse_grid(grid)
    check_grid(grid, spec)
    points = grid_points(grid)
    configs: list[dict[str, Any]] = []
    checked = []
    for point in points:
        applied, removed = apply_point(config, point)  # the same places for every point
        checked.append(validate_config(applied, point_label(point)))
        configs.append(applied)
    if removed:
        log.warning("the grid's values replace the per-model settings at %s (the whole merge uses "
                    "the grid's value)", ", ".join(removed))
    return config, spec, grid, points, configs, checked[0]


def plan_scoring(tasks, scoring: dict[str, Any]) -> tuple[list[str], Any, Any, dict[str, Any]]:
    """The task names (presets expanded), each known to lm-eval with its data present; resolves
    ``scoring["data_dir"]``. Returns ``(task names, task manager, code tasks, {task: data files})``."""
    from mergekit_ace.evaluation.presets import expand_tasks
    from mergekit_ace.evaluation.runner import plan_tasks

    task_names = expand_tasks([tasks] if isinstance(tasks, str) else list(tasks))
    if not task_names:
        raise UserError("no tasks given: use --tasks with lm-eval task names or a preset")
    data_dir = scoring.get("data_dir")
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser().resolve()
        if not data_dir.is_dir():
            raise UserError(f"--data-dir {data_dir} is not a directory")
        scoring["data_dir"] = data_dir
    tm, code_tasks, task_files = plan_tasks(
        task_names, include_path=scoring.get("include_path"),
        allow_code_execution=bool(scoring.get("allow_code_execution")), data_dir=data_dir,
        num_fewshot=scoring.get("num_fewshot"))
    return task_names, tm, code_tasks, task_files


def plan_references(merge_config, owners, references: bool, task_names: Sequence[str],
                    scoring: Mapping[str, Any]):
    """The config's models named for the tables (``base``, the experts' directory names), the
    owners mapped onto those names (owners imply scoring the references), and the reference models
    checked when they are to be scored. Returns ``(models, base name, owners, references)``."""
    from mergekit_ace.evaluation import normalise
    from mergekit_ace.evaluation.runner import check_models

    ref_models, base, aliases = reference_models(merge_config)
    if owners is not None:
        try:
            raw_owners = normalise.load_owners(owners) if not isinstance(owners, Mapping) \
                else normalise.parse_owners(owners)
            owners = {t: aliases.get(m, m) for t, m in raw_owners.items()}
            normalise.check_owners(owners, list(ref_models), task_names)
        except normalise.TableError as error:
            raise UserError(f"{error} (the config's models are named "
                            f"{', '.join(f'{n}={p}' for n, p in ref_models.items())})") from None
        references = True
    if references:
        check_models(ref_models, scoring.get("backend", "hf"), {})
    return ref_models, base, owners, references


def check_output(output: Path) -> None:
    """The output is absent, empty, or an earlier sweep's directory."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (
            (output / SWEEP_FILE).exists() or (output / POINTS_DIR).is_dir()):
        raise UserError(f"--output {output} holds files that are not a sweep's; choose another directory")


def point_keys(plan: SweepPlan, tm, code_tasks, task_files) -> tuple[dict[str, Any], list[str]]:
    """The scoring settings and each point's key: a hash of the point's config, the identities of
    the models it reads, the mergekit-yaml options, mergekit's version and the scoring settings."""
    from importlib import metadata

    eval_key = scoring_key(plan.task_names, tm, code_tasks, task_files, plan.scoring)
    local_models = {str(r): r.model.path for r in plan.merge_config.referenced_models()}
    model_ids = _model_identities(local_models)
    merge_key_base = {"models": model_ids, "merge_args": plan.merge_args,
                      "mergekit": metadata.version("mergekit"), "scoring": eval_key}
    return eval_key, [_digest({"config": c, **merge_key_base})[:16] for c in plan.configs]


def prepare_output(plan: SweepPlan) -> None:
    """Create ``OUT/points`` and remove what a killed run left half-written there."""
    plan.output.mkdir(parents=True, exist_ok=True)
    points_dir = plan.output / POINTS_DIR
    points_dir.mkdir(exist_ok=True)
    _remove_leftovers(points_dir)
    log.info("%d grid points of %s; scoring on %s; best by %s", len(plan.points), plan.spec.name,
             ", ".join(plan.task_names), metric_label(plan.metric))


def run_points_keeping_finished(plan: SweepPlan, records: list[dict[str, Any] | None],
                                state: dict[str, Any], started: float) -> None:
    """:func:`run_points` (SIGTERM stops it as Ctrl-C does); whatever stops it, the tables are
    rebuilt from what finished before the error is re-raised."""
    from mergekit_ace.evaluation.runner import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            run_points(plan, records, state)
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            log.warning("interrupted: the finished points are in %s; rerun the same command to "
                        "compute the rest", plan.output)
        if any(r is not None for r in records) or state["references"] is not None:
            try:
                write_outputs(plan, records, state, started)
            except Exception as summary_error:  # never hide why the run stopped
                log.error("could not rebuild the sweep's tables: %s", summary_error)
        raise


def run_points(plan: SweepPlan, records: list[dict[str, Any] | None], state: dict[str, Any]) -> None:
    """Score the references (when asked), then each point not already done: ``records[i]`` is
    point i's record as soon as it is known."""
    points_dir = plan.output / POINTS_DIR
    if plan.references:
        state["references"] = score_references(plan.ref_models, plan.base, plan.owners, plan.task_names,
                                               plan.output / REFERENCE_DIR, plan.scoring)
    for i, (point, applied, key) in enumerate(zip(plan.points, plan.configs, plan.keys)):
        where = f"point {i + 1}/{len(plan.points)} ({point_label(point)})"
        done = read_point(points_dir / key)
        if done is not None and done.get("status") == "ok":
            log.info("%s: done %s with the same config and settings; skipped", where, done.get("finished"))
            records[i] = done
            state["reused"] += 1
            continue
        if done is not None:
            log.info("%s: failed before (%s); retrying", where, done.get("error", {}).get("stage"))
        records[i] = run_point(points_dir / key, point, applied, plan.task_names, plan.scoring,
                               keep_merges=plan.keep_merges, cuda=plan.cuda, merge_args=plan.merge_args,
                               where=where, state=state)
        if not plan.keep_merges:
            remove(points_dir / key / MERGE_DIR)

def _remove_leftovers(points_dir: Path) -> None:
    """Partial merges and temporaries of a killed run."""
    for path in list(points_dir.glob(f"*/{MERGE_TMP}*")) + list(points_dir.glob("*/.*.tmp-*")):
        log.info("removing %s, left by an interrupted run", path)
        remove(path)


def read_point(directory: Path) -> dict[str, Any] | None:
    path = directory / POINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("ignoring %s: %s", path, error)
        return None


def score_references(models, base, owners, task_names, directory: Path, scoring) -> dict[str, Any]:
    """Base and experts scored into ``OUT/reference`` (kept across runs by evaluate_models'
    resume: a cell is recomputed only when its model or settings changed)."""
    from mergekit_ace.evaluation.runner import evaluate_models
    from mergekit_ace.evaluation.summary import failure_line

    log.info("scoring the references (%s)", ", ".join(models))
    resume = directory.is_dir() and any(directory.iterdir())
    content = evaluate_models(dict(models), task_names, directory, owners=owners, base=base,
                              resume=resume, **scoring)
    if content["failures"]:
        raise UserError("scoring the references failed: " + "; ".join(
            failure_line(f) for f in content["failures"]) + f" (results in {directory})")
    return content


def run_point(directory: Path, point, applied, task_names, scoring, *, keep_merges, cuda,
              merge_args, where, state) -> dict[str, Any]:
    """Merge (unless a finished merge of this point is on disk) and score one grid point; write
    ``point.json``. Returns the point's record."""
    from mergekit_ace.evaluation.store import write_atomic, write_json_atomic

    directory.mkdir(parents=True, exist_ok=True)
    config_file = write_atomic(directory / "config.yml", yaml.safe_dump(applied, sort_keys=False))
    record: dict[str, Any] = {"point": dict(point), "label": point_label(point), "config": applied,
                              "started": _now()}
    try:
        record["merge_seconds"] = merge_point(directory, config_file, where, keep_merges=keep_merges,
                                              cuda=cuda, merge_args=merge_args, state=state)
    except MergeFailed as error:
        log.error("%s: merge failed: %s", where, error)
        record.update(status="failed", finished=_now(),
                      error={"stage": "merge", "type": "MergeFailed", "message": str(error)})
        write_json_atomic(directory / POINT_FILE, record)
        return record
    score_point(directory, task_names, scoring, where, record, state)
    write_json_atomic(directory / POINT_FILE, record)
    return record


def merge_point(directory: Path, config_file: Path, where: str, *, keep_merges: bool, cuda: bool,
                merge_args: Sequence[str], state: dict[str, Any]) -> float | None:
    """The point's merge in ``directory/merge``: a finished one an interrupted run left is used
    (None seconds); else mergekit-yaml writes into a temporary directory renamed into place only
    on success (without ``keep_merges`` other points' merges are removed first). Returns the
    merge's seconds; a failed merge raises :class:`MergeFailed` and leaves no partial output."""
    from mergekit_ace.evaluation.store import replace_directory

    merged = directory / MERGE_DIR
    if merged.is_dir() and (merged / "config.json").is_file():
        log.info("%s: using the finished merge an interrupted run left in %s", where, merged)
        return None
    if not keep_merges:  # one merge on disk at a time
        for other in directory.parent.glob(f"*/{MERGE_DIR}"):
            log.info("removing %s (one merge on disk at a time; --keep-merges keeps them)", other)
            remove(other)
    staging = Path(tempfile.mkdtemp(prefix=MERGE_TMP, dir=directory))
    staging.rmdir()
    log.info("%s: merging with mergekit-yaml (log: %s)", where, directory / "merge.log")
    try:
        seconds = merge_with_mergekit_yaml(config_file, staging, directory / "merge.log",
                                           cuda=cuda, extra_args=merge_args)
        replace_directory(staging, merged)
    except BaseException:
        remove(staging)
        raise
    state["merged"] += 1
    return seconds


def score_point(directory: Path, task_names, scoring, where: str, record: dict[str, Any],
                state: dict[str, Any]) -> None:
    """Score ``directory/merge`` into ``directory/eval`` (continuing an interrupted scoring's
    finished cells); put the scores, timings and status into ``record``."""
    from mergekit_ace.evaluation.runner import evaluate_models
    from mergekit_ace.evaluation.summary import failure_line

    log.info("%s: scoring", where)
    eval_dir = directory / "eval"
    clock = time.time()
    content = evaluate_models({MERGE_MODEL_NAME: str(directory / MERGE_DIR)}, task_names, eval_dir,
                              resume=eval_dir.is_dir() and any(eval_dir.iterdir()), **scoring)
    state["scored"] += 1
    record["score_seconds"] = round(time.time() - clock, 1)
    record["scores"] = content["scores"][MERGE_MODEL_NAME]
    record["finished"] = _now()
    if content["failures"]:
        lines = [failure_line(f) for f in content["failures"]]
        log.error("%s: scoring failed: %s", where, "; ".join(lines))
        record.update(status="failed", error={"stage": "score", "type": "ScoringFailed",
                                              "message": "; ".join(lines)})
    else:
        record["status"] = "ok"


def _now() -> str:
    import datetime

    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")
