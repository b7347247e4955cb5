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


def probe_project(root: Path, code: str, parameters: str) -> dict[str, str]:
    """A project (NBZOO_ROOT) whose one notebook 01_probe declares ``parameters`` and runs
    ``code``; its kernel (and any torchrun and ranks it starts) import the tests' jobs from this
    checkout. Returns the environment that points a run there."""
    import nbformat

    (root / "nbzoo").mkdir(parents=True)
    (root / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(parameters)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(code)]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, root / "notebooks" / "01_probe.ipynb")
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p)
    return {"NBZOO_ROOT": str(root), "PYTHONPATH": path}


# a BERT small enough for a test to train in a second (06's backend)
TINY_BERT = {
    "vocab_size": 40,
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 24,
}
