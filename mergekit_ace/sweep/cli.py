"""``mergekit-ace sweep CONFIG.yml``: merge a mergekit config over a grid of method parameters,
score each merge with lm-eval, and write the table, a chart and the best config; see
docs/sweep.md.

Example::

    mergekit-ace sweep ace.yml --grid epsilon=1e-5,1e-3,1e-2 --grid tau=0.3,1e9 \\
        --tasks gsm8k_cot,mathqa --limit 50 --owners owners.yaml --output sweep-out

Exit codes: 0 every point merged and scored; 1 some failed (the others are in the output;
rerun to retry them); 2 bad input; 130/143 interrupted by Ctrl-C/SIGTERM (rerun to continue).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys

from mergekit_ace.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from mergekit_ace.evaluation.cli import add_scoring_arguments

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "Grid values are YAML scalars (1e-5, 0.3, true, add). They go into the config's global "
        "`parameters:` block and replace the same parameter wherever a model or slice sets it. "
        "A rerun with the same output directory skips every point already merged and scored "
        "with the same config and settings."
    )
    parser.add_argument("config", metavar="CONFIG.yml", help="the mergekit config to sweep")
    parser.add_argument("--grid", action="append", default=[], metavar="NAME=V1,V2,...",
                        help="a method parameter and its values (repeat for each parameter; "
                             "the sweep runs every combination)")
    parser.add_argument("--output", required=True, metavar="DIR",
                        help="sweep directory (table.md/.csv, sweep.json, chart.png, best.yml); "
                             "rerunning into it continues where it stopped")
    parser.add_argument("--owners", metavar="FILE",
                        help="which of the config's models owns each task (names: 'base' and "
                             "each model's directory name, or the path as in the config); scores "
                             "base and experts once and enables the normalised metric")
    parser.add_argument("--references", action="store_true",
                        help="score the base and experts (cached) even without --owners")
    parser.add_argument("--metric", default="auto", metavar="auto|normalised|raw|TASK",
                        help="what 'best' means (higher is better): the mean over tasks of the "
                             "score normalised to the experts (default with --owners), of the "
                             "raw primary metric (default without), or one task's primary metric")
    parser.add_argument("--keep-merges", action="store_true",
                        help="keep every merged model (points/<key>/merge); default: one at a time")
    parser.add_argument("--cuda", action="store_true", help="pass --cuda to mergekit-yaml")
    parser.add_argument("--merge-args", default="", metavar="'ARGS'",
                        help="more mergekit-yaml options, one quoted string, e.g. "
                             "'--lazy-unpickle --out-shard-size 1B'")
    add_scoring_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from mergekit_ace.evaluation.cli import progress_on_stderr, scoring_kwargs
    from mergekit_ace.evaluation.runner import Interrupted
    from mergekit_ace.sweep.report import render_markdown
    from mergekit_ace.sweep.runner import run_sweep

    if not args.tasks:
        raise UserError("no tasks given: use --tasks with lm-eval task names or a preset")
    try:
        merge_args = shlex.split(args.merge_args)
    except ValueError as error:
        raise UserError(f"--merge-args {args.merge_args!r}: {error}") from None
    try:
        with progress_on_stderr("mergekit-ace sweep", ("mergekit_ace.sweep", "mergekit_ace.evaluation")):
            content = run_sweep(
                args.config, args.grid, args.tasks, args.output,
                owners=args.owners, references=args.references, metric=args.metric,
                keep_merges=args.keep_merges, cuda=args.cuda, merge_args=merge_args,
                **scoring_kwargs(args),
            )
    except Interrupted as interrupt:
        return 128 + interrupt.signum
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    print(render_markdown(content))
    failed = [r for r in content["points"] if r["status"] != "ok"]
    if failed:
        print(f"mergekit-ace sweep: {len(failed)} of {len(content['points'])} grid points failed; "
              f"rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0
