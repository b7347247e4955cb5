"""The tutorial notebooks: where they are, how a name finds one, and the knobs each declares."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nbzoo import paths


class UsageError(Exception):
    """Something the user typed is wrong: reported in one line, exit code 2."""


def notebooks_dir() -> Path:
    return paths.project_root() / "notebooks"


def available_notebooks() -> list[str]:
    # a dot in the stem: a failed run's notebook (01_albert_glue.failed.ipynb), not a tutorial
    return sorted(p.stem for p in notebooks_dir().glob("[0-9][0-9]_*.ipynb") if "." not in p.stem)


def find_notebook(name: str) -> Path:
    """Accept a stem (01_albert_glue), its number (01), a name without its number (albert_glue)
    or a path."""
    stems = available_notebooks()
    if not stems:
        raise UsageError(
            f"no notebooks in {notebooks_dir()}: run nbzoo inside its checkout (or a folder below "
            "it), or set NBZOO_ROOT to the checkout"
        )
    stem = Path(name).stem
    matches = [s for s in stems if stem in (s, *s.split("_", 1))]
    if len(matches) != 1:
        raise UsageError(f"unknown notebook {name!r}; choose one of: {', '.join(stems)}")
    return notebooks_dir() / f"{matches[0]}.ipynb"


def notebook_parameters(path: Path) -> dict[str, dict[str, Any]]:
    """The knobs of the cell tagged ``parameters`` as papermill reads them: name → name,
    inferred_type_name (``Optional[int]``), default and help (the line's comment)."""
    import papermill

    found = papermill.inspect_notebook(str(path))
    if not found:
        raise UsageError(f"{path.name} has no cell tagged 'parameters' with knobs papermill reads")
    return found
