"""The names in a sweep's output directory (the tree is drawn in :mod:`mergekit_ace.sweep.runner`)
and the one way the sweep removes what it wrote there."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

POINTS_DIR = "points"
REFERENCE_DIR = "reference"
POINT_FILE = "point.json"
SWEEP_FILE = "sweep.json"
BEST_FILE = "best.yml"
MERGE_DIR = "merge"
MERGE_TMP = ".merge.tmp-"
MERGE_MODEL_NAME = "merge"


def remove(path: Path) -> None:
    """Remove a directory tree or a file; an absent one is fine."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
