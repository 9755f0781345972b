"""``mergekit-ace merge CONFIG OUT [mergekit-yaml options] [--resume] [--keep-cache]``: ``mergekit-yaml``
with a resume cache that lives in the output folder.

With ``--resume``, ``MERGEKIT_ACE_CACHE_DIR`` is set to ``OUT/.mergekit-ace-cache``
(mergekit_ace/execution/cache.py): every weight this package's methods merge is stored there as
soon as it is computed, so running the same command again after a kill computes only the missing
weights. After a successful merge the cache is removed (``--keep-cache`` keeps it). Without
``--resume`` this is plain ``mergekit-yaml``. Every other argument goes to ``mergekit-yaml``
unchanged; its exit status is this command's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

from mergekit_ace.errors import UserError
from mergekit_ace.execution.mergekit_yaml import mergekit_yaml_command

CACHE_SUBDIR = ".mergekit-ace-cache"
OWN_FLAGS = ("--resume", "--keep-cache")
MISSING = "mergekit-yaml not found (install mergekit in this environment)"


def add_arguments(parser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("config", help="mergekit YAML config")
    parser.add_argument("out", help="output folder (as for mergekit-yaml)")
    parser.add_argument("mergekit_args", nargs=argparse.REMAINDER,
                        help="mergekit-yaml options (--cuda, --multi-gpu, ...), and --resume (keep every "
                             "merged weight in OUT/.mergekit-ace-cache, so that a rerun after a kill computes "
                             "only what is missing; removed after success) and --keep-cache")


def run(args) -> int:
    own = [a for a in args.mergekit_args if a in OWN_FLAGS]
    passed = [a for a in args.mergekit_args if a not in OWN_FLAGS]
    if not Path(args.config).is_file():
        raise UserError(f"config {args.config!r} not found")
    env = dict(os.environ)
    cache = None
    if "--resume" in own:
        cache = Path(args.out) / CACHE_SUBDIR
        env["MERGEKIT_ACE_CACHE_DIR"] = str(cache)
        earlier = (cache / "log.jsonl").exists()
        print(f"mergekit-ace merge: resume cache {cache}" + (" (resuming)" if earlier else ""), file=sys.stderr)
    command = mergekit_yaml_command(args.config, args.out, passed, missing=MISSING)
    proc = subprocess.Popen(command, env=env)  # (its pid names this run's entries in the cache log)
    code = proc.wait()
    if cache is not None:
        from mergekit_ace.execution.cache import read_log

        last = Counter(r["event"] for r in read_log(cache) if r["pid"] == proc.pid)
        print(f"mergekit-ace merge: {last['loaded']} weights taken from the cache, {last['computed']} computed",
              file=sys.stderr)
        if code == 0 and "--keep-cache" not in own:
            shutil.rmtree(cache, ignore_errors=True)
        elif code != 0:
            print(f"mergekit-ace merge: mergekit-yaml failed (exit {code}); run the same command again to "
                  f"resume from {cache}", file=sys.stderr)
    return code
