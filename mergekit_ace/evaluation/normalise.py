"""The score tables: raw primary metric per model and task, normalised to each task's owner.

Pure functions over plain dicts (no lm-eval, no torch), as ACE-Merging's Table 9:

* ``raw[model][task]`` -- the task's primary metric (see :mod:`.presets`);
* ``normalised[model][task] = raw[model][task] / raw[owner(task)][task] * 100`` -- a merge's
  score as a percentage of the expert fine-tuned for that task (``None`` where the owner scored 0);
* ``averages[model]`` -- the mean over tasks of the raw and of the normalised scores;
* roles -- ``base`` (given), ``expert`` (owns at least one task), ``merge`` (every other model).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_ace.evaluation.presets import PRIMARY_METRICS, metric_keys, primary_metric


class TableError(ValueError):
    """Inconsistent owners/base/metrics; the message names the culprit."""


Scores = Mapping[str, Mapping[str, Mapping[str, Any]]]  # model -> task -> metric -> value


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None


def parse_owners(data: Any) -> dict[str, str]:
    """``{task: model}`` from ``{task: model}``, ``{model: [task, ...]}`` or ``{"owners": ...}``."""
    if isinstance(data, Mapping) and set(data) == {"owners"}:
        data = data["owners"]
    if not isinstance(data, Mapping) or not data:
        raise TableError("owners must map each task to the model that owns it, e.g. "
                         '{"gsm8k_cot": "math_expert"} (or each model to a list of tasks)')
    owners: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, str):
            pairs = [(str(key), value)]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            pairs = [(task, str(key)) for task in value]
        else:
            raise TableError(f"owners: entry {key!r} must be a model name or a list of task names")
        for task, model in pairs:
            if task in owners and owners[task] != model:
                raise TableError(f"owners: task {task!r} has two owners, "
                                 f"{owners[task]!r} and {model!r}")
            owners[task] = model
    return owners


def load_owners(path: str | Path) -> dict[str, str]:
    """Read an owners file (JSON or YAML; see :func:`parse_owners`)."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"owners file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:  # malformed file: name it
        raise TableError(f"owners file {path} is not valid JSON/YAML: {error}") from None
    try:
        return parse_owners(data)
    except TableError as error:
        raise TableError(f"owners file {path}: {error}") from None


def check_owners(
    owners: Mapping[str, str], models: Sequence[str], tasks: Sequence[str]
) -> None:
    """Every task has an owner and every owner is one of ``models``; else :class:`TableError`."""
    for task in tasks:
        if task not in owners:
            raise TableError(
                f"task {task!r} has no owner: normalising needs the model that owns each task "
                f"(owners given for: {', '.join(sorted(owners)) or 'none'})"
            )
        if owners[task] not in models:
            raise TableError(
                f"owner {owners[task]!r} of task {task!r} is not one of the models "
                f"({', '.join(models)})"
            )


def roles(models: Sequence[str], owners: Mapping[str, str] | None, base: str | None) -> dict[str, str]:
    """``{model: "base" | "expert" | "merge"}``; ``base`` must be one of ``models``."""
    if base is not None and base not in models:
        raise TableError(f"base {base!r} is not one of the models ({', '.join(models)})")
    experts = set((owners or {}).values())
    return {
        m: "base" if m == base else "expert" if m in experts else "merge" for m in models
    }


def select_primary(
    scores: Scores, tasks: Sequence[str], overrides: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """``{task: metric key}``: the primary metric of each task, found in the first model that
    reports the task. An override naming a metric the task does not report is an error. A task
    no model has a result for (every run of it failed) gets the override or the table's choice
    (:data:`~.presets.PRIMARY_METRICS`), else None."""
    chosen: dict[str, str | None] = {}
    for task in tasks:
        reports = [scores[m][task] for m in scores if task in scores[m]]
        if not reports:
            chosen[task] = (overrides or {}).get(task) or PRIMARY_METRICS.get(task)
            continue
        override = (overrides or {}).get(task)
        if override is not None:
            keys = metric_keys(reports[0])
            if override not in keys and not any(k.split(",")[0] == override for k in keys):
                raise TableError(f"task {task!r} has no metric {override!r} "
                                 f"(it reports {', '.join(keys)})")
        metric = primary_metric(task, reports[0], overrides)
        if metric is None:
            raise TableError(f"task {task!r} reported no numeric metric")
        chosen[task] = metric
    return chosen


def build_tables(
    scores: Scores,
    tasks: Sequence[str],
    owners: Mapping[str, str] | None = None,
    base: str | None = None,
    primary_overrides: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """All tables of the report from ``scores[model][task][metric]``.

    Returns ``{"models", "tasks", "primary_metrics", "roles", "raw", "normalised", "averages"}``;
    ``normalised`` is ``None`` when no owners are given. ``averages[model]`` has ``"raw"`` and
    ``"normalised"`` (the mean over tasks, ignoring missing values).
    """
    models: list[str] = list(scores)
    tasks = list(tasks)
    if owners is not None:
        check_owners(owners, models, tasks)
    metrics = select_primary(scores, tasks, primary_overrides)
    raw: dict[str, dict[str, float | None]] = {
        m: {
            t: (
                float(scores[m][t][metrics[t]])
                if metrics[t] is not None and metrics[t] in scores[m].get(t, {})
                else None
            )
            for t in tasks
        }
        for m in models
    }
    normalised = None
    if owners is not None:
        normalised = {}
        for m in models:
            normalised[m] = {}
            for t in tasks:
                reference = raw[owners[t]][t]
                value = raw[m][t]
                normalised[m][t] = (
                    None if value is None or not reference else 100.0 * value / reference
                )
    averages = {
        m: {
            "raw": _mean([raw[m][t] for t in tasks]),
            "normalised": _mean([normalised[m][t] for t in tasks]) if normalised else None,
        }
        for m in models
    }
    return {
        "models": models,
        "tasks": tasks,
        "primary_metrics": metrics,
        "owners": dict(owners) if owners is not None else None,
        "base": base,
        "roles": roles(models, owners, base),
        "raw": raw,
        "normalised": normalised,
        "averages": averages,
    }
