"""Peak resident memory of a call on the CPU (Linux), for the estimate checks and the benchmarks.

Method: return freed heap memory to the kernel (``malloc_trim``), reset the process's peak RSS
(write ``5`` to ``/proc/self/clear_refs``), read ``VmRSS``, run the call, read ``VmHWM``; the
difference is the call's peak extra resident memory. Run it in a fresh process for clean numbers.
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Callable


def _status(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # pragma: no cover - not glibc
        pass


def available() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        _status("VmHWM")
        return True
    except OSError:
        return False


def peak_extra_rss(fn: Callable[[], object]) -> tuple[object, int]:
    """``(fn(), peak RSS during fn minus RSS before)`` in bytes."""
    _trim()
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status("VmRSS")
    result = fn()
    peak = _status("VmHWM")
    return result, peak - before
