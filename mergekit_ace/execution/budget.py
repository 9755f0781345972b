"""How much memory a merge may use on a device.

``MERGEKIT_ACE_MEMORY_BUDGET`` sets it: a fraction of what is free (``0.8``), or an absolute size
(``20GiB``, ``512MiB``, ``2e9``). Default: 0.9 of the free memory (on CUDA: free memory reported by
the driver plus what PyTorch's caching allocator holds but does not use; on the CPU: the kernel's
``MemAvailable``). :func:`set_memory_budget` overrides the variable for this process.
"""

from __future__ import annotations

import os
import re

import torch

ENV_VAR = "MERGEKIT_ACE_MEMORY_BUDGET"
DEFAULT_FRACTION = 0.9
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_override: str | None = None


def parse_size(text: str | int | float) -> float:
    """``'24GiB'`` -> 25769803776.0, ``'512MB'`` -> 5.12e8, ``'2e9'`` -> 2e9 (bytes)."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size (e.g. 24GiB, 512MB, 2e9)")
    return float(match.group(1)) * _UNITS[unit]


def parse_budget(text: str | float) -> tuple:
    """``('fraction', 0.8)`` for a number in (0, 1], else ``('bytes', n)``."""
    if isinstance(text, str) and re.fullmatch(r"\s*[0-9.]+\s*", text) and float(text) <= 1.0:
        value = float(text)
    elif isinstance(text, float) and text <= 1.0:
        value = text
    else:
        return ("bytes", parse_size(text))
    if not 0.0 < value <= 1.0:
        raise ValueError(f"memory budget fraction must be in (0, 1], got {text!r}")
    return ("fraction", value)


def set_memory_budget(value: str | float | None) -> None:
    """Override ``MERGEKIT_ACE_MEMORY_BUDGET`` for this process (``None`` restores it)."""
    global _override
    if value is not None:
        parse_budget(value)  # validate now
    _override = None if value is None else str(value)


def free_memory(device: torch.device) -> int:
    """Bytes a new allocation can get on ``device`` right now."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    if device.type == "cpu":
        try:
            import psutil

            return int(psutil.virtual_memory().available)
        except ImportError:  # pragma: no cover - psutil ships with accelerate
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
    raise ValueError(f"no free-memory query for device {device}")


def memory_budget(device: torch.device, setting: str | float | None = None) -> int:
    """Bytes one weight's merge may allocate on ``device`` (see the module docstring)."""
    setting = setting if setting is not None else (_override or os.environ.get(ENV_VAR) or DEFAULT_FRACTION)
    kind, value = parse_budget(setting)
    if kind == "bytes":
        return int(value)
    return int(value * free_memory(device))
