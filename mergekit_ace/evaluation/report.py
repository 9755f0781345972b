"""``report.md`` and the grouped bar charts, from the tables of :mod:`.normalise`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergekit_ace.evaluation.store import replacing, write_atomic

ROLE_ORDER = {"base": 0, "expert": 1, "merge": 2}


def ordered_models(tables: Mapping[str, Any]) -> list[str]:
    """Base first, then experts, then merges (each in the order given)."""
    models = list(tables["models"])
    return sorted(models, key=lambda m: (ROLE_ORDER[tables["roles"][m]], models.index(m)))


def _fraction_tasks(tables: Mapping[str, Any]) -> set:
    """Tasks whose raw values all lie in [0, 1]; they are shown x100."""
    out = set()
    for task in tables["tasks"]:
        values = [tables["raw"][m][task] for m in tables["models"]]
        if all(v is None or 0.0 <= v <= 1.0 for v in values):
            out.add(task)
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _cell(tables: Mapping[str, Any], model: str, task: str, text: str) -> str:
    """``text``, or the cell's status ("failed", "not run") when it has no result."""
    status = (tables.get("status") or {}).get(model, {}).get(task, "ok")
    return text if status == "ok" else status


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def raw_rows(tables: Mapping[str, Any]) -> list[list[str]]:
    scale = _fraction_tasks(tables)
    rows = []
    for m in ordered_models(tables):
        cells = [m, tables["roles"][m]]
        for t in tables["tasks"]:
            v = tables["raw"][m][t]
            cells.append(_cell(tables, m, t, _fmt(None if v is None else v * 100 if t in scale else v)))
        avg = tables["averages"][m]["raw"]
        cells.append(_fmt(None if avg is None else avg * 100 if len(scale) == len(tables["tasks"]) else avg))
        rows.append(cells)
    return rows


def normalised_rows(tables: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for m in ordered_models(tables):
        cells = [m, tables["roles"][m]]
        cells += [_cell(tables, m, t, _fmt(tables["normalised"][m][t])) for t in tables["tasks"]]
        cells.append(_fmt(tables["averages"][m]["normalised"]))
        rows.append(cells)
    return rows


def render_markdown(
    tables: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    lm_eval_tables: Mapping[str, str] | None = None,
    charts: Sequence[str] = (),
    failures: Sequence[Mapping[str, Any]] = (),
    record: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> str:
    """The text of ``report.md``. ``tables["status"]`` (``{model: {task: status}}``), when
    present, marks cells without a result as "failed" or "not run"; ``failures`` are listed."""
    tasks = tables["tasks"]
    scale = _fraction_tasks(tables)
    parts = ["# Evaluation report", ""]
    if config:
        limit = config.get("limit")
        parts.append(
            f"lm-eval backend `{config.get('backend')}`"
            + (f", limit {limit} per task (a quick check, not a benchmark)" if limit else "")
            + (f", num_fewshot {config.get('num_fewshot')}" if config.get("num_fewshot") is not None else "")
            + (f", data from `{config.get('data_dir')}`" if config.get("data_dir") else "")
            + "."
        )
        parts.append("")
    parts += ["## Models", ""]
    parts.append(markdown_table(
        ["model", "role", "owns"],
        [[m, tables["roles"][m],
          ", ".join(t for t in tasks if (tables.get("owners") or {}).get(t) == m) or "–"]
         for m in ordered_models(tables)],
    ))
    parts += ["", "## Raw scores", ""]
    parts.append(
        "Primary metric per task (lm-eval's `metric,filter` key)"
        + ("; fractions are shown x100" if scale else "")
        + ". The average is the mean over tasks."
    )
    parts.append("")
    header = ["model", "role"] + [f"{t}<br>`{tables['primary_metrics'][t] or '–'}`" for t in tasks] + ["average"]
    parts.append(markdown_table(header, raw_rows(tables)))
    if tables.get("normalised") is not None:
        owners = tables["owners"]
        parts += ["", "## Normalised scores (% of the owning expert)", ""]
        parts.append(
            "Each score divided by the score of the expert that owns the task, x100 "
            "(the owner scores 100 on its own task); `–` where the owner scored 0. "
            "The average is the mean over tasks (ACE-Merging, Table 9)."
        )
        parts.append("")
        header = ["model", "role"] + [f"{t}<br>(owner: {owners[t]})" for t in tasks] + ["average"]
        parts.append(markdown_table(header, normalised_rows(tables)))
    if failures:
        parts += ["", "## Failed", ""]
        parts.append("These (model, task) cells failed; the other cells ran. `--resume` retries them.")
        parts.append("")
        parts.append(markdown_table(
            ["model", "task", "stage", "error"],
            [[f["model"], f["task"], f["stage"], f"{f['type']}: {_one_line(f['message'])}"]
             for f in failures],
        ))
    not_run = [(m, t) for m, row in (tables.get("status") or {}).items()
               for t, st in row.items() if st == "not run"]
    if not_run:
        parts += ["", f"Not run (interrupted): {', '.join(f'{m}/{t}' for m, t in not_run)}; "
                      "rerun the same command with `--resume` to finish."]
    if warnings:
        parts += ["", "## Warnings", ""]
        parts += [f"- {_one_line(w, 500)}" for w in warnings]
    if charts:
        parts += ["", "## Charts", ""]
        parts += [f"![{Path(c).stem}]({c})" for c in charts]
    if record:
        versions = ", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items() if v)
        parts += ["", "## Record", "",
                  f"Versions: {versions}. Seed {record.get('seed')}. Model identities, the "
                  "generation settings used per task and model, and the data files read are in "
                  "`results.json` (`record`)."]
    if lm_eval_tables:
        parts += ["", "## lm-eval results per model (all metrics)", ""]
        for model, table in lm_eval_tables.items():
            parts += [f"### {model}", "", table.strip(), ""]
    return "\n".join(parts).rstrip() + "\n"


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def bar_chart(
    tables: Mapping[str, Any], path: str | Path, normalised: bool = True, title: str | None = None
) -> Path:
    """A grouped bar chart (one group per task plus the average, one bar per model) as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    models = ordered_models(tables)
    tasks = list(tables["tasks"])
    key = "normalised" if normalised else "raw"
    scale = 1.0 if normalised else (100.0 if len(_fraction_tasks(tables)) == len(tasks) else 1.0)
    groups = tasks + ["average"]
    values = np.array(
        [
            [(tables[key][m][t] if tables[key][m][t] is not None else np.nan) * scale for t in tasks]
            + [(tables["averages"][m][key] if tables["averages"][m][key] is not None else np.nan) * scale]
            for m in models
        ],
        dtype=float,
    )
    width = 0.8 / max(len(models), 1)
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(models)) ** 0.5 + 2), 4.5))
    hatches = {"base": "//", "expert": "", "merge": ".."}
    for i, m in enumerate(models):
        ax.bar(x - 0.4 + width * (i + 0.5), np.nan_to_num(values[i]), width,
               label=f"{m} ({tables['roles'][m]})", hatch=hatches[tables["roles"][m]],
               edgecolor="black", linewidth=0.4)
    if normalised:
        ax.axhline(100.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel("% of the owning expert")
    else:
        ax.set_ylabel("score (x100)" if scale == 100.0 else "score")
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_title(title or ("Normalised scores" if normalised else "Raw scores"))
    ax.legend(fontsize="small", ncol=1, bbox_to_anchor=(1.01, 1), loc="upper left")
    fig.tight_layout()
    path = Path(path)
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path


def write_report(
    directory: str | Path,
    tables: Mapping[str, Any],
    config: Mapping[str, Any] | None = None,
    lm_eval_tables: Mapping[str, str] | None = None,
    failures: Sequence[Mapping[str, Any]] = (),
    record: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``report.md``, ``scores_raw.png`` and (with owners) ``scores_normalised.png``, each
    through a temporary file and a rename."""
    directory = Path(directory)
    charts = [bar_chart(tables, directory / "scores_raw.png", normalised=False)]
    if tables.get("normalised") is not None:
        charts.append(bar_chart(tables, directory / "scores_normalised.png", normalised=True))
    text = render_markdown(tables, config, lm_eval_tables, [c.name for c in charts], failures,
                           record, warnings)
    report = write_atomic(directory / "report.md", text)
    return {"report": report, **{c.stem: c for c in charts}}
