"""For every test run, notebooks included: the kernels the tests start check each figure a cell
draws (tests/figure_check.py), through an IPython startup file in a profile of the run's own."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent

STARTUP = f"""\
import sys
sys.path.insert(0, {str(ROOT)!r})
from tests import figure_check
figure_check.install()
"""


def pytest_configure(config):
    folder = Path(tempfile.mkdtemp(prefix="nbzoo-ipython-"))
    startup = folder / "profile_default" / "startup"
    startup.mkdir(parents=True)
    (startup / "00-nbzoo-figure-check.py").write_text(STARTUP, encoding="utf-8")
    config._nbzoo_ipython_dir = folder
    os.environ["IPYTHONDIR"] = str(folder)


def pytest_unconfigure(config):
    import shutil

    folder = getattr(config, "_nbzoo_ipython_dir", None)
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
