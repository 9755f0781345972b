"""``mergekit-ace``: a thin command line over the package's subcommands.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
modules are imported only when their subcommand runs, so ``mergekit-ace --help`` stays fast.
"""

import argparse
import importlib
import sys

from mergekit_ace.errors import UserError

# name -> (module, one-line help)
SUBCOMMANDS = {
    "eval": ("mergekit_ace.evaluation.cli", "score models with lm-eval and normalise merges to their experts"),
    "merge": ("mergekit_ace.execution.merge_cli",
              "mergekit-yaml, with --resume: a rerun after a kill computes only the missing weights"),
    "plan": ("mergekit_ace.execution.plan_cli", "dry-run a merge config: per-weight strategy, memory and time"),
    "inspect": ("mergekit_ace.analysis.inspect", "per-weight ACE/ACTMat diagnostics for a base and its experts"),
    "sweep": ("mergekit_ace.sweep.cli",
              "merge a config over a grid of method parameters, score each merge, keep the best"),
    "demo": ("mergekit_ace.demo.pipeline", "train tiny experts, merge them every way, score them"),
    "study": ("mergekit_ace.demo.study",
              "the demo over several seeds and merge variants, against the real covariances"),
}



def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mergekit-ace", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module_name)
        # Arguments are attached lazily below, once we know which subcommand runs.
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # Find the chosen subcommand without importing the others.
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    if chosen is not None:
        module = importlib.import_module(SUBCOMMANDS[chosen][0])
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        module.add_arguments(subparsers.choices[chosen])
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        return int(module.run(args) or 0)
    except UserError as error:
        print(f"mergekit-ace {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
