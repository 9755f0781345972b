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
"""

from __future__ import annotations

import contextlib
import copy
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from mergekit_ace.errors import UserError

log = logging.getLogger(__name__)

POINTS_DIR = "points"
REFERENCE_DIR = "reference"
POINT_FILE = "point.json"
SWEEP_FILE = "sweep.json"
BEST_FILE = "best.yml"
MERGE_DIR = "merge"
MERGE_TMP = ".merge.tmp-"
MERGE_MODEL_NAME = "merge"
BASE_NAME = "base"
METRIC_CHOICES = ("auto", "normalised", "raw")
_NAME_RE = re.compile(r"[^A-Za-z0-9._+-]+")


# --------------------------------------------------------------------------- the grid
class _ScalarLoader(yaml.SafeLoader):
    """YAML's safe loader with YAML 1.2's floats and booleans: ``1e-5`` is a number, as a user
    means it (PyYAML's YAML 1.1 rules read a float without a dot as a string), and only
    ``true``/``false`` are booleans (YAML 1.1 also reads ``on``, ``off``, ``yes``, ``no`` so)."""


_ScalarLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ScalarLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ScalarLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_value(text: str) -> Any:
    """One grid value as a YAML scalar: ``1e-5`` -> 1e-05, ``3`` -> 3, ``true`` -> True,
    ``add`` -> ``"add"``."""
    try:
        value = yaml.load(text, Loader=_ScalarLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"--grid value {text!r} is not a YAML scalar ({problem})") from None
    if value is None or isinstance(value, (list, dict)):
        raise UserError(f"--grid value {text!r} must be a number, string or boolean")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"--grid value {text!r} is not finite")
    return value


def parse_grid(items: Sequence[str]) -> Dict[str, List[Any]]:
    """``["epsilon=1e-5,1e-3", "tau=0.3"]`` -> ``{"epsilon": [1e-05, 0.001], "tau": [0.3]}``."""
    grid: Dict[str, List[Any]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise UserError(f"--grid {item!r}: expected NAME=VALUE[,VALUE...], e.g. epsilon=1e-5,1e-3")
        if key in grid:
            raise UserError(f"--grid {key!r} is given twice; list all its values in one --grid")
        parsed = [parse_value(v.strip()) for v in values.split(",")]
        seen: List[Any] = []
        for v in parsed:
            if any(type(v) is type(s) and v == s for s in seen):
                raise UserError(f"--grid {key!r}: value {format_value(v)} is given twice")
            seen.append(v)
        grid[key] = parsed
    if not grid:
        raise UserError("no grid given: use --grid NAME=VALUE[,VALUE...] (repeat for each parameter)")
    return grid


def grid_points(grid: Mapping[str, Sequence[Any]]) -> List[Dict[str, Any]]:
    """Every combination, the last key varying fastest (``itertools.product`` order)."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def point_label(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={format_value(v)}" for k, v in point.items())


# --------------------------------------------------------------------------- the config
def load_config(path: Path) -> Dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} does not exist")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise UserError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(config, dict) or not config.get("merge_method"):
        raise UserError(f"config {path} is not a mergekit config (no merge_method)")
    return config


def method_spec(name: str):
    """The merge method's declared spec from mergekit's registry (this package's methods
    registered first)."""
    import mergekit.merge_methods as registry

    from mergekit_ace import register_methods

    register_methods()
    try:
        return registry.get(name).spec
    except RuntimeError:
        known = sorted(m.spec.name for m in registry.registered_methods())
        raise UserError(f"unknown merge_method {name!r}; mergekit knows {', '.join(known)}") from None


def check_grid(grid: Mapping[str, Sequence[Any]], spec) -> None:
    """Every key is a parameter the method declares, every value has the declared type."""
    declared = {p.name: p for p in spec.parameters}
    for key, values in grid.items():
        if key not in declared:
            names = ", ".join(sorted(declared)) or "none"
            raise UserError(f"--grid {key!r} is not a parameter of merge method {spec.name!r} "
                            f"(its parameters: {names})")
        for value in values:
            try:
                declared[key].validate(value)
            except Exception as error:
                first = str(error).strip().splitlines()
                reason = first[-1].strip() if first else type(error).__name__
                raise UserError(f"--grid {key}={format_value(value)}: not a valid value for "
                                f"{spec.name}'s {key!r} ({reason})") from None


def apply_point(config: Mapping[str, Any], point: Mapping[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """The config with each of the point's values in the global ``parameters:`` block, replacing
    whatever was there (a scalar or a filtered list), and removed from every per-model, per-slice
    or per-module ``parameters:`` block, so that the whole merge uses the grid's value. Returns the
    new config and the places a value was removed from (``models[0].parameters.epsilon``)."""
    out = copy.deepcopy(dict(config))
    removed: List[str] = []

    def strip(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in list(node.items()):
                if key == "parameters" and isinstance(value, dict):
                    for name in point:
                        if name in value:
                            removed.append(f"{where}.parameters.{name}")
                            del value[name]
                    if not value:
                        del node[key]
                else:
                    strip(value, f"{where}.{key}" if where else str(key))
        elif isinstance(node, list):
            for i, item in enumerate(node):
                strip(item, f"{where}[{i}]")

    for key, value in out.items():
        if key != "parameters":
            strip(value, str(key))
    parameters = dict(out.get("parameters") or {})
    parameters.update(point)
    out["parameters"] = parameters
    return out, removed


def validate_config(config: Mapping[str, Any], label: str):
    from mergekit.config import MergeConfiguration

    try:
        return MergeConfiguration.model_validate(copy.deepcopy(dict(config)))
    except Exception as error:
        message = " ".join(str(error).split())
        raise UserError(f"the config with {label} is not a valid mergekit config: {message[:400]}") from None


def reference_models(merge_config) -> Tuple[Dict[str, str], Optional[str], Dict[str, str]]:
    """``({name: path}, base name, {path as written: name})`` for the models the config merges:
    the base is ``base``, each other model is named after its directory (``expert-math``)."""
    models: Dict[str, str] = {}
    aliases: Dict[str, str] = {}
    base = None
    refs = list(merge_config.referenced_models())
    ordered = ([merge_config.base_model] if merge_config.base_model else []) + sorted(
        (r for r in refs if r != merge_config.base_model), key=str)
    for ref in ordered:
        if ref.lora is not None:
            raise UserError(f"model {ref} has a LoRA adapter; scoring the references needs plain models")
        path = ref.model.path
        if ref == merge_config.base_model:
            name = BASE_NAME
            base = name
        else:
            stem = _NAME_RE.sub("_", Path(path.rstrip("/")).name).strip("._") or "expert"
            name, n = stem, 2
            while name in models or name == BASE_NAME:
                name, n = f"{stem}-{n}", n + 1
        models[name] = path
        aliases[str(ref)] = name
        aliases[path] = name
    return models, base, aliases


# --------------------------------------------------------------------------- keys
def _digest(content: Any) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def _model_identities(models: Mapping[str, str]) -> Dict[str, Any]:
    from mergekit_ace.evaluation import record

    return {name: record.model_identity(Path(path).expanduser(), {}) for name, path in models.items()}


def scoring_key(task_names, tm, code_tasks, task_files, scoring: Mapping[str, Any]) -> Dict[str, Any]:
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
def run_mergekit_yaml(config_file: Path, out_path: Path, log_file: Path, *, cuda: bool = False,
                      extra_args: Sequence[str] = ()) -> float:
    """Run ``mergekit-yaml CONFIG OUT`` (the one beside this interpreter), its output into
    ``log_file``; return its wall time. A failure raises :class:`MergeFailed` with the log's tail.
    An interrupt kills the process (``subprocess.run`` does) and propagates."""
    from mergekit_ace.demo.merges import _subprocess_env, mergekit_yaml_executable

    cmd = [mergekit_yaml_executable(), str(config_file), str(out_path), *extra_args]
    if cuda:
        cmd.append("--cuda")
    start = time.time()
    with open(log_file, "w", encoding="utf-8") as handle:
        handle.write("$ " + " ".join(cmd) + "\n")
        handle.flush()
        proc = subprocess.run(cmd, env=_subprocess_env(), stdout=handle, stderr=subprocess.STDOUT)
    seconds = time.time() - start
    if proc.returncode != 0 or not (Path(out_path) / "config.json").is_file():
        lines = Path(log_file).read_text(encoding="utf-8", errors="replace").strip().splitlines()
        tail = " | ".join(line.strip() for line in lines[-6:] if line.strip())
        raise MergeFailed(f"mergekit-yaml exited with {proc.returncode}: {tail[-600:]}")
    return seconds


class MergeFailed(RuntimeError):
    """mergekit-yaml did not produce a model."""


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# --------------------------------------------------------------------------- the sweep
def run_sweep(
    config_path: "str | Path",
    grid: "Sequence[str] | Mapping[str, Sequence[Any]]",
    tasks: "str | Sequence[str]",
    output_dir: "str | Path",
    *,
    owners: "str | Path | Mapping[str, Any] | None" = None,
    references: bool = False,
    metric: str = "auto",
    keep_merges: bool = False,
    cuda: bool = False,
    merge_args: Sequence[str] = (),
    **scoring: Any,
) -> Dict[str, Any]:
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
    from mergekit_ace.evaluation import normalise
    from mergekit_ace.evaluation.presets import expand_tasks
    from mergekit_ace.evaluation.runner import _sigterm_as_interrupt, check_models, plan_tasks

    started = time.time()
    config_path = Path(config_path).expanduser().resolve()
    output = Path(output_dir).expanduser().resolve()
    config = load_config(config_path)
    spec = method_spec(str(config["merge_method"]))
    grid = dict(grid) if isinstance(grid, Mapping) else parse_grid(grid)
    check_grid(grid, spec)
    points = grid_points(grid)
    configs: List[Dict[str, Any]] = []
    checked = []
    for point in points:
        applied, removed = apply_point(config, point)  # the same places for every point
        checked.append(validate_config(applied, point_label(point)))
        configs.append(applied)
    merge_config = checked[0]
    if removed:
        log.warning("the grid's values replace the per-model settings at %s (the whole merge uses "
                    "the grid's value)", ", ".join(removed))
    merge_args = list(merge_args)

    # ---- tasks, references, owners, metric: all checked before anything runs
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
    metric = resolve_metric(metric, owners is not None, task_names)

    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not (
            (output / SWEEP_FILE).exists() or (output / POINTS_DIR).is_dir()):
        raise UserError(f"--output {output} holds files that are not a sweep's; choose another directory")

    # ---- keys
    from importlib import metadata

    eval_key = scoring_key(task_names, tm, code_tasks, task_files, scoring)
    local_models = {str(r): r.model.path for r in merge_config.referenced_models()}
    model_ids = _model_identities(local_models)
    merge_key_base = {"models": model_ids, "merge_args": merge_args,
                      "mergekit": metadata.version("mergekit"), "scoring": eval_key}
    keys = [_digest({"config": c, **merge_key_base})[:16] for c in configs]

    output.mkdir(parents=True, exist_ok=True)
    points_dir = output / POINTS_DIR
    points_dir.mkdir(exist_ok=True)
    _remove_leftovers(points_dir)
    log.info("%d grid points of %s; scoring on %s; best by %s", len(points), spec.name,
             ", ".join(task_names), metric_label(metric))

    state: Dict[str, Any] = {"merged": 0, "scored": 0, "reused": 0, "references": None}
    records_: List[Optional[Dict[str, Any]]] = [None] * len(points)

    def summarise() -> Dict[str, Any]:
        return write_outputs(
            output, config_path, config, spec.name, grid, points, keys, configs, records_,
            state["references"], ref_models, base, owners, task_names, metric,
            scoring.get("primary_metrics"), eval_key, started, state)

    try:
        with _sigterm_as_interrupt():
            if references:
                state["references"] = score_references(ref_models, base, owners, task_names,
                                                       output / REFERENCE_DIR, scoring)
            for i, (point, applied, key) in enumerate(zip(points, configs, keys)):
                where = f"point {i + 1}/{len(points)} ({point_label(point)})"
                done = read_point(points_dir / key)
                if done is not None and done.get("status") == "ok":
                    log.info("%s: done %s with the same config and settings; skipped", where,
                             done.get("finished"))
                    records_[i] = done
                    state["reused"] += 1
                    continue
                if done is not None:
                    log.info("%s: failed before (%s); retrying", where, done.get("error", {}).get("stage"))
                records_[i] = run_point(points_dir / key, point, applied, task_names, scoring,
                                        keep_merges=keep_merges, cuda=cuda, merge_args=merge_args,
                                        where=where, state=state)
                if not keep_merges:
                    _remove(points_dir / key / MERGE_DIR)
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            log.warning("interrupted: the finished points are in %s; rerun the same command to "
                        "compute the rest", output)
        if any(r is not None for r in records_) or state["references"] is not None:
            try:
                summarise()
            except Exception as summary_error:  # never hide why the run stopped
                log.error("could not rebuild the sweep's tables: %s", summary_error)
        raise
    return summarise()


def resolve_metric(metric: str, have_owners: bool, task_names: Sequence[str]) -> str:
    if metric == "auto":
        return "normalised" if have_owners else "raw"
    if metric == "normalised" and not have_owners:
        raise UserError("--metric normalised needs --owners (which expert owns each task)")
    if metric not in ("normalised", "raw") and metric not in task_names:
        raise UserError(f"--metric {metric!r} is none of auto, normalised, raw or the tasks "
                        f"({', '.join(task_names)})")
    return metric


def metric_label(metric: str) -> str:
    if metric == "normalised":
        return "the mean over tasks of the score normalised to each task's expert (%)"
    if metric == "raw":
        return "the mean over tasks of the raw primary metric"
    return f"{metric}'s primary metric"


def _remove_leftovers(points_dir: Path) -> None:
    """Partial merges and temporaries of a killed run."""
    for path in list(points_dir.glob(f"*/{MERGE_TMP}*")) + list(points_dir.glob("*/.*.tmp-*")):
        log.info("removing %s, left by an interrupted run", path)
        _remove(path)


def read_point(directory: Path) -> Optional[Dict[str, Any]]:
    path = directory / POINT_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        log.warning("ignoring %s: %s", path, error)
        return None


def score_references(models, base, owners, task_names, directory: Path, scoring) -> Dict[str, Any]:
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
              merge_args, where, state) -> Dict[str, Any]:
    """Merge (unless a finished merge of this point is on disk) and score one grid point; write
    ``point.json``. Returns the point's record."""
    from mergekit_ace.evaluation.runner import evaluate_models
    from mergekit_ace.evaluation.store import replace_directory, write_atomic, write_json_atomic
    from mergekit_ace.evaluation.summary import failure_line

    directory.mkdir(parents=True, exist_ok=True)
    config_file = write_atomic(directory / "config.yml", yaml.safe_dump(applied, sort_keys=False))
    merged = directory / MERGE_DIR
    record: Dict[str, Any] = {"point": dict(point), "label": point_label(point), "config": applied,
                              "started": _now()}
    merge_seconds = None
    if merged.is_dir() and (merged / "config.json").is_file():
        log.info("%s: using the finished merge an interrupted run left in %s", where, merged)
    else:
        if not keep_merges:  # one merge on disk at a time
            for other in directory.parent.glob(f"*/{MERGE_DIR}"):
                log.info("removing %s (one merge on disk at a time; --keep-merges keeps them)", other)
                _remove(other)
        staging = Path(tempfile.mkdtemp(prefix=MERGE_TMP, dir=directory))
        staging.rmdir()
        log.info("%s: merging with mergekit-yaml (log: %s)", where, directory / "merge.log")
        try:
            merge_seconds = run_mergekit_yaml(config_file, staging, directory / "merge.log",
                                              cuda=cuda, extra_args=merge_args)
            replace_directory(staging, merged)
        except MergeFailed as error:
            _remove(staging)
            log.error("%s: merge failed: %s", where, error)
            record.update(status="failed", finished=_now(),
                          error={"stage": "merge", "type": "MergeFailed", "message": str(error)})
            write_json_atomic(directory / POINT_FILE, record)
            return record
        except BaseException:
            _remove(staging)
            raise
        state["merged"] += 1
    record["merge_seconds"] = merge_seconds
    log.info("%s: scoring", where)
    eval_dir = directory / "eval"
    clock = time.time()
    content = evaluate_models({MERGE_MODEL_NAME: str(merged)}, task_names, eval_dir,
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
    write_json_atomic(directory / POINT_FILE, record)
    return record


def _now() -> str:
    import datetime

    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# --------------------------------------------------------------------------- outputs
def write_outputs(output, config_path, config, method, grid, points, keys, configs, records_,
                  references, ref_models, base, owners, task_names, metric, primary_metrics,
                  eval_key, started, state) -> Dict[str, Any]:
    """Build the tables from the points on disk; write table.md/.csv, sweep.json, chart.png,
    best.yml (each atomically). Returns sweep.json's content."""
    from mergekit_ace.evaluation import normalise
    from mergekit_ace.evaluation.store import write_atomic, write_json_atomic

    names = [f"p{i + 1}" for i in range(len(points))]
    scores: Dict[str, Dict[str, Any]] = {}
    if references is not None:
        for name in ref_models:
            scores[name] = references["scores"].get(name, {})
    for name, rec in zip(names, records_):
        if rec is not None and rec.get("status") == "ok":
            scores[name] = rec["scores"]
    tables = None
    if scores:
        try:
            tables = normalise.build_tables(scores, task_names, owners if references else None,
                                            base if references else None, primary_metrics)
        except normalise.TableError as error:
            raise UserError(str(error)) from None
    rows: List[Dict[str, Any]] = []
    for i, (name, point, key, rec) in enumerate(zip(names, points, keys, records_)):
        status = "not run" if rec is None else rec.get("status", "failed")
        row: Dict[str, Any] = {"point": name, "label": point_label(point), "parameters": dict(point),
                               "status": status, "key": key, "dir": f"{POINTS_DIR}/{key}"}
        if rec is not None:
            row["merge_seconds"] = rec.get("merge_seconds")
            row["score_seconds"] = rec.get("score_seconds")
            if rec.get("error"):
                row["error"] = rec["error"]
        if status == "ok" and tables is not None:
            row["raw"] = tables["raw"][name]
            row["normalised"] = (tables["normalised"] or {}).get(name)
            row["average_raw"] = tables["averages"][name]["raw"]
            row["average_normalised"] = tables["averages"][name]["normalised"]
            row["metric"] = (row["average_normalised"] if metric == "normalised"
                             else row["average_raw"] if metric == "raw" else row["raw"][metric])
        rows.append(row)
    candidates = [r for r in rows if r.get("metric") is not None]
    best = max(candidates, key=lambda r: r["metric"]) if candidates else None  # ties: the first
    for row in rows:
        row["best"] = row is best
    best_config = None
    if best is not None:
        index = rows.index(best)
        best_config = apply_point(config, points[index])[0]
        header = (f"# mergekit-ace sweep: the best of {len(candidates)} scored grid points by "
                  f"{metric_label(metric)} = {best['metric']:.4g}\n"
                  f"# ({best['label']}); source config: {config_path}\n")
        write_atomic(output / BEST_FILE, header + yaml.safe_dump(best_config, sort_keys=False))
    else:  # an earlier run's best.yml belongs to other points or settings
        _remove(output / BEST_FILE)
    refs_out = None
    if references is not None and tables is not None:
        refs_out = {name: {"path": ref_models[name], "role": tables["roles"][name],
                           "raw": tables["raw"][name],
                           "normalised": (tables["normalised"] or {}).get(name),
                           "average_raw": tables["averages"][name]["raw"],
                           "average_normalised": tables["averages"][name]["normalised"]}
                    for name in ref_models}
    content = {
        "config": str(config_path),
        "merge_method": method,
        "grid": {k: list(v) for k, v in grid.items()},
        "tasks": list(task_names),
        "primary_metrics": tables["primary_metrics"] if tables else None,
        "owners": owners if references is not None else None,
        "metric": metric,
        "metric_description": metric_label(metric),
        "best": None if best is None else {"point": best["point"], "label": best["label"],
                                           "parameters": best["parameters"], "metric": best["metric"],
                                           "file": BEST_FILE},
        "points": rows,
        "references": refs_out,
        "scoring": eval_key,
        "run": {"merged": state["merged"], "scored": state["scored"], "reused": state["reused"],
                "seconds": round(time.time() - started, 1)},
    }
    from mergekit_ace.evaluation.summary import clean_json

    content = clean_json(content)
    write_json_atomic(output / SWEEP_FILE, content)
    write_atomic(output / "table.csv", render_csv(content))
    write_atomic(output / "table.md", render_markdown(content))
    chart = write_chart(content, output / "chart.png")
    content["chart"] = chart.name if chart else None
    return content


def _fraction_tasks(content) -> set:
    """Tasks whose raw values all lie in [0, 1]: shown x100, as in the eval report."""
    values: Dict[str, List[float]] = {t: [] for t in content["tasks"]}
    for row in content["points"] + list((content["references"] or {}).values()):
        for t, v in (row.get("raw") or {}).items():
            if v is not None:
                values[t].append(v)
    return {t for t, vs in values.items() if all(0.0 <= v <= 1.0 for v in vs)}


def _f(value: Optional[float], scale: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def render_markdown(content: Mapping[str, Any]) -> str:
    from mergekit_ace.evaluation.report import markdown_table

    tasks, keys = content["tasks"], list(content["grid"])
    frac = _fraction_tasks(content)
    normalised = content["owners"] is not None
    header = ["point", *keys, *[f"{t}{' (%)' if t in frac else ''}" for t in tasks]]
    header += ["normalised avg" if normalised else "raw avg", "status"]
    all_frac = len(frac) == len(tasks)
    rows = []
    for row in content["points"]:
        cells = [f"**{row['point']}** (best)" if row["best"] else row["point"]]
        cells += [format_value(row["parameters"][k]) for k in keys]
        cells += [_f((row.get("raw") or {}).get(t), 100 if t in frac else 1) for t in tasks]
        avg = row.get("average_normalised") if normalised else row.get("average_raw")
        cells.append(_f(avg, 1 if normalised or not all_frac else 100))
        cells.append(row["status"])
        rows.append(cells)
    lines = [f"# Sweep of `{content['merge_method']}` over {', '.join(keys)}", "",
             f"Config `{content['config']}`; tasks {', '.join(tasks)}"
             + (f" (limit {content['scoring']['limit']})" if content["scoring"].get("limit") else "")
             + f"; best by {content['metric_description']}.", "",
             markdown_table(header, rows), ""]
    if content["metric"] not in ("normalised", "raw"):
        lines += [f"The best point is chosen by `{content['metric']}` alone.", ""]
    if content["best"]:
        lines += [f"Best: **{content['best']['label']}** ({_f(content['best']['metric'])}); "
                  f"its config is `{BEST_FILE}` (`mergekit-yaml {BEST_FILE} OUT`).", ""]
    else:
        lines += ["No point was scored: there is no best config yet.", ""]
    if normalised:
        lines += ["Normalised to each task's expert (% of the owner's score):", "",
                  markdown_table(["point", *keys, *tasks, "avg"], [
                      [row["point"], *[format_value(row["parameters"][k]) for k in keys],
                       *[_f((row.get("normalised") or {}).get(t)) for t in tasks],
                       _f(row.get("average_normalised"))] for row in content["points"]]), ""]
    if content["references"]:
        lines += ["References (scored once, kept in `reference/`):", "",
                  markdown_table(["model", "role", *[f"{t}{' (%)' if t in frac else ''}" for t in tasks],
                                  "normalised avg" if normalised else "raw avg"], [
                      [name, ref["role"], *[_f(ref["raw"].get(t), 100 if t in frac else 1) for t in tasks],
                       _f(ref["average_normalised"] if normalised else ref["average_raw"],
                          1 if normalised or not all_frac else 100)]
                      for name, ref in content["references"].items()]), ""]
    failed = [r for r in content["points"] if r.get("error")]
    if failed:
        lines += ["Failed points (rerun the same command to retry them):", ""]
        lines += [f"- {r['point']} ({r['label']}) at {r['error']['stage']}: {r['error']['message'][:300]}"
                  for r in failed]
        lines.append("")
    run = content["run"]
    lines.append(f"This run: {run['merged']} merged, {run['scored']} scored, {run['reused']} "
                 f"reused from earlier runs, {run['seconds']:.0f} s.")
    return "\n".join(lines) + "\n"


def render_csv(content: Mapping[str, Any]) -> str:
    tasks, keys = content["tasks"], list(content["grid"])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    header = ["point", *keys, "status", "best", *[f"raw:{t}" for t in tasks]]
    if content["owners"] is not None:
        header += [f"normalised:{t}" for t in tasks]
    header += ["average_raw", "average_normalised", "metric", "merge_seconds", "score_seconds", "dir"]
    writer.writerow(header)
    for row in content["points"]:
        out = [row["point"], *[row["parameters"][k] for k in keys], row["status"], row["best"]]
        out += [(row.get("raw") or {}).get(t) for t in tasks]
        if content["owners"] is not None:
            out += [(row.get("normalised") or {}).get(t) for t in tasks]
        out += [row.get("average_raw"), row.get("average_normalised"), row.get("metric"),
                row.get("merge_seconds"), row.get("score_seconds"), row["dir"]]
        writer.writerow(["" if v is None else v for v in out])
    return buffer.getvalue()


def write_chart(content: Mapping[str, Any], path: Path) -> Optional[Path]:
    """The metric against the first grid key that varies (one line per combination of the other
    keys; a log axis for positive numbers spanning more than 10x), and each task's score."""
    from mergekit_ace.evaluation.store import replacing

    rows = [r for r in content["points"] if r.get("metric") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = content["grid"]
    keys = list(grid)
    x_key = next((k for k in keys if len(grid[k]) > 1), keys[0])
    others = [k for k in keys if k != x_key]
    values = grid[x_key]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    log_x = numeric and all(v > 0 for v in values) and max(values) / min(values) > 10
    position = {format_value(v): (v if numeric else i) for i, v in enumerate(values)}
    normalised = content["metric"] == "normalised"
    panels = [("metric", content["metric_description"])] + (
        [("tasks", "normalised to each task's expert (%)" if normalised else "raw primary metric")]
        if len(content["tasks"]) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    groups: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{k}={format_value(row['parameters'][k])}" for k in others)
        groups.setdefault(label, []).append(row)
    for (kind, title), ax in zip(panels, axes[0]):
        for g, (label, members) in enumerate(groups.items()):
            members = sorted(members, key=lambda r: position[format_value(r["parameters"][x_key])])
            xs = [position[format_value(r["parameters"][x_key])] for r in members]
            if kind == "metric":
                ax.plot(xs, [r["metric"] for r in members], marker="o", color=f"C{g % 10}",
                        label=label or None)
                for r in members:
                    if r["best"]:
                        ax.plot([position[format_value(r["parameters"][x_key])]], [r["metric"]],
                                marker="*", markersize=16, color="gold", markeredgecolor="black",
                                linestyle="none", label="best")
            else:
                for t_i, task in enumerate(content["tasks"]):
                    source = "normalised" if normalised else "raw"
                    ys = [(r.get(source) or {}).get(task) for r in members]
                    ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o",
                            linestyle=["-", "--", ":", "-."][g % 4], color=f"C{t_i % 10}",
                            label=f"{task}" + (f" ({label})" if label else ""))
        if log_x:
            ax.set_xscale("log")
        if not numeric:
            ax.set_xticks(range(len(values)), [format_value(v) for v in values])
        ax.set_xlabel(x_key)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=7)
    fig.suptitle(f"{content['merge_method']} sweep", fontsize=11)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
