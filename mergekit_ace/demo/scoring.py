"""Score the demo's models on its three local lm-eval tasks.

The task YAMLs in ``mergekit_ace/demo/tasks/`` are templates: :func:`prepare_tasks` writes the
held-out examples as JSONL and copies the YAMLs (with the data directory filled in) plus the
scorer module they load with ``!function`` into ``<output>/tasks/``.

:func:`score_models` runs the project's wrapper ``mergekit_ace.evaluation.evaluate_models`` and
returns its results (``{"scores": {model: {task: {metric: value}}}, ...}``).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergekit_ace.demo.skills import SKILL_NAMES, Example, write_jsonl

TEMPLATE_DIR = Path(__file__).resolve().parent / "tasks"
METRICS = {"arithmetic": "exact_match", "rpn": "pass", "translate": "exact_match"}


def task_name(skill: str) -> str:
    return f"ace_demo_{skill}"


def prepare_tasks(eval_sets: Mapping[str, Sequence[Example]], out_dir: Path) -> Path:
    """Write ``<out_dir>/data/<skill>.jsonl`` and ``<out_dir>/tasks/*.yaml``; return the tasks dir."""
    out_dir = Path(out_dir).resolve()
    data_dir, tasks_dir = out_dir / "data", out_dir / "tasks"
    if tasks_dir.exists():
        shutil.rmtree(tasks_dir)
    tasks_dir.mkdir(parents=True)
    for skill in SKILL_NAMES:
        write_jsonl(eval_sets[skill], data_dir / f"{skill}.jsonl")
    for template in sorted(TEMPLATE_DIR.iterdir()):
        if template.suffix == ".yaml":
            text = template.read_text().replace("@DATA_DIR@", data_dir.as_posix())
            (tasks_dir / template.name).write_text(text)
        elif template.suffix == ".py":
            shutil.copy(template, tasks_dir / template.name)
    return tasks_dir


def score_models(
    models: Mapping[str, Path],
    tasks_dir: Path,
    output_dir: Path,
    owners: Mapping[str, str],
    base: str | None = None,
    batch_size: int = 16,
    log=print,
) -> dict:
    """Score every model on the three demo tasks; return the results dict (see module docstring)."""
    from mergekit_ace.evaluation import evaluate_models

    tasks = [task_name(s) for s in SKILL_NAMES]
    log("Scoring with mergekit_ace.evaluation.evaluate_models (lm-eval)")
    results = evaluate_models(
        {name: str(path) for name, path in models.items()},
        tasks,
        output_dir,
        owners=dict(owners),
        base=base,
        batch_size=batch_size,
        include_path=str(tasks_dir),
        device="cpu",
        model_args={"dtype": "float32"},  # bf16-stored models too: the weights are bf16, the arithmetic is not
        overwrite=True,
        primary_metrics={task_name(s): f"{METRICS[s]},none" for s in SKILL_NAMES},
    )
    if results["failures"]:  # the demo's tables need every score
        from mergekit_ace.evaluation.summary import failure_line

        raise RuntimeError("scoring failed: " + "; ".join(failure_line(f) for f in results["failures"]))
    return results


def _plain(metrics: Mapping[str, float]) -> dict[str, float]:
    """Drop lm-eval's filter suffix (``"exact_match,none"`` -> ``"exact_match"``) and stderrs."""
    return {
        key.split(",")[0]: float(value)
        for key, value in metrics.items()
        if not key.split(",")[0].endswith("_stderr")
    }


def primary_score(results: dict, model: str, skill: str) -> float:
    """The skill's headline metric (exact match, or the checker's pass rate) for ``model``."""
    metrics = _plain(results["scores"][model][task_name(skill)])
    if METRICS[skill] not in metrics:
        raise KeyError(f"no {METRICS[skill]!r} score for {model} on {task_name(skill)}: {metrics}")
    return metrics[METRICS[skill]]
