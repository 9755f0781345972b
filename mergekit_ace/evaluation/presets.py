"""Task presets and the primary metric of each task.

A *preset* names the benchmark set a paper reports, so ``--tasks ace-llama`` scores what ACE's
Table 9 scores and ``--tasks actmat-olmo`` what the ACTMat paper scores. Everything else given to
``--tasks`` is an lm-eval task (or group/tag) name and is passed to lm-eval unchanged.

The *primary metric* is the one number per task that goes into the normalised table. lm-eval
reports metrics as ``"<metric>,<filter>"`` keys (``"exact_match,strict-match"``,
``"pass@1,create_test"``); the choices below are documented in ``docs/evaluation.md``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: Benchmark sets of the two papers, in the order the papers list them.
PRESETS: Mapping[str, tuple] = {
    # ACE-Merging, Table 9 (Llama experts: Chinese, Vietnamese, math, code).
    "ace-llama": ("xquad_zh", "xquad_vi", "gsm8k_cot", "mathqa", "humaneval"),
    # ACTMat (OLMo experts: code, math, instruction following).
    "actmat-olmo": ("humaneval", "humaneval_plus", "aime24", "aime25", "ifeval"),
}

#: Primary metric per task (lm-eval's ``metric,filter`` key). gsm8k_cot uses the *strict* filter
#: ("The answer is N."), the number lm-eval's own tables and the Open LLM Leaderboard report for
#: chain-of-thought prompting; pass ``--primary-metric gsm8k_cot=exact_match,flexible-extract``
#: for the lenient one.
PRIMARY_METRICS: Mapping[str, str] = {
    "gsm8k": "exact_match,strict-match",
    "gsm8k_cot": "exact_match,strict-match",
    "gsm8k_cot_zeroshot": "exact_match,strict-match",
    "gsm8k_cot_llama": "exact_match,strict-match",
    "mathqa": "acc,none",
    "humaneval": "pass@1,create_test",
    "humaneval_plus": "pass@1,create_test",
    "humaneval_instruct": "pass@1,create_test",
    "humaneval_64": "pass@64,create_test",
    "aime24": "exact_match,none",
    "aime25": "exact_match,none",
    "aime": "exact_match,none",
    "ifeval": "prompt_level_strict_acc,none",
}

#: Preferred metric names, in order, for tasks not listed above (``xquad_*`` gets ``f1``).
_PREFERRED = ("f1", "pass@1", "prompt_level_strict_acc", "exact_match", "acc_norm", "acc")


def expand_tasks(items: Iterable[str]) -> list[str]:
    """Expand presets and comma-separated lists into task names, keeping order, dropping repeats.

    >>> expand_tasks(["ace-llama", "ifeval,gsm8k_cot"])[:2], expand_tasks(["ifeval,ifeval"])
    (['xquad_zh', 'xquad_vi'], ['ifeval'])
    """
    out: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if not name:
                continue
            for task in PRESETS.get(name, (name,)):
                if task not in out:
                    out.append(task)
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def metric_keys(metrics: Mapping[str, object]) -> list[str]:
    """The numeric metric keys of one task's lm-eval result (no stderr, no alias), in order."""
    return [
        key
        for key, value in metrics.items()
        if _is_number(value) and "_stderr" not in key and key not in ("alias", "samples", "sample_len", "sample_count")
    ]


def primary_metric(
    task: str, metrics: Mapping[str, object], overrides: Mapping[str, str] | None = None
) -> str | None:
    """The primary metric key of ``task`` given its lm-eval ``metrics`` dict.

    Order: an explicit override, the table above, a preferred metric name (``f1`` for xquad,
    then ``pass@1``, ..., with the ``none`` filter first), then the first numeric metric.
    ``None`` when the task produced no numeric metric at all.
    """
    keys = metric_keys(metrics)
    for chosen in ((overrides or {}).get(task), PRIMARY_METRICS.get(task)):
        if chosen is None:
            continue
        if chosen in keys:
            return chosen
        # An override may omit the filter: "f1" means "f1,<first filter that has it>".
        matches = [k for k in keys if k.split(",")[0] == chosen]
        if matches:
            return matches[0]
    for name in _PREFERRED:
        matches = [k for k in keys if k.split(",")[0] == name]
        if matches:
            return sorted(matches, key=lambda k: not k.endswith(",none"))[0]
    return keys[0] if keys else None
