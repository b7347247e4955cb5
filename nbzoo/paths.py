"""Where results, data and checkpoints live: relative paths resolve against the project root."""

from __future__ import annotations

import os
from pathlib import Path


def project_root() -> Path:
    """$NBZOO_ROOT, else the nearest folder above the working directory holding notebooks/ and
    nbzoo/ (so a notebook run from notebooks/ writes to the same results/ as `make demo`), else
    the working directory."""
    if env := os.environ.get("NBZOO_ROOT"):
        return Path(env).resolve()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "notebooks").is_dir() and (folder / "nbzoo").is_dir():
            return folder
    return here


def resolve(path: str | os.PathLike) -> Path:
    """A user path: absolute and ~ paths as given, relative ones under the project root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else project_root() / p


def results_dir(override: str | os.PathLike | None = None) -> Path:
    """Where results go: ``override`` when given, else $NBZOO_RESULTS, else results/."""
    return resolve(override or os.environ.get("NBZOO_RESULTS", "results"))


def data_dir() -> Path:
    return resolve(os.environ.get("NBZOO_DATA", "data"))


def shown(path: str | os.PathLike) -> str:
    """``path`` as a reader of this project sees it: relative to the project root where it lies
    inside, else as given."""
    try:
        return str(Path(path).resolve().relative_to(project_root()))
    except ValueError:
        return str(path)
