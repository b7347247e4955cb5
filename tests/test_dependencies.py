"""pyproject.toml says the truth: the ranges the runtime patches were checked against, every
third-party import declared, nothing declared that nothing uses, one Python floor everywhere."""

from __future__ import annotations

import ast
import functools
import json
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from nbzoo import patching

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
SOURCES = ("nbzoo", "patches", "tests", "bench", "notebooks")
# Imported only where installed, each behind a clear message: not a dependency.
OPTIONAL_IMPORTS = {"torch_npu": "the npu extra", "onnxsim": "export backend='onnxsim'"}
# Declared, used without an import statement.
USED_WITHOUT_IMPORT = {
    "jupyterlab": "make lab and the browser test",
    "ipykernel": "the kernel papermill and nbval run notebooks in",
    "tabulate": "pandas' DataFrame.to_markdown",
    "nbval": "pytest plugin (addopts --nbval-lax)",
    "ruff": "make lint / make test",
    "playwright": "pytest.importorskip in tests/browser",
    "torch_npu": "the npu extra, imported under its own name where installed",
    "parameterized": "transformers' own tests, brought into tests/upstream",
}


def declared() -> dict[str, Requirement]:
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return {canonical(r.name): r for r in map(Requirement, reqs)}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def third_party_imports() -> dict[str, set[str]]:
    """Top-level module -> files importing it, over the project's code and notebooks."""
    found: dict[str, set[str]] = {}

    def scan(source: str, where: str) -> None:
        lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%", "!"))]
        for node in ast.walk(ast.parse("\n".join(lines))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(where)

    for folder in SOURCES:
        for path in sorted((ROOT / folder).rglob("*")):
            if any(part.startswith("transformers-") for part in path.relative_to(ROOT).parts):
                continue  # transformers' own tests (tests/upstream): their imports are theirs
            if path.suffix == ".py":
                scan(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
            elif path.suffix == ".ipynb":
                cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
                for cell in cells:
                    if cell["cell_type"] == "code":
                        scan("".join(cell["source"]), str(path.relative_to(ROOT)))
    return found


@functools.cache
def _packages() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def distributions_of(module: str) -> set[str]:
    return {canonical(d) for d in _packages().get(module, [])}


def test_every_third_party_import_is_declared():
    ours = {"nbzoo", "nbzoo_patches", "tests"}
    deps = declared()
    undeclared = {}
    for module, where in third_party_imports().items():
        if module in ours or module in OPTIONAL_IMPORTS:
            continue
        dists = distributions_of(module)
        assert dists, f"{module} (imported in {sorted(where)[:2]}) is not installed"
        if not dists & deps.keys():
            undeclared[module] = sorted(where)[:3]
    assert not undeclared, f"imported but not declared in pyproject.toml: {undeclared}"


def test_every_declared_dependency_is_used():
    imported = set()
    for module in third_party_imports():
        imported |= distributions_of(module)
    unused = [
        name
        for name in declared()
        if name not in imported and name not in map(canonical, USED_WITHOUT_IMPORT)
    ]
    assert not unused, f"declared in pyproject.toml, never imported or run: {unused}"


def test_the_declared_ranges_are_the_ones_the_patches_were_checked_against():
    deps = declared()
    checked: dict[str, dict[str, list[str]]] = {}  # dist -> spec -> patches
    for name in patching.available():
        for dist, spec in patching.get(name).requires.items():
            checked.setdefault(canonical(dist), {}).setdefault(str(SpecifierSet(spec)), [])
            checked[canonical(dist)][str(SpecifierSet(spec))].append(name)
    assert {"torch", "transformers", "onnxruntime"} <= checked.keys()
    for dist, specs in checked.items():
        assert len(specs) == 1, f"the patches disagree on the {dist} versions they checked: {specs}"
        (spec, names), *_ = specs.items()
        assert str(deps[dist].specifier) == spec, (
            f"pyproject.toml admits {dist}{deps[dist].specifier}; patches {names} were checked "
            f"against {dist}{spec}"
        )


def test_one_python_floor_everywhere():
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"  # tomllib
    assert PYPROJECT["tool"]["ruff"]["target-version"] == "py311"
    env = (ROOT / "environment.yml").read_text(encoding="utf-8")
    assert re.search(r"^\s*- python=3\.11\b", env, re.M)


def test_environment_yml_installs_the_makefiles_torch_from_pip():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    pinned = re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, re.M).group(1)
    env = (ROOT / "environment.yml").read_text(encoding="utf-8")
    channels = re.search(r"^channels:\n((?:\s+- .+\n)+)", env, re.M).group(1).split()
    assert [c for c in channels if c != "-"] == ["conda-forge", "nodefaults"]
    assert f"- torch=={pinned}" in env  # from pip, not a conda channel
    assert not re.search(r"^\s*- (pytorch|cpuonly)\b", env, re.M)
    assert Requirement(f"torch=={pinned}").specifier.contains(pinned) and declared()[
        "torch"
    ].specifier.contains(pinned)


@pytest.mark.parametrize("module", sorted(OPTIONAL_IMPORTS))
def test_optional_imports_are_guarded(module):
    users = third_party_imports().get(module, set())
    for where in users:
        text = (ROOT / where).read_text(encoding="utf-8")
        assert "ImportError" in text or "find_spec" in text, f"{where} imports {module} unguarded"
