"""Score base, experts and merges with lm-evaluation-harness and normalise each merge to the
expert that owns each benchmark (ACE-Merging's Table 9).

``evaluate_models`` (also ``mergekit-ace eval``) runs lm-eval's stock tasks on every model and
writes each (model, task) result into one output directory as soon as it finishes (atomically;
``resume`` keeps finished results, a failing result is recorded and the others go on), then
``results.json``, ``report.md`` and bar charts. See ``docs/evaluation.md``.

Importing this package is cheap; lm-eval, torch and matplotlib load when an evaluation runs.
"""

from mergekit_ace.evaluation.presets import PRESETS, PRIMARY_METRICS, expand_tasks

__all__ = ["evaluate_models", "PRESETS", "PRIMARY_METRICS", "expand_tasks"]


def __getattr__(name):
    if name == "evaluate_models":
        from mergekit_ace.evaluation.runner import evaluate_models

        return evaluate_models
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
