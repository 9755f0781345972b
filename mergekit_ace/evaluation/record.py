"""What a result depends on: package versions, each model's identity, data files, and the
settings of one (model, task) cell, which decide whether ``--resume`` may keep it.

* A local model directory is identified by the SHA-256 of its ``config.json`` and a fingerprint
  of every file in it (relative path, size, modification time), so rewritten weights count as a
  new model without hashing gigabytes. A Hub id is identified by the revision asked for
  (``--model-args revision=...``, else ``main``); the commit it resolved to is recorded from
  lm-eval's ``model_sha`` or the local Hub cache.
* Data files are identified by their SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

PACKAGES = ("mergekit-ace", "lm_eval", "mergekit", "torch", "transformers", "datasets")
_HASHES: dict[tuple, str] = {}


def package_versions() -> dict[str, str | None]:
    """``{package: version}`` of the packages a result depends on (None: not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(path: os.PathLike) -> str:
    """SHA-256 of a file's bytes (remembered per path, size and modification time)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASHES[key] = digest.hexdigest()
    return _HASHES[key]


def files_fingerprint(directory: Path) -> str:
    """SHA-256 over (relative path, size, mtime in ns) of every file under ``directory``."""
    rows = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            full = Path(root) / name
            stat = full.stat()
            rows.append([str(full.relative_to(directory)), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def model_identity(path: Path, model_args: Mapping[str, Any]) -> dict[str, Any]:
    """What identifies the model's weights (see the module doc)."""
    path = Path(path)
    if path.is_dir():
        config = path / "config.json"
        return {
            "path": str(path),
            "config_sha256": file_sha256(config) if config.is_file() else None,
            "files_fingerprint": files_fingerprint(path),
        }
    if path.is_file():
        return {"path": str(path), "sha256": file_sha256(path)}
    return {"hub_id": str(path), "revision": str(model_args.get("revision") or "main")}


def hub_commit(identity: Mapping[str, Any], lm_eval_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """For a Hub model: the commit its revision resolved to (lm-eval's ``model_sha`` when it
    could ask the Hub, else the local Hub cache) and the SHA-256 of that commit's config.json."""
    if "hub_id" not in identity:
        return {}
    out: dict[str, Any] = {"commit": (lm_eval_config or {}).get("model_sha") or None}
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(identity["hub_id"], "config.json", revision=identity["revision"])
    except Exception:  # an unusual cache layout: record what lm-eval said
        cached = None
    if isinstance(cached, str) and os.path.isfile(cached):
        out["config_sha256"] = file_sha256(cached)
        if out["commit"] is None and Path(cached).parent.parent.name == "snapshots":
            out["commit"] = Path(cached).parent.name
    return out


def data_files_record(paths: Sequence[os.PathLike]) -> list[dict[str, Any]]:
    """``[{"path", "sha256", "bytes"}]`` for files that exist."""
    out = []
    for path in paths:
        path = Path(path)
        if path.is_file():
            out.append({"path": str(path), "sha256": file_sha256(path), "bytes": path.stat().st_size})
    return out


def config_sha256(config: Mapping[str, Any] | None) -> str | None:
    """SHA-256 of a task's YAML config (as lm-eval's TaskManager indexed it)."""
    if config is None:
        return None
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def normalised(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as it reads back from JSON (tuples as lists, keys as strings)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def settings_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["limit: 2 -> 3", ...]``: the settings that differ (nested keys joined with '.')."""
    changes: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += [f"{key}.{c}" for c in settings_changes(a, b)]
        elif a != b:
            changes.append(f"{key}: {_short(a)} -> {_short(b)}")
    return changes


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]
