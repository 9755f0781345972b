"""How fast this machine is right now, so that benchmark figures from different days can be compared.

The 2-core VM the CPU figures come from is not equally fast every day: the same SciPy
eigendecomposition of a 4096-wide ACE Gram took 12.3 s in one session
(``results-eigh-cpu-2026-12-02.json``) and 8.5 s in the next, hours later, with the same code. A benchmark that
records these figures next to its own lets a reader scale one run to another's day instead of mistaking the
machine's mood for a code change.

    python benchmarks/calibration.py             # prints the figures as JSON
    python benchmarks/calibration.py --cuda

Figures (the median of ``reps`` calls after one warm-up):

* ``gemm_float64_gflops`` / ``gemm_float32_gflops``: an n x n matrix product (2 n^3 flops);
* ``eigh_float64_s``: ``rules.precision.top_eigenpairs`` of an n-wide float64 Wishart Gram, top
  0.3 n + 1 pairs: the call ACE's refinement makes for every weight;
* on Linux, ``steal_fraction``: the share of CPU time the hypervisor gave to other guests while the
  figures were taken (``/proc/stat``), and :func:`cpu_times` / :func:`steal_between` for a whole run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mergekit_ace.rules.precision import top_eigenpairs  # noqa: E402


def cpu_times() -> dict[str, int] | None:
    """The machine's cumulative CPU ticks (``/proc/stat``'s first line): busy, idle and steal;
    None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    ticks += [0] * (8 - len(ticks))
    user, nice, system, idle, iowait, irq, softirq, steal = ticks[:8]
    return dict(busy=user + nice + system + irq + softirq, idle=idle + iowait, steal=steal)


def steal_between(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """Share of the CPU ticks between two :func:`cpu_times` readings that went to other guests."""
    if before is None or after is None:
        return None
    delta = {k: after[k] - before[k] for k in before}
    total = sum(delta.values())
    return delta["steal"] / total if total > 0 else 0.0


def _median_seconds(fn: Callable[[], object], reps: int, sync: Callable[[], None]) -> float:
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_speed(device: str = "cpu", n: int = 4096, reps: int = 3, seed: int = 0) -> dict:
    """The figures of the module docstring, measured on ``device`` with torch's current threads."""
    dev = torch.device(device)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)  # noqa: E731
    g = torch.Generator(device="cpu").manual_seed(seed)
    before = cpu_times()
    out = dict(device=str(dev), n=n, reps=reps, threads=torch.get_num_threads(),
               time=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    for dtype in (torch.float64, torch.float32):
        a = torch.randn(n, n, generator=g, dtype=dtype).to(dev)
        b = torch.randn(n, n, generator=g, dtype=dtype).to(dev)
        seconds = _median_seconds(lambda a=a, b=b: a @ b, reps, sync)
        out[f"gemm_{str(dtype).replace('torch.', '')}_gflops"] = 2 * n ** 3 / seconds / 1e9
        del a, b
    x = torch.randn(n + n // 2, n, generator=g, dtype=torch.float64).to(dev)
    gram = x.T @ x
    del x
    count = int(0.3 * n) + 1
    out["eigh_float64_s"] = _median_seconds(lambda: top_eigenpairs(gram, count), reps, sync)
    out["steal_fraction"] = steal_between(before, cpu_times())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    print(json.dumps(machine_speed("cuda" if args.cuda else "cpu", args.n, args.reps), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
