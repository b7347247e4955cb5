"""Shared fixtures. Tests write results, data and checkpoints under tmp_path, never the project's own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is fastest, and immune to a busy machine's scheduling."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def isolated_results(tmp_path, monkeypatch):
    """Point results/ and data/ at a temporary folder for one test."""
    monkeypatch.setenv("NBZOO_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("NBZOO_DATA", str(tmp_path / "data"))
    return tmp_path


def run_python(
    code: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 300
):
    """Run ``code`` in a fresh interpreter of this environment; return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


def bench_script(name: str):
    """A script of bench/ (not a package) imported as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
