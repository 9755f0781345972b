"""``results.json``, ``report.md`` and the charts, rebuilt from the cells on disk (:mod:`.store`).

Only cells computed with the run's own settings enter the summary; a (model, task) without such
a cell is "not run". Failed cells are listed with their error and lm-eval stage.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_ace.evaluation import normalise, report
from mergekit_ace.evaluation.record import hub_commit
from mergekit_ace.evaluation.store import RESULTS_FILE, write_json_atomic

log = logging.getLogger(__name__)

#: lm-eval result keys that hold one entry per task; merged over a model's cells.
PER_TASK_KEYS = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
                 "higher_is_better", "n-samples")


def clean_json(value: Any) -> Any:
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python, unknown objects -> str."""
    from lm_eval.utils import handle_non_serializable

    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): clean_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_json(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return clean_json(handle_non_serializable(value))


def failure_line(failure: Mapping[str, Any]) -> str:
    """One line naming the model, the task, the stage and the error."""
    message = " ".join(str(failure["message"]).split())
    if len(message) > 400:
        message = message[:397] + "..."
    return (f"model {failure['model']!r} on task {failure['task']!r} at {failure['stage']}: "
            f"{failure['type']}: {message}")


def assemble(
    models: Sequence[str],
    tasks: Sequence[str],
    cells: Mapping[str, Mapping[str, Mapping[str, Any] | None]],
    *,
    owners: Mapping[str, str] | None,
    base: str | None,
    primary_metrics: Mapping[str, str] | None,
    config: Mapping[str, Any],
    record: Mapping[str, Any],
    reused: set[tuple[str, str]],
    cell_dirs: Mapping[tuple[str, str], str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(content of results.json, tables)`` from ``cells[model][task]`` (None: not run)."""
    scores: dict[str, dict[str, Any]] = {m: {} for m in models}
    lm_eval: dict[str, dict[str, Any]] = {m: {} for m in models}
    status: dict[str, dict[str, str]] = {m: {} for m in models}
    summary: dict[str, dict[str, Any]] = {m: {} for m in models}
    failures: list[dict[str, Any]] = []
    generation: dict[str, dict[str, Any]] = {t: {} for t in tasks}
    data_files: dict[str, Any] = {}
    model_record = {m: dict(record["models"][m]) for m in models}
    for m in models:
        for t in tasks:
            cell = cells[m][t]
            if cell is None:
                status[m][t] = "not run"
                summary[m][t] = {"status": "not run"}
                continue
            status[m][t] = cell["status"]
            entry = {
                "status": cell["status"],
                "reused": (m, t) in reused,
                "finished": cell.get("finished"),
                "seconds": cell.get("seconds"),
                "dir": cell_dirs.get((m, t)),
            }
            if cell.get("warnings"):
                entry["warnings"] = cell["warnings"]
            if cell["status"] == "ok":
                scores[m].update(cell["scores"])
                for key in PER_TASK_KEYS:
                    if isinstance(cell["lm_eval"].get(key), Mapping):
                        lm_eval[m].setdefault(key, {}).update(cell["lm_eval"][key])
                generation[t][m] = cell.get("generation")
                data_files.setdefault(t, cell.get("data_files"))
                model_record[m].update(hub_commit(record["models"][m], cell["lm_eval"].get("config")))
            else:
                error = cell["error"]
                entry["error"] = {k: error[k] for k in ("type", "message", "stage")}
                failures.append({"model": m, "task": t, **entry["error"]})
            summary[m][t] = entry
    try:
        tables = normalise.build_tables(scores, tasks, owners, base, primary_metrics)
    except normalise.TableError as error:  # an override naming a metric the task lacks
        from mergekit_ace.errors import UserError

        raise UserError(str(error)) from None
    tables["status"] = status
    content = {
        "scores": scores,
        "tasks": list(tasks),
        "primary_metrics": tables["primary_metrics"],
        "roles": tables["roles"],
        "raw": tables["raw"],
        "normalised": tables["normalised"],
        "averages": tables["averages"],
        "owners": tables["owners"],
        "base": base,
        "status": status,
        "failures": failures,
        "cells": summary,
        "record": {
            **record,
            "models": model_record,
            "generation": {t: g for t, g in generation.items() if g},
            "data_files": data_files,
        },
        "config": dict(config),
        "lm_eval": lm_eval,
    }
    return clean_json(content), tables


def write(directory: Path, content: Mapping[str, Any], tables: Mapping[str, Any]) -> None:
    """Write ``results.json``, ``report.md`` and the charts into ``directory``, each atomically."""
    write_json_atomic(Path(directory) / RESULTS_FILE, content)
    warnings = [w for row in content["cells"].values() for cell in row.values()
                for w in cell.get("warnings", [])]
    report.write_report(directory, tables, content["config"], lm_eval_tables(content["lm_eval"]),
                        content["failures"], content["record"], warnings)


def lm_eval_tables(raw_results: Mapping[str, Any]) -> dict[str, str]:
    """lm-eval's own markdown table of all metrics, per model."""
    from lm_eval.utils import make_table

    out = {}
    for name, results in raw_results.items():
        if not results.get("results"):
            continue
        try:
            out[name] = make_table(dict(results))
        except Exception as error:  # a cosmetic section; never fail the run for it
            log.warning("could not render lm-eval's table for %s: %s", name, error)
    return out
