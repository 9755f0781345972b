"""Run mergekit's own ``mergekit-yaml`` command in a subprocess, exactly as a user would.

One place for what every caller needs: the executable (:func:`mergekit_yaml_executable`), the
command line (:func:`mergekit_yaml_command`), the subprocess's environment
(:func:`subprocess_env`) and the run itself, its output into a log file or captured, with its
wall time (:func:`run_mergekit_yaml`). Used by the demo (``demo/merges.py``), the sweep
(``sweep/runner.py``), ``mergekit-ace merge`` (``execution/merge_cli.py``) and the tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from mergekit_ace.errors import UserError

PathLike = str | Path

MISSING = "mergekit-yaml not found: install mergekit (pip install 'mergekit>=0.1.5') in this environment"


def mergekit_yaml_executable(missing: str = MISSING) -> str:
    """The ``mergekit-yaml`` next to the running interpreter (the venv's), else the one on PATH;
    neither: :class:`UserError` with the message ``missing``."""
    candidate = Path(sys.executable).parent / "mergekit-yaml"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mergekit-yaml")
    if found:
        return found
    raise UserError(missing)


def mergekit_yaml_command(config: PathLike, out: PathLike, extra_args: Sequence[str] = (), *,
                          missing: str = MISSING) -> list[str]:
    """``[mergekit-yaml, CONFIG, OUT, *extra_args]`` with the executable of
    :func:`mergekit_yaml_executable`."""
    return [mergekit_yaml_executable(missing), str(config), str(out), *extra_args]


def subprocess_env(offline: bool = True) -> dict[str, str]:
    """This process's environment for the merge subprocess, which then imports the same
    ``mergekit_ace`` as this process (its package root first on ``PYTHONPATH``; the installed
    package's ``.pth`` hook registers our methods). With ``offline``, ``HF_HUB_OFFLINE``,
    ``HF_DATASETS_OFFLINE`` and ``TOKENIZERS_PARALLELISM=false`` are set unless already set."""
    import mergekit_ace

    env = dict(os.environ)
    package_root = str(Path(mergekit_ace.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if offline:
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_mergekit_yaml(command: Sequence[str], *, env: Mapping[str, str] | None = None,
                      log_file: PathLike | None = None,
                      timeout: float | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``command`` (from :func:`mergekit_yaml_command`) to its end; return the process result
    and its wall time in seconds.

    With ``log_file``, the file gets the line ``$ <command>`` and then the process's stdout and
    stderr (the result's ``stdout``/``stderr`` are None); without, both are captured as text in
    the result. ``env`` None: this process's environment. An interrupt or ``timeout`` kills the
    process (as ``subprocess.run`` does) and propagates.
    """
    command = [str(part) for part in command]
    environment = None if env is None else dict(env)
    start = time.time()
    if log_file is None:
        proc = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    else:
        with open(log_file, "w", encoding="utf-8") as handle:
            handle.write("$ " + " ".join(command) + "\n")
            handle.flush()
            proc = subprocess.run(command, env=environment, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout)
    return proc, time.time() - start
