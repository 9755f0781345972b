"""Resume an interrupted merge: every merged rule weight is kept on disk as soon as it is computed.

With ``MERGEKIT_ACE_CACHE_DIR=DIR`` set, :func:`cached_execute_rule` (what ``methods/_shared.py``
calls for every weight that takes a rule) looks the weight up in DIR before computing it and
stores it there right after. Rerunning the same ``mergekit-yaml`` command after a kill computes only
the weights that are missing. Unset (the default), it only runs :func:`.executor.execute_rule`.

An entry's key (:func:`entry_key`) is everything that determines the weight's bits: the rule and
ALL the parameters it is called with (a generic dict: a new parameter or method needs no change
here), this package's and torch's versions, the tensor's name, a content fingerprint (BLAKE2b of
the bytes) of the base and of every expert tensor in order with their shapes and dtypes, the output
dtype, the device type, ``MERGEKIT_ACE_MATMUL_DTYPE`` and torch's float32 matmul precision. An
entry is a safetensors file named by the key's hash; it holds the merged weight in the output
dtype and, in its metadata, the whole key (compared on load), a checksum of the weight (checked on
load: a corrupt entry is recomputed and replaced) and what "auto" decided for it (replayed on load
with :func:`.executor.replay_auto_outcome`, so that the weights computed after it take the same
float32/float64 decisions as in an uninterrupted run).

Not in the key: the memory budget and the plan (strategy, row blocks) it leads to. A weight's
result depends on its plan only by rounding (float64 products: ~1e-10 relative; accepted float32
products: within "auto"'s precision contract, 0.3 of the output's rounding), and a merge killed by the OOM killer
must be resumable with a smaller ``MERGEKIT_ACE_MEMORY_BUDGET``. A resumed run is bit for bit an uninterrupted one
when both pick the same plans (same command, budget and machine; docs/execution.md).

Writes are atomic (a temporary file in DIR, fsync, ``os.replace``): a killed write leaves no entry,
only a ``.tmp-PID-*`` file, removed by the next process that uses DIR once PID has ended. A
directory that cannot be created or written (read-only, disk full) logs one warning and the merge
goes on without storing. ``DIR/log.jsonl`` records, one JSON line per weight, whether it was
``computed`` (and stored), ``loaded`` or found ``corrupt``, with the seconds spent; tests and
``benchmarks/resume_cache.py`` read it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

import mergekit_ace
from mergekit_ace.execution import executor
from mergekit_ace.rules.checks import describe

LOG = logging.getLogger(__name__)

CACHE_DIR_ENV = "MERGEKIT_ACE_CACHE_DIR"
#: Test-only: seconds to sleep before computing each weight when the cache is on (default 0), so
#: that a test can kill a tiny merge after some entries exist. Not for users.
TEST_DELAY_ENV = "MERGEKIT_ACE_CACHE_TEST_DELAY_S"
#: Bumped when the entry layout or the key's meaning changes: older entries are then never used.
FORMAT = "1"
LOG_NAME = "log.jsonl"
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"

_lock = threading.Lock()
_dirs: dict[str, dict] = {}  # per cache directory: {"writable": bool}


def cache_dir() -> Path | None:
    """``MERGEKIT_ACE_CACHE_DIR`` as a path, or None (no cache)."""
    value = os.environ.get(CACHE_DIR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """BLAKE2b (128 bits) of a tensor's bytes, in its dtype and row-major order (CPU copy first for
    accelerator tensors). ~1 GB/s on one core; hashlib releases the GIL while hashing."""
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _canonical(value):
    """JSON-able form of a parameter value (dtypes and other objects by their ``str``)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def entry_key(rule_kind: str, base: torch.Tensor, experts: Sequence[torch.Tensor], *, name: str | None,
              out_dtype: torch.dtype, parameters: dict) -> dict:
    """Everything that determines a merged weight's bits (module docstring); ``parameters``: the
    keyword arguments the rule is executed with (``ids``, the inputs' labels, are left out: the
    fingerprints stand for the inputs)."""
    inputs = [dict(shape=list(t.shape), dtype=str(t.dtype), blake2b=tensor_fingerprint(t)) for t in [base, *experts]]
    device = base.device.type
    return dict(
        format=FORMAT,
        mergekit_ace=mergekit_ace.__version__,
        torch=torch.__version__,
        rule=rule_kind,
        name=name,
        parameters=_canonical({k: v for k, v in parameters.items() if k != "ids"}),
        inputs=inputs,
        out_dtype=str(out_dtype),
        device=device,
        matmul_dtype=os.environ.get(executor.MATMUL_DTYPE_ENV, "auto"),
        float32_matmul_precision=torch.get_float32_matmul_precision(),
        cuda_tf32=bool(torch.backends.cuda.matmul.allow_tf32) if device == "cuda" else None,
    )


def _key_text(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"))


def entry_path(directory: Path, key: dict) -> Path:
    """``DIR/<BLAKE2b of the key>.safetensors``."""
    return directory / (hashlib.blake2b(_key_text(key).encode(), digest_size=20).hexdigest() + SUFFIX)


def _output_checksum(tensor: torch.Tensor) -> str:
    return tensor_fingerprint(tensor)


def _state(directory: Path) -> dict:
    """Per-directory state; on first use in this process: create DIR, remove dead processes' temps."""
    with _lock:
        state = _dirs.get(str(directory))
        if state is not None:
            return state
        state = _dirs[str(directory)] = {"writable": True}
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        _disable(directory, state, error)
        return state
    for tmp in directory.glob(TMP_PREFIX + "*"):
        pid = tmp.name[len(TMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            try:
                tmp.unlink()
            except OSError:
                pass
    return state


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _disable(directory: Path, state: dict, error: BaseException) -> None:
    with _lock:
        first = state["writable"]
        state["writable"] = False
    if first:
        LOG.warning("resume cache %s cannot be written (%s); the merge goes on without storing weights "
                    "(a rerun will compute them again)", directory, error)


def _log(directory: Path, state: dict, **record) -> None:
    """Append one JSON line to DIR/log.jsonl (one write of a short line: whole lines, also with
    several threads or processes)."""
    if not state["writable"]:
        return
    line = json.dumps(dict(record, pid=os.getpid(), time=round(time.time(), 3)), sort_keys=True) + "\n"
    try:
        fd = os.open(directory / LOG_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as error:
        _disable(directory, state, error)


def read_log(directory) -> list:
    """The records of ``DIR/log.jsonl``, oldest first (``[]`` when there is none)."""
    path = Path(directory) / LOG_NAME
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_entry(path: Path, key: dict, shape, dtype: torch.dtype):
    """``(weight, metadata)`` of the entry at ``path`` if it is intact and made for ``key``; ``None``
    when there is no entry; raises ValueError when it exists but is corrupt or not for this key."""
    import safetensors.torch

    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        header_len = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8:8 + header_len])["__metadata__"]
        weight = safetensors.torch.load(data)["weight"]
    except Exception as error:  # noqa: BLE001 - any unreadable file is a corrupt entry
        raise ValueError(f"unreadable ({type(error).__name__}: {error})") from error
    if metadata.get("key") != _key_text(key):
        raise ValueError("its key differs")
    if tuple(weight.shape) != tuple(shape) or weight.dtype != dtype:
        raise ValueError(f"shape/dtype {tuple(weight.shape)}/{weight.dtype}, expected {tuple(shape)}/{dtype}")
    if metadata.get("checksum") != _output_checksum(weight):
        raise ValueError("checksum mismatch")
    return weight, metadata


def store_entry(directory: Path, path: Path, key: dict, weight: torch.Tensor, auto_outcome: str | None) -> int:
    """Write ``weight`` atomically to ``path`` (temporary file in DIR, fsync, rename); its size."""
    import safetensors.torch

    weight = weight.detach().cpu().contiguous()
    metadata = dict(key=_key_text(key), checksum=_output_checksum(weight), name=str(key.get("name")),
                    auto_outcome=auto_outcome or "")
    data = safetensors.torch.save({"weight": weight}, metadata=metadata)
    tmp = directory / f"{TMP_PREFIX}{os.getpid()}-{threading.get_ident()}-{path.name}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return len(data)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


def cached_execute_rule(
    rule_kind: str,
    rule: Callable[..., torch.Tensor],
    base: torch.Tensor,
    experts: Sequence[torch.Tensor],
    *,
    name: str | None,
    out_dtype: torch.dtype,
    **parameters,
) -> torch.Tensor:
    """``execute_rule(rule_kind, rule, base, experts, name=name, **parameters).to(out_dtype)``,
    taken from ``MERGEKIT_ACE_CACHE_DIR`` when an intact entry for exactly these inputs and
    parameters exists there, else computed and stored (module docstring). The rule gets
    ``output_dtype=out_dtype``: its precision contract (docs/execution.md, "Precision")."""
    parameters = dict(parameters, output_dtype=out_dtype)
    directory = cache_dir()
    if directory is None:
        return executor.execute_rule(rule_kind, rule, base, experts, name=name, **parameters).to(out_dtype)
    state = _state(directory)
    t0 = time.perf_counter()
    key = entry_key(rule_kind, base, experts, name=name, out_dtype=out_dtype, parameters=parameters)
    path = entry_path(directory, key)
    fingerprint_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    try:
        found = load_entry(path, key, base.shape, out_dtype)
    except ValueError as why:
        LOG.warning("%s: resume cache entry %s is corrupt (%s); recomputing it", describe(name), path.name, why)
        _log(directory, state, event="corrupt", name=name, entry=path.name, reason=str(why))
        found = None
    except OSError as error:  # e.g. a directory that cannot be read at all
        _disable(directory, state, error)
        found = None
    if found is not None:
        weight, metadata = found
        executor.replay_auto_outcome(rule_kind, base, len(experts), metadata.get("auto_outcome") or None,
                                     **parameters)
        _log(directory, state, event="loaded", name=name, entry=path.name, fingerprint_s=round(fingerprint_s, 4),
             load_s=round(time.perf_counter() - t1, 4))
        LOG.debug("%s: taken from the resume cache (%s)", describe(name), path.name)
        return weight.to(base.device)
    delay = float(os.environ.get(TEST_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)
    t2 = time.perf_counter()
    merged = executor.execute_rule(rule_kind, rule, base, experts, name=name, **parameters).to(out_dtype)
    rule_s = time.perf_counter() - t2
    outcome = executor.last_auto_outcome()
    if state["writable"]:
        t3 = time.perf_counter()
        try:
            size = store_entry(directory, path, key, merged, outcome)
        except OSError as error:
            _disable(directory, state, error)
        else:
            _log(directory, state, event="computed", name=name, entry=path.name, auto_outcome=outcome,
                 rule_s=round(rule_s, 4), fingerprint_s=round(fingerprint_s, 4),
                 store_s=round(time.perf_counter() - t3, 4), bytes=size)
    return merged
