"""Offline data for stock lm-eval tasks: ``--data-dir DIR``.

Every lm-eval task names its data set in its YAML (``dataset_path``, ``dataset_name``, splits)
and loads it with ``datasets.load_dataset(path=dataset_path, name=dataset_name)``. Within
:func:`redirect_datasets`, such a call reads local JSON-lines files instead::

    DIR/<dataset_path>/<dataset_name or "default">/<split>.jsonl

e.g. ``DIR/openai/gsm8k/main/test.jsonl`` or ``DIR/google/IFEval/default/train.jsonl``. The rows
are in the upstream data set's own schema, so the stock task's prompts, filters and metrics run
unchanged. Calls for data sets that are already local (``json``/``csv``/... builders, or an
existing directory) are passed through untouched, so tasks from ``include_path`` keep working.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: ``datasets`` packaged builders: a data set with one of these paths is already local.
LOCAL_BUILDERS = frozenset({"json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder"})


class DataFileMissing(Exception):
    """A file that ``--data-dir`` should hold is not there (message names it)."""


def dataset_dir(data_dir: os.PathLike, dataset_path: str, dataset_name: str | None) -> Path:
    """``data_dir/<dataset_path>/<dataset_name or "default">``."""
    return Path(data_dir) / str(dataset_path) / (dataset_name or "default")


def split_file(
    data_dir: os.PathLike, dataset_path: str, dataset_name: str | None, split: str
) -> Path:
    """``data_dir/<dataset_path>/<dataset_name or "default">/<split>.jsonl``."""
    return dataset_dir(data_dir, dataset_path, dataset_name) / f"{split}.jsonl"


def is_local_dataset(path: Any) -> bool:
    """True for packaged builders (``json``, ...) and existing local directories/files."""
    if path is None:
        return True
    text = str(path)
    return text in LOCAL_BUILDERS or os.path.exists(text)


def required_splits(config: Mapping[str, Any], num_fewshot: int | None = None) -> list[str]:
    """The splits a stock lm-eval task reads, from its (unresolved) YAML config.

    The evaluation split (``test_split``, else ``validation_split``) and, when few-shot examples
    are drawn from the data set (``num_fewshot > 0`` and no fixed ``fewshot_config.samples``),
    the few-shot split (``fewshot_split``, else ``training_split``, else ``validation_split``).
    """
    splits: list[str] = []
    evaluation = config.get("test_split") or config.get("validation_split")
    if evaluation:
        splits.append(str(evaluation))
    shots = config.get("num_fewshot") if num_fewshot is None else num_fewshot
    fewshot_cfg = config.get("fewshot_config") or {}
    if shots and not (isinstance(fewshot_cfg, Mapping) and fewshot_cfg.get("samples")):
        source = (
            config.get("fewshot_split")
            or config.get("training_split")
            or config.get("validation_split")
        )
        if source and str(source) not in splits:
            splits.append(str(source))
    return splits


def check_task_data(
    task: str, config: Mapping[str, Any], data_dir: os.PathLike, num_fewshot: int | None = None
) -> list[Path]:
    """The local files ``task`` will read from ``data_dir``; :class:`DataFileMissing` naming the
    first that is absent. Tasks whose data set is already local need nothing and return ``[]``."""
    path = config.get("dataset_path")
    if is_local_dataset(path) or config.get("custom_dataset"):
        return []
    name = config.get("dataset_name")
    files = [split_file(data_dir, path, name, s) for s in required_splits(config, num_fewshot)]
    for file in files:
        if not file.is_file():
            raise DataFileMissing(
                f"task {task!r} needs {file} (dataset {path!r}, config {name or 'default'!r}, "
                f"split {file.stem!r}) in --data-dir, in the upstream data set's schema, one JSON "
                f"object per line"
            )
    return files


def local_data_files(data_dir: os.PathLike, path: str, name: str | None) -> dict[str, str]:
    """``{split: file}`` for every ``*.jsonl`` under ``data_dir/path/name``; raises
    :class:`DataFileMissing` when there is none."""
    directory = dataset_dir(data_dir, path, name)
    files = {p.stem: str(p) for p in sorted(directory.glob("*.jsonl")) if p.is_file()}
    if not files:
        raise DataFileMissing(
            f"--data-dir has no data for dataset {path!r} (config {name or 'default'!r}): "
            f"expected {directory}/<split>.jsonl"
        )
    return files


@contextlib.contextmanager
def redirect_datasets(data_dir: os.PathLike | None, served: list[dict[str, Any]] | None = None):
    """Within the block, ``datasets.load_dataset(path, name, ...)`` for a Hub data set reads
    ``data_dir/path/name/<split>.jsonl`` (see the module doc). ``data_dir=None`` changes nothing.

    ``served``, when given, gets one entry per call: ``{"dataset", "name", "files"}`` (the local
    files read) or, for a call not redirected, ``{"dataset", "name", "data_files", "revision"}``.
    """
    if data_dir is None and served is None:
        yield
        return
    import datasets

    root = None if data_dir is None else Path(data_dir)
    original = datasets.load_dataset

    def load_dataset(path=None, name=None, *args, **kwargs):
        if root is None or is_local_dataset(path) or args:
            if served is not None:
                served.append({"dataset": path, "name": name,
                               "data_files": kwargs.get("data_files"),
                               "revision": kwargs.get("revision")})
            return original(path, name, *args, **kwargs)
        files = local_data_files(root, path, name)
        ignored = sorted(k for k, v in kwargs.items() if v is not None)
        log.info("--data-dir: %s/%s read from %s (ignoring %s)", path, name, files, ignored)
        if served is not None:
            served.append({"dataset": path, "name": name, "files": sorted(files.values())})
        return original("json", data_files=files)

    datasets.load_dataset = load_dataset
    try:
        yield
    finally:
        datasets.load_dataset = original


def write_jsonl(path: os.PathLike, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Write ``rows`` as JSON lines (UTF-8, non-ASCII kept); create parent directories."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
