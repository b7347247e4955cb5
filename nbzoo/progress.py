"""Progress bars that suit where the code runs.

``tqdm.auto`` picks a widget inside any Jupyter kernel, also under papermill and nbval, where
nobody sees the widget and the stored notebook (and GitHub's rendering of it) shows only
``HBox(children=...)``. In a log that is not a terminal, plain ``tqdm`` rewrites its line with
``\\r`` at every refresh, which log files and papermill's ``--log-output`` turn into hundreds
of lines for a long run. :func:`bar` chooses instead:

``widget``   the ``tqdm.notebook`` widget: JupyterLab, VS Code, Colab.
``terminal`` plain ``tqdm`` redrawing one line: an interactive terminal.
``lines``    :class:`LineBar`: whole lines, the final one when the bar closes and, on long work,
             one more every ``NBZOO_PROGRESS_EVERY`` seconds (default 60) — so a saved notebook
             holds one line per training run, and a log of a long run still moves.

``NBZOO_PROGRESS`` = widget | terminal | lines forces a mode; unset or ``auto`` means: ``lines``
on CI (``CI`` set) and inside :func:`headless` (``nbzoo run`` / ``make demo`` wrap papermill in
it; the kernel inherits the variables, which also turn off transformers' own bars); otherwise
``widget`` in a Jupyter kernel with ipywidgets, ``terminal`` on a TTY, ``lines`` anywhere else.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from tqdm import std

MODES = ("auto", "widget", "terminal", "lines")
ENV = "NBZOO_PROGRESS"


def _in_kernel() -> bool:
    """Running inside a Jupyter kernel (not merely in a process that imported ipykernel, as a test
    run that drives notebooks does)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return getattr(shell, "kernel", None) is not None


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def mode() -> str:
    """The mode :func:`bar` uses here and now (see the module docstring)."""
    wanted = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if wanted not in MODES:
        raise ValueError(f"{ENV}={wanted!r}: expected one of {', '.join(MODES)}")
    if wanted != "auto":
        return wanted
    if _ci():
        return "lines"
    if _in_kernel():
        from tqdm import autonotebook

        return "widget" if autonotebook.tqdm is not std.tqdm else "lines"
    return "terminal" if getattr(sys.stderr, "isatty", lambda: False)() else "lines"


class LineBar(std.tqdm):
    """A tqdm that prints whole lines instead of redrawing one with carriage returns: no line at
    the start, one every ``every`` seconds while it runs, and the last one when it closes."""

    def __init__(self, *args: Any, every: float = 60.0, **kwargs: Any) -> None:
        kwargs["miniters"] = 1
        kwargs["mininterval"] = every
        # tqdm's monitor thread lowers miniters after maxinterval seconds without a refresh,
        # which would turn a slow run back into one line per step
        kwargs["maxinterval"] = float("inf")
        kwargs.pop("dynamic_ncols", None)
        kwargs.setdefault("ncols", 100)
        self._printed_n: float | None = None
        self._closing = False
        super().__init__(*args, **kwargs)

    def close(self) -> None:
        self._closing = True
        super().close()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clears a bar that does not stay (leave=False): nothing to clear
            return True
        if msg is None:
            if self.n == self._printed_n:  # close() redraws the last line: print it once
                return True
            if not self._started and not self._closing and self.n == self.initial:
                return True  # the start: nothing to say yet
            self._printed_n = self.n
            msg = self.__str__()
        # The newline goes *before* the line: close() ends the last one with its own "\n".
        self.fp.write(("\n" if self._started else "") + msg)
        self.fp.flush()
        self._started = True
        return True

    _started = False


def bar(*args: Any, **kwargs: Any) -> std.tqdm:
    """A progress bar (same arguments as ``tqdm``) in the mode :func:`mode` picks."""
    chosen = mode()
    if chosen == "widget":
        from tqdm.notebook import tqdm as notebook_tqdm

        kwargs.pop("dynamic_ncols", None)
        return notebook_tqdm(*args, **kwargs)
    if chosen == "lines":
        if _in_kernel():  # stdout: a plain block in the notebook, not a red stderr box
            kwargs.setdefault("file", sys.stdout)
        every = float(os.environ.get("NBZOO_PROGRESS_EVERY", "60"))
        return LineBar(*args, every=every, **kwargs)
    return std.tqdm(*args, **kwargs)


def eval_bar(iterable: Any, desc: str = "evaluate", *, disable: bool = False, **kwargs: Any):
    """A bar over an evaluation loop: it appears only once the loop has run
    ``NBZOO_PROGRESS_EVAL_DELAY`` seconds (default 5; tqdm's ``delay``) and goes when it ends
    (``leave=False``), so the quick evaluations after every epoch leave nothing in a stored
    notebook while a long one (a full dev set on a CPU) shows how far it is."""
    kwargs.setdefault("delay", float(os.environ.get("NBZOO_PROGRESS_EVAL_DELAY", "5")))
    kwargs.setdefault("mininterval", float(os.environ.get("NBZOO_PROGRESS_INTERVAL", "0.5")))
    # a widget bar that goes (leave=False) closes its model, and JupyterLab then shows "Error
    # displaying widget: model not found" where it was: in a live notebook the bar stays
    return bar(iterable, desc=desc, leave=mode() == "widget", disable=disable, **kwargs)


# Set for kernels started inside ``headless()``: our bars print lines, and the bars of
# transformers / huggingface_hub (e.g. "Writing model shards") are off instead of being widgets.
HEADLESS_ENV = {ENV: "lines", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextlib.contextmanager
def headless() -> Iterator[None]:
    """Environment for kernels started inside the block (papermill, nbclient) — see
    ``HEADLESS_ENV``; a variable the user set already is kept. Restored afterwards."""
    added = [name for name in HEADLESS_ENV if name not in os.environ]
    for name in added:
        os.environ[name] = HEADLESS_ENV[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)
