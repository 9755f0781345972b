"""Score the demo's models on its three local lm-eval tasks.

The task YAMLs in ``mergekit_ace/demo/tasks/`` are templates: :func:`prepare_tasks` writes the
held-out examples as JSONL and copies the YAMLs (with the data directory filled in) plus the
scorer module they load with ``!function`` into ``<output>/tasks/``.

:func:`score_models` uses the project's wrapper ``mergekit_ace.evaluation.evaluate_models`` when it
is available, and otherwise (an older checkout) calls lm-eval's ``simple_evaluate`` directly. Both
return ``{"scores": {model: {task: {metric: value}}}, ...}``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence

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


def _wrapper_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("mergekit_ace.evaluation.runner") is not None
    except (ImportError, ValueError):
        return False


def score_models(
    models: Mapping[str, Path],
    tasks_dir: Path,
    output_dir: Path,
    owners: Mapping[str, str],
    base: Optional[str] = None,
    batch_size: int = 16,
    log=print,
) -> dict:
    """Score every model on the three demo tasks; return the results dict (see module docstring)."""
    tasks = [task_name(s) for s in SKILL_NAMES]
    if _wrapper_available():
        from mergekit_ace.evaluation import evaluate_models

        log("Scoring with mergekit_ace.evaluation.evaluate_models (lm-eval)")
        # the wrapper's model names are [A-Za-z0-9._+-]: map e.g. task_arithmetic <-> task-arithmetic
        safe = {name: name.replace("_", "-") for name in models}
        back = {v: k for k, v in safe.items()}
        results = evaluate_models(
            {safe[name]: str(path) for name, path in models.items()},
            tasks,
            output_dir,
            owners={task: safe.get(owner, owner) for task, owner in owners.items()},
            base=safe.get(base, base) if base else None,
            batch_size=batch_size,
            include_path=str(tasks_dir),
            device="cpu",
            overwrite=True,
            primary_metrics={task_name(s): f"{METRICS[s]},none" for s in SKILL_NAMES},
        )
        results = dict(results)
        results["scores"] = {back.get(name, name): value for name, value in results["scores"].items()}
        return results
    log("Scoring with lm-eval's simple_evaluate (mergekit_ace.evaluation.evaluate_models not available)")
    return _simple_evaluate_all(models, tasks, tasks_dir, output_dir, batch_size, log)


def _simple_evaluate_all(models, tasks, tasks_dir, output_dir, batch_size, log) -> dict:
    import time

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manager = TaskManager(include_path=str(tasks_dir))
    scores: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name, path in models.items():
        start = time.time()
        result = simple_evaluate(
            model="hf",
            model_args={"pretrained": str(path), "dtype": "float32"},
            tasks=list(tasks),
            batch_size=batch_size,
            device="cpu",
            task_manager=manager,
            log_samples=False,
            bootstrap_iters=0,
            verbosity="WARNING",
        )
        scores[name] = {}
        for task in tasks:
            raw = result["results"][task]
            scores[name][task] = {
                key: float(value)
                for key, value in raw.items()
                if "," in key and isinstance(value, (int, float))
            }
        log(f"  scored {name:<16} {time.time() - start:5.1f}s  "
            + "  ".join(f"{t}={_primary(scores[name][t]):.2f}" for t in tasks))
    results = {"scores": scores, "tasks": list(tasks)}
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def _plain(metrics: Mapping[str, float]) -> Dict[str, float]:
    """Drop lm-eval's filter suffix (``"exact_match,none"`` -> ``"exact_match"``) and stderrs."""
    return {
        key.split(",")[0]: float(value)
        for key, value in metrics.items()
        if not key.split(",")[0].endswith("_stderr")
    }


def _primary(metrics: Mapping[str, float]) -> float:
    plain = _plain(metrics)
    for key in ("exact_match", "pass"):
        if key in plain:
            return plain[key]
    return next(iter(plain.values()))


def primary_score(results: dict, model: str, skill: str) -> float:
    """The skill's headline metric (exact match, or the checker's pass rate) for ``model``."""
    metrics = _plain(results["scores"][model][task_name(skill)])
    if METRICS[skill] not in metrics:
        raise KeyError(f"no {METRICS[skill]!r} score for {model} on {task_name(skill)}: {metrics}")
    return metrics[METRICS[skill]]
