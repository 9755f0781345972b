"""Functional-correctness scoring for code benchmarks (HumanEval, HumanEval+), offline.

lm-eval's ``humaneval`` task scores completions with the Hugging Face ``evaluate`` metric
``code_eval``, which ``evaluate.load`` fetches from the Hub when the task's ``utils.py`` is
imported; offline that import fails. This module provides the same metric, implemented here:

* :func:`estimate_pass_at_k` -- the unbiased pass@k estimator of Chen et al. 2021, "Evaluating
  Large Language Models Trained on Code" (the Codex/HumanEval paper, arXiv:2107.03374, Fig. 3):
  with ``n`` samples of which ``c`` pass, ``pass@k = 1 - C(n-c, k) / C(n, k)``, computed as a
  numerically stable product.
* :func:`run_program` -- runs one program in its own Python process: its own temporary working
  directory, a wall-clock timeout after which the whole process group is killed, a memory limit,
  no network (a fresh network namespace where the kernel allows it, and ``socket`` disabled in any
  case) and destructive functions disabled, as in the HumanEval harness's ``reliability_guard``.
  This limits accidents of model-written code; it is *not* a security boundary against hostile
  code -- run untrusted models inside a container or VM.
* :class:`CodeEvalMetric` -- an object with the ``compute(references, predictions, k)`` interface
  of ``evaluate``'s ``code_eval``; :func:`use_offline_code_eval` puts it where lm-eval's stock
  humaneval ``utils.py`` looks for it, so the stock task (prompts, stop sequences, the
  ``create_test`` filter, the ``pass_at_k`` metric function) runs unchanged.

Nothing here runs unless the caller passed ``allow_code_execution`` (``--allow-code-execution``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

DEFAULT_TIMEOUT = 3.0  # seconds per program, as evaluate's code_eval
DEFAULT_MEMORY_LIMIT = 2 * 1024**3  # bytes of address space per program


class CodeExecutionNotAllowed(RuntimeError):
    """Raised when model-written code would run without ``allow_code_execution``."""


def estimate_pass_at_k(
    num_samples: int | Sequence[int] | np.ndarray,
    num_correct: Sequence[int] | np.ndarray,
    k: int,
) -> np.ndarray:
    """Unbiased pass@k per problem (Chen et al. 2021, arXiv:2107.03374, Fig. 3).

    ``num_samples`` is ``n`` (one int for all problems, or one per problem), ``num_correct`` is
    ``c`` per problem. ``pass@k = 1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)``;
    it is 1 when ``n - c < k`` (every size-k subset holds a passing sample).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    correct = np.asarray(num_correct, dtype=np.int64)
    if np.ndim(num_samples) == 0:
        samples = np.full(correct.shape, int(num_samples), dtype=np.int64)
    else:
        samples = np.asarray(num_samples, dtype=np.int64)
    if samples.shape != correct.shape:
        raise ValueError("num_samples and num_correct have different lengths")
    if np.any(correct < 0) or np.any(correct > samples):
        raise ValueError("need 0 <= num_correct <= num_samples")

    def one(n: int, c: int) -> float:
        if n - c < k:
            return 1.0
        return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))

    return np.array([one(int(n), int(c)) for n, c in zip(samples, correct)], dtype=np.float64)


@dataclass
class ProgramResult:
    """Outcome of one program: ``passed`` iff it exited 0 within the timeout."""

    passed: bool
    status: str  # "passed", "failed", "timed out"
    returncode: int | None
    seconds: float
    output: str  # the last part of stdout+stderr

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "result": self.status,
            "returncode": self.returncode,
            "seconds": round(self.seconds, 3),
            "output": self.output,
        }


# Runs inside the child: isolate the network, set limits, disable destructive calls, then run
# the program as __main__. The program's path is argv[1]; the memory limit argv[2].
_BOOTSTRAP = r"""
import builtins, ctypes, faulthandler, os, resource, shutil, socket, subprocess, sys
path, mem = sys.argv[1], int(sys.argv[2])
source = open(path, encoding="utf-8").read()
# No network: a fresh, empty network namespace when the kernel lets us make one.
CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
try:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        libc.unshare(CLONE_NEWUSER | CLONE_NEWNET)
except Exception:
    pass
# ... and no sockets in any case.
class _NoNetwork(socket.socket):
    def __init__(self, *args, **kwargs):
        raise OSError("network access is disabled while scoring generated code")
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled while scoring generated code")
socket.socket = _NoNetwork
socket.create_connection = socket.getaddrinfo = socket.socketpair = _no_network
if mem > 0:
    for limit in ("RLIMIT_AS", "RLIMIT_DATA"):
        try:
            resource.setrlimit(getattr(resource, limit), (mem, mem))
        except (ValueError, OSError, AttributeError):
            pass
faulthandler.disable()
# As the HumanEval harness's reliability_guard (Chen et al. 2021): no process control, no
# deleting or moving files, no environment changes.
def _disabled(*args, **kwargs):
    raise PermissionError("disabled while scoring generated code")
for name in ("kill", "killpg", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir",
             "setuid", "fork", "forkpty", "rename", "renames", "truncate", "replace", "unlink",
             "fchmod", "fchown", "chmod", "chown", "chroot", "lchown", "execv", "execve",
             "execvp", "spawnv", "spawnve", "popen"):
    if hasattr(os, name):
        setattr(os, name, _disabled)
shutil.rmtree = shutil.move = shutil.chown = _disabled
subprocess.Popen = _disabled
builtins.exit = builtins.quit = None
for name in ("ipdb", "joblib", "resource", "psutil", "tkinter"):
    sys.modules[name] = None
exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
"""


def _child_env(workdir: str) -> dict[str, str]:
    """A minimal environment: no proxies, tokens or Python start-up hooks from the parent."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
    }


def run_program(
    source: str,
    timeout: float = DEFAULT_TIMEOUT,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
    python: str | None = None,
    output_chars: int = 2000,
) -> ProgramResult:
    """Run ``source`` as a Python program in its own sandboxed process; see the module doc.

    The program passes iff it exits with status 0 before ``timeout`` seconds; on timeout its
    whole process group is killed, so a looping program (or one that forks) cannot hang the run.
    """
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="mergekit-ace-code-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(source)
        proc = subprocess.Popen(
            [python or sys.executable, "-I", "-c", _BOOTSTRAP, path, str(int(memory_limit))],
            cwd=workdir,
            env=_child_env(workdir),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole on timeout
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    seconds = time.monotonic() - start
    text = (out or b"").decode("utf-8", errors="replace")[-output_chars:]
    if timed_out:
        return ProgramResult(False, "timed out", None, seconds, text)
    passed = proc.returncode == 0
    return ProgramResult(passed, "passed" if passed else "failed", proc.returncode, seconds, text)


def check_programs(
    programs: Sequence[str],
    timeout: float = DEFAULT_TIMEOUT,
    num_workers: int | None = None,
    memory_limit: int = DEFAULT_MEMORY_LIMIT,
) -> list[ProgramResult]:
    """Run many programs, ``num_workers`` processes at a time (default: the CPU count, max 8)."""
    workers = max(1, min(num_workers or os.cpu_count() or 1, 8, len(programs) or 1))
    if workers == 1:
        return [run_program(p, timeout, memory_limit) for p in programs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_limit), programs))


class CodeEvalMetric:
    """Drop-in for ``evaluate.load("code_eval")``: ``compute(references, predictions, k)``.

    ``predictions[i]`` is the list of candidate programs for problem ``i`` and ``references[i]``
    its test code (for HumanEval ``test + "check(entry_point)"``); candidate ``j`` passes iff
    ``predictions[i][j] + "\\n" + references[i]`` runs without error (see :func:`run_program`).
    Returns ``({"pass@k": mean over problems}, {i: [(j, result dict), ...]})`` as ``code_eval``.
    """

    name = "code_eval"

    def __init__(
        self,
        allow_code_execution: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        num_workers: int | None = None,
        memory_limit: int = DEFAULT_MEMORY_LIMIT,
    ):
        self.allow_code_execution = bool(allow_code_execution)
        self.timeout = float(timeout)
        self.num_workers = num_workers
        self.memory_limit = int(memory_limit)
        self.programs_run = 0

    def compute(
        self,
        references: Sequence[str],
        predictions: Sequence[Sequence[str]],
        k: int | Iterable[int] = (1, 10, 100),
        num_workers: int | None = None,
        timeout: float | None = None,
    ) -> tuple[dict[str, float], dict[int, list]]:
        if not self.allow_code_execution:
            raise CodeExecutionNotAllowed(
                "scoring code benchmarks runs model-generated programs; pass "
                "--allow-code-execution (allow_code_execution=True) to allow it"
            )
        if len(references) != len(predictions):
            raise ValueError("references and predictions have different lengths")
        ks = [k] if isinstance(k, int) else list(k)
        jobs = [
            (i, j, f"{candidate}\n{reference}")
            for i, (reference, candidates) in enumerate(zip(references, predictions))
            for j, candidate in enumerate(candidates)
        ]
        outcomes = check_programs(
            [program for _, _, program in jobs],
            timeout=self.timeout if timeout is None else timeout,
            num_workers=num_workers or self.num_workers,
            memory_limit=self.memory_limit,
        )
        self.programs_run += len(jobs)
        details: dict[int, list] = {i: [] for i in range(len(references))}
        for (i, j, _), outcome in zip(jobs, outcomes):
            details[i].append((j, outcome.as_dict()))
        totals = np.array([len(predictions[i]) for i in range(len(references))])
        correct = np.array([sum(r["passed"] for _, r in details[i]) for i in details])
        scores = {
            f"pass@{kk}": float(estimate_pass_at_k(totals, correct, kk).mean())
            for kk in ks
            if len(totals) and (totals >= kk).all()
        }
        return scores, details


def _code_eval_modules() -> Iterator[object]:
    """Already-imported lm-eval task modules holding a ``code_eval`` metric as ``compute_``."""
    for name, module in list(sys.modules.items()):
        if name.startswith("lm_eval.tasks.") and module is not None:
            metric = getattr(module, "compute_", None)
            if metric is not None and getattr(metric, "name", None) == "code_eval":
                yield module


@contextlib.contextmanager
def use_offline_code_eval(metric: CodeEvalMetric):
    """Within the block, ``evaluate.load("code_eval")`` returns ``metric`` (other metrics load as
    usual), and lm-eval task modules imported earlier get ``metric`` as their ``compute_``.

    lm-eval's stock ``humaneval/utils.py`` calls ``evaluate.load("code_eval")`` when the task is
    loaded and keeps the result in the module global ``compute_`` that its ``pass_at_k`` uses;
    so the stock task scores with ``metric`` and nothing is fetched from the Hub.
    """
    import evaluate

    original_load = evaluate.load

    def load(path, *args, **kwargs):
        if str(path).rstrip("/").split("/")[-1] == "code_eval":
            return metric
        return original_load(path, *args, **kwargs)

    previous = {}
    evaluate.load = load
    try:
        for module in _code_eval_modules():
            previous[module] = module.compute_
            module.compute_ = metric
        yield metric
    finally:
        evaluate.load = original_load
        for module in _code_eval_modules():
            if module.compute_ is metric:
                # Leave a metric that refuses to run, never one that runs code unasked.
                module.compute_ = previous.get(module, CodeEvalMetric(allow_code_execution=False))
