"""``mergekit-ace eval``: score base, experts and merges with lm-eval; see docs/evaluation.md.

Example::

    mergekit-ace eval --model base=/m/base --model zh=/m/zh --model ace=/m/merged \\
        --tasks ace-llama --owners owners.yaml --base base --allow-code-execution --output out/

Exit codes: 0 all (model, task) cells scored; 1 some failed (one line each on stderr; the others
are in the output); 2 bad input; 130/143 interrupted by Ctrl-C/SIGTERM (rerun with --resume).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys

from mergekit_ace.errors import UserError


def _model_pair(text: str):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _limit(text: str):
    try:
        value = float(text) if "." in text or "e" in text.lower() else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("--limit must be > 0 (an item count, or a fraction < 1)")
    return value


def _batch_size(text: str):
    if text == "auto" or text.startswith("auto:"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError("--batch-size must be >= 1")
    return value


def _task_metric(text: str):
    task, sep, metric = text.partition("=")
    if not sep or not task or not metric:
        raise argparse.ArgumentTypeError(f"expected TASK=METRIC, got {text!r}")
    return task, metric


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """The lm-eval options that ``eval`` and ``sweep`` share (see :func:`scoring_kwargs`)."""
    parser.add_argument("--tasks", action="append", default=[], metavar="LIST",
                        help="comma-separated lm-eval task names and/or presets (repeatable)")
    parser.add_argument("--limit", type=_limit, help="items per task (or a fraction < 1)")
    parser.add_argument("--num-fewshot", type=int, help="override the tasks' few-shot count")
    parser.add_argument("--batch-size", type=_batch_size, default=1, help="int or 'auto'")
    parser.add_argument("--backend", choices=("hf", "vllm"), default="hf")
    parser.add_argument("--model-args", default=None, metavar="K=V,...",
                        help="extra lm-eval model arguments for every model, e.g. dtype=bfloat16")
    parser.add_argument("--tensor-parallel-size", type=int, help="vLLM tensor parallel size")
    parser.add_argument("--data-parallel-size", type=int, help="vLLM data parallel size")
    parser.add_argument("--device", default=None,
                        help="torch device for the hf backend (default: lm-eval's choice)")
    parser.add_argument("--gen-kwargs", default=None, metavar="K=V,...",
                        help="generation overrides for generate_until tasks, e.g. max_gen_toks=256")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="format prompts with the model's chat template")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="read data sets from DIR/<dataset_path>/<dataset_name|default>/<split>.jsonl")
    parser.add_argument("--include-path", action="append", metavar="DIR",
                        help="directory of extra lm-eval task YAMLs (repeatable)")
    parser.add_argument("--allow-code-execution", action="store_true",
                        help="allow running model-generated code (required for HumanEval)")
    parser.add_argument("--code-timeout", type=float, default=3.0, metavar="SECONDS",
                        help="time limit per generated program (default 3)")
    parser.add_argument("--primary-metric", action="append", type=_task_metric, default=[],
                        metavar="TASK=METRIC", help="override a task's primary metric")
    parser.add_argument("--bootstrap-iters", type=int, default=100000,
                        help="lm-eval's bootstrap iterations for stderrs (0 = none)")
    parser.add_argument("--seed", type=int, default=0)


def scoring_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of ``evaluate_models`` set by :func:`add_scoring_arguments`."""
    include = args.include_path
    return dict(
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        backend=args.backend,
        model_args=args.model_args,
        data_dir=args.data_dir,
        include_path=include if include is None or len(include) > 1 else include[0],
        allow_code_execution=args.allow_code_execution,
        device=args.device,
        gen_kwargs=args.gen_kwargs,
        primary_metrics=dict(args.primary_metric) or None,
        tensor_parallel_size=args.tensor_parallel_size,
        data_parallel_size=args.data_parallel_size,
        code_timeout=args.code_timeout,
        apply_chat_template=args.apply_chat_template,
        bootstrap_iters=args.bootstrap_iters,
        seed=args.seed,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "presets: ace-llama = xquad_zh,xquad_vi,gsm8k_cot,mathqa,humaneval; "
        "actmat-olmo = humaneval,humaneval_plus,aime24,aime25,ifeval. "
        "Multi-GPU: --backend vllm --tensor-parallel-size N / --data-parallel-size N, or "
        "`accelerate launch -m mergekit_ace.cli eval ...` with the hf backend."
    )
    parser.add_argument("--model", dest="models", action="append", type=_model_pair, default=[],
                        metavar="NAME=PATH", help="a model to score (repeat for each model)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="result directory (results.json, report.md, charts, lm-eval logs)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing --output directory")
    parser.add_argument("--resume", action="store_true",
                        help="keep the (model, task) results in --output computed with the same "
                             "settings; compute the rest and the failed ones")
    parser.add_argument("--log-samples", action="store_true",
                        help="write lm-eval's per-sample outputs (prompt, response, score) per cell")
    parser.add_argument("--owners", metavar="FILE",
                        help="JSON/YAML file mapping each task to the model that owns it "
                             "(or each model to its tasks); enables the normalised table")
    parser.add_argument("--base", metavar="NAME", help="the base model's name (for the report)")
    add_scoring_arguments(parser)


def _models(pairs: list[tuple]) -> dict[str, str]:
    models: dict[str, str] = {}
    for name, path in pairs:
        if name in models:
            raise UserError(f"model name {name!r} given twice")
        models[name] = path
    return models


@contextlib.contextmanager
def progress_on_stderr(prefix: str = "mergekit-ace eval", loggers=("mergekit_ace.evaluation",)):
    """The run's own log (cells skipped, scored, failed; generation capped) on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix}: %(message)s"))
    saved = []
    for name in loggers:
        logger = logging.getLogger(name)
        saved.append((logger, logger.level, logger.propagate))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, level, propagate in saved:
            logger.removeHandler(handler)
            logger.setLevel(level)
            logger.propagate = propagate


def run(args: argparse.Namespace) -> int:
    from mergekit_ace.evaluation.runner import Interrupted, evaluate_models
    from mergekit_ace.evaluation.summary import failure_line

    if not args.models:
        raise UserError("no models given: use --model NAME=PATH (once per model)")
    if not args.tasks:
        raise UserError("no tasks given: use --tasks with lm-eval task names or a preset")
    try:
        with progress_on_stderr():
            content = evaluate_models(
                _models(args.models),
                args.tasks,
                args.output,
                owners=args.owners,
                base=args.base,
                overwrite=args.overwrite,
                resume=args.resume,
                **scoring_kwargs(args),
                log_samples=args.log_samples,
            )
    except Interrupted as interrupt:
        return 128 + interrupt.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    if not content:  # not the main process of a distributed run
        return 0
    summary = {m: {t: content["raw"][m][t] for t in content["tasks"]} for m in content["raw"]}
    print(json.dumps({"output": str(args.output), "scores": summary,
                      "failed": [[f["model"], f["task"]] for f in content["failures"]]},
                     indent=2), file=sys.stdout)
    if content["failures"]:
        total = sum(len(row) for row in content["status"].values())
        print(f"mergekit-ace eval: {len(content['failures'])} of {total} (model, task) cells "
              f"failed; the other results are in {args.output}; rerun the same command with "
              "--resume to retry the failed ones:", file=sys.stderr)
        for failure in content["failures"]:
            print(f"mergekit-ace eval: failed: {failure_line(failure)}", file=sys.stderr)
        return 1
    return 0
