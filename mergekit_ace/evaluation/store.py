"""The output directory of ``mergekit-ace eval``: one directory per (model, task) *cell*, written
atomically as soon as the cell finishes; the summary files are rebuilt from the cells.

::

    OUT/
      results.json, report.md, scores_*.png       rebuilt from the cells at the end of every run
      cells/<model>/<task>/cell.json              the cell: settings, status, scores or error
      cells/<model>/<task>/lm_eval/results_<date>.json           lm-eval's output for the cell
      cells/<model>/<task>/lm_eval/samples_<task>_<date>.jsonl   with --log-samples

A cell is assembled in a temporary directory beside its place (``cell.json`` written last) and
renamed into place, so a cell directory is complete or absent; a replaced cell is renamed aside
first and deleted once the new one is in place. Files at OUT's top are written to a temporary
file and renamed over the old one. Leftover temporaries of a killed run are removed by the next.

With ``overwrite`` and an existing non-empty OUT, the run writes into a new directory beside OUT,
which replaces OUT when its first cell is written; until then OUT is left as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mergekit_ace.errors import UserError

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
CELLS_DIR = "cells"
CELL_FILE = "cell.json"
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
_SAFE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block completes it is renamed to
    ``path`` (atomically replacing an old file), else deleted. Readers never see a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes it private; results are ordinary files
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    with replacing(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_json_atomic(path: str | Path, content: Any) -> Path:
    return write_atomic(path, json.dumps(content, indent=2, ensure_ascii=False) + "\n")


def replace_directory(staging: Path, target: Path) -> None:
    """Move the finished ``staging`` directory to ``target``; an old ``target`` is renamed aside
    first and deleted only once the new one is in place (restored if the move fails)."""
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_MARK}", dir=target.parent))
        backup.rmdir()
        os.rename(target, backup)
    try:
        os.rename(staging, target)
    except BaseException:
        if backup is not None:
            os.rename(backup, target)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def safe_name(name: str) -> str:
    """A file name for a task name: itself when it is plain, else a cleaned form plus a hash."""
    if _SAFE_RE.match(name) and len(name) <= 120:
        return name
    cleaned = re.sub(r"[^A-Za-z0-9._+-]", "_", name)[:80].lstrip("._") or "task"
    return f"{cleaned}-{hashlib.sha256(name.encode()).hexdigest()[:10]}"


def _make_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


class OutputStore:
    """OUT on disk (see the module doc). ``write=False`` (a non-main process of a distributed
    run) reads only and writes nothing."""

    def __init__(self, target: Path, *, resume: bool, overwrite: bool, write: bool = True):
        self.target = Path(target)
        self.resume = resume
        self.overwrite = overwrite
        self.write = write
        self._staging_root: Path | None = None  # overwrite: the new OUT until its first cell
        self._created = False  # OUT did not exist (or was empty) before this run

    # ---- opening
    @staticmethod
    def check_target(target: Path, resume: bool, overwrite: bool) -> None:
        """Refuse a target the options do not allow (before anything is loaded)."""
        if resume and overwrite:
            raise UserError("--resume and --overwrite contradict each other: --resume keeps the "
                            "finished results in --output, --overwrite replaces them")
        if target.exists() and not target.is_dir():
            raise UserError(f"--output {target} exists and is not a directory")
        if not target.is_dir() or not any(target.iterdir()):
            return
        ours = (target / RESULTS_FILE).exists() or (target / CELLS_DIR).is_dir()
        if resume and not ours:
            raise UserError(f"--output {target} holds files that are not `mergekit-ace eval` "
                            "results (no results.json, no cells/); --resume needs a previous run's "
                            "output directory")
        if not resume and not overwrite:
            what = "results" if ours else "files"
            raise UserError(f"--output {target} already holds {what}; pass --resume to keep the "
                            "finished results and compute the rest, or --overwrite to replace them")

    def open(self) -> None:
        """Remove temporaries a killed run left; with ``overwrite`` of a non-empty OUT, prepare
        the new directory beside it."""
        if not self.write:
            return
        self.target.parent.mkdir(parents=True, exist_ok=True)
        if self.overwrite and self.target.is_dir() and any(self.target.iterdir()):
            self._staging_root = Path(
                tempfile.mkdtemp(prefix=f".{self.target.name}{TMP_MARK}", dir=self.target.parent))
            os.chmod(self._staging_root, 0o777 & ~_umask())
            log.info("--overwrite: the new results replace %s when the first cell finishes",
                     self.target)
        else:
            self._created = not self.target.is_dir() or not any(self.target.iterdir())
            self.target.mkdir(parents=True, exist_ok=True)
            self._remove_temporaries(self.target)

    @staticmethod
    def _remove_temporaries(root: Path) -> None:
        cells = root / CELLS_DIR
        found = [p for p in root.glob(f".*{TMP_MARK}*")]
        if cells.is_dir():
            for model_dir in cells.iterdir():
                if model_dir.is_dir():
                    found += [p for p in model_dir.iterdir()
                              if p.name.startswith(".") and (TMP_MARK in p.name or OLD_MARK in p.name)]
        for path in found:
            log.info("removing %s, left by an interrupted run", path)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    @property
    def root(self) -> Path:
        """Where results go now: OUT, or (overwrite, before the first cell) the new directory."""
        return self._staging_root or self.target

    # ---- cells
    def cell_dir(self, model: str, task: str, root: Path | None = None) -> Path:
        return (root or self.root) / CELLS_DIR / model / safe_name(task)

    def read_cell(self, model: str, task: str) -> dict[str, Any] | None:
        """The stored cell of ``(model, task)`` in OUT, or None (absent or unreadable)."""
        path = self.cell_dir(model, task, self.target) / CELL_FILE
        if self._staging_root is not None or not path.is_file():
            return None
        try:
            cell = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            log.warning("ignoring %s: %s", path, error)
            return None
        if cell.get("model") != model or cell.get("task") != task:
            return None
        return cell

    def begin_cell(self, model: str, task: str) -> Path | None:
        """A new temporary directory for the cell's files (None when not writing)."""
        if not self.write:
            return None
        parent = _make_dir(self.root / CELLS_DIR / model)
        staging = Path(tempfile.mkdtemp(prefix=f".{safe_name(task)}{TMP_MARK}", dir=parent))
        os.chmod(staging, 0o777 & ~_umask())
        return staging

    def commit_cell(self, staging: Path | None, cell: dict[str, Any]) -> Path | None:
        """Write ``cell.json`` into ``staging`` and move it into place; return the cell's dir."""
        if staging is None:
            return None
        write_json_atomic(staging / CELL_FILE, cell)
        final = self.cell_dir(cell["model"], cell["task"])
        replace_directory(staging, final)
        if self._staging_root is not None:  # overwrite: the new OUT replaces the old one now
            replace_directory(self._staging_root, self.target)
            self._staging_root = None
            final = self.cell_dir(cell["model"], cell["task"])
        return final

    @staticmethod
    def discard(staging: Path | None) -> None:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)

    def has_cells(self) -> bool:
        """True once this run (or, resuming, an earlier one) has a cell in OUT."""
        if not self.write or self._staging_root is not None:
            return False
        return any((self.target / CELLS_DIR).glob(f"*/*/{CELL_FILE}"))

    def close(self) -> None:
        """Forget an overwrite directory that never got a cell (OUT stays as it was); remove
        the empty directories of a new OUT that got nothing."""
        if self._staging_root is not None:
            shutil.rmtree(self._staging_root, ignore_errors=True)
            self._staging_root = None
        if self._created and self.target.is_dir() and not self.has_cells():
            cells = self.target / CELLS_DIR
            for empty in [*cells.glob("*"), cells, self.target]:
                with contextlib.suppress(OSError):
                    empty.rmdir()  # only when empty
