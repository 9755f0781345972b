"""Run ``mergekit-yaml`` in this process, as the command would, and record what the merge cost.

    python benchmarks/merge_probe.py RESULT.json -- CONFIG.yml OUT_DIR [mergekit-yaml options]

Writes RESULT.json (also when the merge fails): wall time; time in mergekit's tensor loading
(``LoadTensor``), in writing (``SaveTensor`` and the final flush) and in this package's rules
(``execute_rule``, for ace/actmat); the rest ("other": mergekit's own arithmetic for other
methods, planning, the model card); peak RSS (VmHWM), the peaks of anonymous RSS (sampled every
0.1 s: the process's own allocations) and of file-backed RSS (the pages of the safetensors shards it
maps, clean page cache the kernel can reclaim); on CUDA
``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``; OOM retries, CPU fallbacks and
float64 recomputations of this package's executor. While the merge runs, a partial record
(``"partial": true``) replaces RESULT.json every minute (``MERGE_PROBE_CHECKPOINT_S`` seconds). On CUDA every timed
section ends with a ``torch.cuda.synchronize()`` so that asynchronous work is charged to the section that queued it.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import threading
import time
import traceback
from pathlib import Path


def _status_kib(*fields: str) -> dict:
    """The named ``/proc/self/status`` fields in KiB (0 where absent)."""
    out = dict.fromkeys(fields, 0)
    with open("/proc/self/status") as fh:
        for line in fh:
            key = line.split(":", 1)[0]
            if key in out:
                out[key] = int(line.split()[1])
    return out


class _Sampler(threading.Thread):
    """Every 0.1 s: the peaks of anonymous RSS (the process's own allocations) and of file-backed
    RSS (pages of memory-mapped files, here the input shards). Every ``checkpoint_s`` it calls
    ``checkpoint()`` (the probe writes a partial record, so a run killed with SIGKILL, or a session
    that ends, still leaves what it measured)."""

    def __init__(self, checkpoint=None, checkpoint_s: float = 60.0):
        super().__init__(daemon=True)
        self.peak_anon = 0
        self.peak_file = 0
        self.stop = threading.Event()
        self.checkpoint, self.checkpoint_s = checkpoint, checkpoint_s

    def run(self):
        last = time.monotonic()
        while not self.stop.is_set():
            kib = _status_kib("RssAnon", "RssFile")
            self.peak_anon = max(self.peak_anon, kib["RssAnon"])
            self.peak_file = max(self.peak_file, kib["RssFile"])
            if self.checkpoint is not None and time.monotonic() - last >= self.checkpoint_s:
                last = time.monotonic()
                try:
                    self.checkpoint()
                except Exception:  # noqa: BLE001 - a failed checkpoint must not stop the sampling
                    traceback.print_exc()
            self.stop.wait(0.1)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far: on a shared machine, a figure that other
    processes' load inflates much less than the wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv):
    if "--" not in argv or argv.index("--") != 1:
        raise SystemExit(__doc__)
    result_path, mk_args = Path(argv[0]), argv[2:]
    import torch

    cuda = torch.cuda.is_available()

    def sync():
        if cuda and torch.cuda.is_initialized():
            torch.cuda.synchronize()

    times = {"load": 0.0, "write": 0.0, "rule": 0.0}
    counts = {"load": 0, "write": 0, "rule": 0}

    def timed(section, fn, on_success=None):
        """``fn`` with its time added to ``section``; ``on_success(args, kwargs, seconds)`` after
        each call that returned."""
        def wrapper(*a, **kw):
            start = time.perf_counter()
            returned = False
            try:
                out = fn(*a, **kw)
                returned = True
                return out
            finally:
                sync()
                seconds = time.perf_counter() - start
                times[section] += seconds
                counts[section] += 1
                if returned and on_success is not None:
                    on_success(a, kw, seconds)
        return wrapper

    import mergekit.io.tasks as io_tasks
    import mergekit.merge_methods  # noqa: F401 - registers ace/actmat (the package's import hook)
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    import mergekit_ace
    from mergekit_ace.execution import executor
    from mergekit_ace.rules import precision

    mergekit_ace.register_methods()
    io_tasks.LoadTensor.execute = timed("load", io_tasks.LoadTensor.execute)
    io_tasks.SaveTensor.execute = timed("write", io_tasks.SaveTensor.execute)
    io_tasks.FinalizeModel.execute = timed("write", io_tasks.FinalizeModel.execute)
    per_weight = []  # [name, shape, seconds] of every weight the package's rules merged
    # methods/_shared.py reaches the executor through execution/cache.py, which calls it as
    # executor.execute_rule (weights taken from a resume cache are not rule calls)
    executor.execute_rule = timed("rule", executor.execute_rule, lambda a, kw, seconds: per_weight.append(
        [kw.get("name"), list(a[2].shape), round(seconds, 4)]))

    def stop(signum, frame):  # a run stopped from outside still leaves its record (ok: false)
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    start = time.perf_counter()

    def make_record(wall, error, partial=False):
        record = {
            "argv": mk_args,
            "ok": error is None and not partial,
            "partial": partial,
            "error": "still running (partial record)" if partial else error,
            "wall_s": wall,
            "load_s": times["load"],
            "write_s": times["write"],
            "rule_s": times["rule"],
            "other_s": wall - times["load"] - times["write"] - times["rule"],
            "loads": counts["load"],
            "rule_calls": counts["rule"],
            "cpu_s": cpu_seconds(),  # user + system time of the merge process, all threads
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_anon_rss_bytes": sampler.peak_anon * 1024,
            "peak_file_rss_bytes": sampler.peak_file * 1024,
            "oom_retries": executor.oom_retry_count(),
            "cpu_fallbacks": executor.fallback_count(),
            "float64_recomputes": precision.float64_recompute_count(),
            "precision_counts": precision.precision_counts(),
            "per_weight": list(per_weight),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        if cuda and torch.cuda.is_initialized():
            record.update(cuda_device=torch.cuda.get_device_name(),
                          cuda_max_allocated_bytes=torch.cuda.max_memory_allocated(),
                          cuda_max_reserved_bytes=torch.cuda.max_memory_reserved())
        return record

    def write(record):  # whole or not at all: a reader never sees a half-written record
        tmp = result_path.with_name(result_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        tmp.replace(result_path)

    def write_partial():
        write(make_record(time.perf_counter() - start, None, partial=True))

    sampler = _Sampler(write_partial, float(os.environ.get("MERGE_PROBE_CHECKPOINT_S", "60")))
    sampler.start()
    error = None
    try:
        mergekit_yaml(mk_args, standalone_mode=False)
    except BaseException as exc:  # noqa: BLE001 - recorded, then re-raised as the exit status
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    wall = time.perf_counter() - start
    sampler.stop.set()
    sampler.join()
    write(make_record(wall, error))
    return 0 if error is None else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
