"""The sweep's outputs, rebuilt from the points on disk at the end of every run: ``table.md``,
``table.csv``, ``sweep.json``, ``chart.png`` and ``best.yml`` (each written atomically), and the
metric the best point is chosen by. :func:`write_outputs` is the list of steps."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from mergekit_ace.errors import UserError
from mergekit_ace.sweep.grid import apply_point, format_value, point_label
from mergekit_ace.sweep.layout import BEST_FILE, POINTS_DIR, SWEEP_FILE, remove

if TYPE_CHECKING:
    from mergekit_ace.sweep.runner import SweepPlan

METRIC_CHOICES = ("auto", "normalised", "raw")


# --------------------------------------------------------------------------- the metric
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


# --------------------------------------------------------------------------- outputs
def write_outputs(plan: SweepPlan, records: Sequence[dict[str, Any] | None], state: Mapping[str, Any],
                  started: float) -> dict[str, Any]:
    """Build the tables from the points on disk; write table.md/.csv, sweep.json, chart.png,
    best.yml (each atomically). Returns sweep.json's content."""
    references = state["references"]
    names = [f"p{i + 1}" for i in range(len(plan.points))]
    tables = score_tables(plan, names, records, references)
    rows = point_rows(plan, names, records, tables)
    best, candidates = choose_best(rows)
    write_best_config(plan, rows, best, candidates)
    content = sweep_content(plan, rows, best, reference_rows(plan, references, tables), tables, state, started)
    return write_tables(plan.output, content)


def score_tables(plan: SweepPlan, names: Sequence[str], records: Sequence[dict[str, Any] | None],
                 references: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The evaluation's tables (raw, normalised, averages, roles) over the references' scores and
    every finished point's (``p1``, ``p2``, ...); None when nothing is scored yet."""
    from mergekit_ace.evaluation import normalise

    scores: dict[str, dict[str, Any]] = {}
    if references is not None:
        for name in plan.ref_models:
            scores[name] = references["scores"].get(name, {})
    for name, rec in zip(names, records):
        if rec is not None and rec.get("status") == "ok":
            scores[name] = rec["scores"]
    if not scores:
        return None
    try:
        return normalise.build_tables(scores, plan.task_names, plan.owners if references else None,
                                      plan.base if references else None, plan.scoring.get("primary_metrics"))
    except normalise.TableError as error:
        raise UserError(str(error)) from None


def point_rows(plan: SweepPlan, names: Sequence[str], records: Sequence[dict[str, Any] | None],
               tables: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One row per grid point: its status, timings, error, scores and the value of the metric
    (``metric``: the normalised or raw mean, or one task's primary metric)."""
    metric = plan.metric
    rows: list[dict[str, Any]] = []
    for name, point, key, rec in zip(names, plan.points, plan.keys, records):
        status = "not run" if rec is None else rec.get("status", "failed")
        row: dict[str, Any] = {"point": name, "label": point_label(point), "parameters": dict(point),
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
    return rows


def choose_best(rows: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The row with the highest metric (ties: the first) and the rows that have one; marks each
    row's ``best``."""
    candidates = [r for r in rows if r.get("metric") is not None]
    best = max(candidates, key=lambda r: r["metric"]) if candidates else None  # ties: the first
    for row in rows:
        row["best"] = row is best
    return best, candidates


def write_best_config(plan: SweepPlan, rows: list[dict[str, Any]], best: dict[str, Any] | None,
                      candidates: Sequence[dict[str, Any]]) -> None:
    """``best.yml``: the original config with the best point applied, under a comment saying how
    it was chosen; without a best point, an earlier run's ``best.yml`` is removed."""
    from mergekit_ace.evaluation.store import write_atomic

    output = plan.output
    if best is None:  # an earlier run's best.yml belongs to other points or settings
        remove(output / BEST_FILE)
        return
    best_config = apply_point(plan.config, plan.points[rows.index(best)])[0]
    header = (f"# mergekit-ace sweep: the best of {len(candidates)} scored grid points by "
              f"{metric_label(plan.metric)} = {best['metric']:.4g}\n"
              f"# ({best['label']}); source config: {plan.config_path}\n")
    write_atomic(output / BEST_FILE, header + yaml.safe_dump(best_config, sort_keys=False))


def reference_rows(plan: SweepPlan, references: Mapping[str, Any] | None,
                   tables: Mapping[str, Any] | None) -> dict[str, dict[str, Any]] | None:
    """``{model: {path, role, raw, normalised, averages}}`` for base and experts (None when they
    were not scored)."""
    if references is None or tables is None:
        return None
    return {name: {"path": plan.ref_models[name], "role": tables["roles"][name],
                   "raw": tables["raw"][name],
                   "normalised": (tables["normalised"] or {}).get(name),
                   "average_raw": tables["averages"][name]["raw"],
                   "average_normalised": tables["averages"][name]["normalised"]}
            for name in plan.ref_models}


def sweep_content(plan: SweepPlan, rows, best, refs_out, tables, state: Mapping[str, Any],
                  started: float) -> dict[str, Any]:
    """The content of ``sweep.json`` (JSON-clean: no NaN or infinity)."""
    from mergekit_ace.evaluation.summary import clean_json

    references = state["references"]
    content = {
        "config": str(plan.config_path),
        "merge_method": plan.spec.name,
        "grid": {k: list(v) for k, v in plan.grid.items()},
        "tasks": list(plan.task_names),
        "primary_metrics": tables["primary_metrics"] if tables else None,
        "owners": plan.owners if references is not None else None,
        "metric": plan.metric,
        "metric_description": metric_label(plan.metric),
        "best": None if best is None else {"point": best["point"], "label": best["label"],
                                           "parameters": best["parameters"], "metric": best["metric"],
                                           "file": BEST_FILE},
        "points": rows,
        "references": refs_out,
        "scoring": plan.eval_key,
        "run": {"merged": state["merged"], "scored": state["scored"], "reused": state["reused"],
                "seconds": round(time.time() - started, 1)},
    }
    return clean_json(content)


def write_tables(output: Path, content: dict[str, Any]) -> dict[str, Any]:
    """Write sweep.json, table.csv, table.md and chart.png; returns ``content`` with ``chart``
    (the chart's file name, or None without a scored point)."""
    from mergekit_ace.evaluation.store import write_atomic, write_json_atomic

    write_json_atomic(output / SWEEP_FILE, content)
    write_atomic(output / "table.csv", render_csv(content))
    write_atomic(output / "table.md", render_markdown(content))
    chart = write_chart(content, output / "chart.png")
    content["chart"] = chart.name if chart else None
    return content


def _fraction_tasks(content) -> set:
    """Tasks whose raw values all lie in [0, 1]: shown x100, as in the eval report."""
    values: dict[str, list[float]] = {t: [] for t in content["tasks"]}
    for row in content["points"] + list((content["references"] or {}).values()):
        for t, v in (row.get("raw") or {}).items():
            if v is not None:
                values[t].append(v)
    return {t for t, vs in values.items() if all(0.0 <= v <= 1.0 for v in vs)}


def _f(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
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


def write_chart(content: Mapping[str, Any], path: Path) -> Path | None:
    """The metric against the first grid key that varies (one line per combination of the other
    keys; a log axis for positive numbers spanning more than 10x), and each task's score."""
    from mergekit_ace.evaluation.store import replacing

    rows = [r for r in content["points"] if r.get("metric") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axis = _chart_axis(content["grid"])
    normalised = content["metric"] == "normalised"
    panels = [("metric", content["metric_description"])] + (
        [("tasks", "normalised to each task's expert (%)" if normalised else "raw primary metric")]
        if len(content["tasks"]) > 1 else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), squeeze=False)
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = ", ".join(f"{k}={format_value(row['parameters'][k])}" for k in axis["others"])
        groups.setdefault(label, []).append(row)
    for (kind, title), ax in zip(panels, axes[0]):
        _plot_panel(ax, kind, groups, axis, content["tasks"], "normalised" if normalised else "raw")
        _finish_axes(ax, axis, title)
    fig.suptitle(f"{content['merge_method']} sweep", fontsize=11)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def _chart_axis(grid: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The chart's x axis: the first grid key that varies, the other keys, each value's position
    (the value itself for numbers, else its index) and whether the axis is logarithmic."""
    keys = list(grid)
    x_key = next((k for k in keys if len(grid[k]) > 1), keys[0])
    values = grid[x_key]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return {"key": x_key, "others": [k for k in keys if k != x_key], "values": values, "numeric": numeric,
            "log": numeric and all(v > 0 for v in values) and max(values) / min(values) > 10,
            "position": {format_value(v): (v if numeric else i) for i, v in enumerate(values)}}


def _plot_panel(ax, kind: str, groups: Mapping[str, list[dict[str, Any]]], axis: Mapping[str, Any],
                tasks: Sequence[str], source: str) -> None:
    """One panel: the metric per group of points (the best marked with a star), or each task's
    score (``source``: raw or normalised) per group."""
    x_key, position = axis["key"], axis["position"]
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
            for t_i, task in enumerate(tasks):
                ys = [(r.get(source) or {}).get(task) for r in members]
                ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o",
                        linestyle=["-", "--", ":", "-."][g % 4], color=f"C{t_i % 10}",
                        label=f"{task}" + (f" ({label})" if label else ""))


def _finish_axes(ax, axis: Mapping[str, Any], title: str) -> None:
    """Scale, ticks, labels, grid and legend of one panel."""
    if axis["log"]:
        ax.set_xscale("log")
    if not axis["numeric"]:
        ax.set_xticks(range(len(axis["values"])), [format_value(v) for v in axis["values"]])
    ax.set_xlabel(axis["key"])
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ax.legend(fontsize=7)
