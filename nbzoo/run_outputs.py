"""Which executed notebook ``nbzoo run`` may replace, and putting a new one in its place.

A run's notebook goes into an output folder the user names (``--output-dir``, default
``results/``) under the lesson's own name. A file already there is replaced only when it is an
earlier run: stamped by nbzoo and unedited since, or holding exactly the lesson's own cells. A
notebook of the user's by that name is refused before the run starts (:mod:`nbzoo.safe_write`'s
rule for output folders)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from nbzoo import paths, safe_write

WRITER = "nbzoo run"
# the cells papermill adds to a notebook it runs: the injected parameters, a failed run's error cells
PAPERMILL_CELLS = {"injected-parameters", "papermill-error-cell-tag"}


def failed_path(output: Path) -> Path:
    """Where a run that failed in a cell leaves its notebook (with the traceback)."""
    return output.with_name(f"{output.stem}.failed.ipynb")


def _cells_digest(cells: list) -> str:
    return hashlib.sha256(json.dumps(cells, sort_keys=True).encode()).hexdigest()


def _read(path: Path):
    """The notebook as nbformat reads it (each source one string, as the stamp was computed), or
    None for whatever nbformat cannot read as one."""
    import nbformat

    try:
        nb = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
        return nb if isinstance(nb.get("cells"), list) else None
    except Exception:  # noqa: BLE001  (whatever nbformat cannot read is not nbzoo's output)
        return None


def _sources(nb) -> list[tuple[str, str]] | None:
    try:
        return [
            (c["cell_type"], "".join(c["source"]))
            for c in nb["cells"]
            if not PAPERMILL_CELLS & set(c.get("metadata", {}).get("tags", []))
        ]
    except (KeyError, TypeError):
        return None


def stamped(executed: bytes) -> bytes:
    """The executed notebook with nbzoo's stamp in its metadata: the digest of its cells, so that
    a later run knows the file as its own while nobody has edited it."""
    import nbformat

    nb = nbformat.reads(executed.decode("utf-8"), as_version=4)
    nb.metadata["nbzoo"] = {"written_by": WRITER, "cells_sha256": _cells_digest(nb.cells)}
    return nbformat.writes(nb).encode("utf-8")


def earlier_run_of(notebook: Path) -> Callable[[Path], bool]:
    """Recognises a file a new run of ``notebook`` may replace: an output of nbzoo run nobody has
    edited since (its stamp's digest still matches its cells: a run of an older version of the
    notebook too), or an executed copy of this notebook (its cells, less those papermill adds, are
    the notebook's own). Nothing in either is the user's but the outputs of a run."""
    own = _sources(_read(notebook))  # None where the notebook cannot be read

    def recognise(path: Path) -> bool:
        nb = _read(path)
        if nb is None:
            return False
        stamp = (nb.get("metadata") or {}).get("nbzoo") or {}
        if stamp.get("cells_sha256") == _cells_digest(nb["cells"]):
            return True
        return own is not None and _sources(nb) == own

    return recognise


def check_outputs(notebook: Path, output: Path) -> None:
    """Refuse (:class:`safe_write.NotOursError`) when ``output`` or its ``.failed`` twin is a file
    a run of ``notebook`` may not replace."""
    recognise = earlier_run_of(notebook)
    for final in (output, failed_path(output)):
        if (final.exists() or final.is_symlink()) and not (
            safe_write.owns(final) or (final.is_file() and recognise(final))
        ):
            raise safe_write.NotOursError(
                f"{paths.shown(final)} exists and is not an earlier run of {notebook.name} (nbzoo "
                "did not write it, or it was edited since); nbzoo run replaces only its own "
                "outputs: move it away or name another --output-dir"
            )


def install(notebook: Path, executed: Path, final: Path) -> None:
    """The executed notebook in its place, replacing only an earlier run of ``notebook``."""
    safe_write.write_output_file(
        final, stamped(executed.read_bytes()), WRITER, recognise=earlier_run_of(notebook),
        hint="move it away or name another --output-dir",
    )  # fmt: skip
