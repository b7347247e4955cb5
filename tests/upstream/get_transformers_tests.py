"""Bring transformers' own model tests for the *installed* transformers version into
``tests/upstream/transformers-<version>/`` (not committed: see README.md).

    python tests/upstream/get_transformers_tests.py                 # from GitHub, tag v<version>
    python tests/upstream/get_transformers_tests.py --checkout DIR  # from a local git clone

It starts from the Longformer, Reformer and BERT modeling test files and follows their relative
imports (``from ...test_modeling_common import ...``) to every helper module they need, taking
each file at the tag ``v<installed version>``; ``ORIGIN.json`` records the tag, the commit it
names and each file's sha256. Written into a temporary folder and renamed into place when whole.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = "huggingface/transformers"
RAW = "https://raw.githubusercontent.com/" + REPO
API = "https://api.github.com/repos/" + REPO
MODELS = ("longformer", "reformer", "bert")
ENTRY_POINTS = tuple(f"tests/models/{m}/test_modeling_{m}.py" for m in MODELS)
# Read by the helpers at import time, not imported: tests/test_pipeline_mixin.py opens it.
DATA_FILES = ("tests/utils/tiny_model_summary.json",)


class FetchError(RuntimeError):
    pass


def cache_dir(version: str | None = None) -> Path:
    return HERE / f"transformers-{version or metadata.version('transformers')}"


def transformers_package() -> str:
    import transformers

    return str(Path(transformers.__file__).parent)


def imported_paths(source: str, path: str) -> list[str]:
    """Repository paths of the modules ``path`` imports relatively or as ``tests.*``."""
    package = Path(path).parent.parts
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = package[: len(package) - (node.level - 1)]
            parts = [*base, *(node.module.split(".") if node.module else [])]
        elif node.module and node.module.split(".")[0] == "tests":
            parts = node.module.split(".")
        else:
            continue
        out.append("/".join(parts) + ".py")
    return out


class Source:
    """Files of one tag, from GitHub or a local clone."""

    def __init__(self, tag: str, checkout: Path | None, base_url: str, api_url: str):
        self.tag, self.checkout, self.base_url, self.api_url = tag, checkout, base_url, api_url

    def commit(self) -> str:
        if self.checkout is not None:
            return self._git("rev-parse", f"{self.tag}^{{commit}}").strip()
        with urllib.request.urlopen(f"{self.api_url}/commits/{self.tag}", timeout=60) as r:
            return json.load(r)["sha"]

    def read(self, path: str) -> bytes | None:
        """The file at the tag, or None when the tag has no such file."""
        if self.checkout is not None:
            try:
                return self._git("show", f"{self.tag}:{path}", binary=True)
            except FetchError:
                return None
        try:
            with urllib.request.urlopen(f"{self.base_url}/{self.tag}/{path}", timeout=60) as r:
                return r.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise FetchError(f"{self.base_url}/{self.tag}/{path}: HTTP {exc.code}") from None

    def _git(self, *args: str, binary: bool = False):
        done = subprocess.run(
            ["git", "-C", str(self.checkout), *args], capture_output=True, check=False
        )
        if done.returncode:
            raise FetchError(f"git {' '.join(args)}: {done.stderr.decode().strip()}")
        return done.stdout if binary else done.stdout.decode()


def fetch(source: Source, target: Path) -> dict:
    """Write the entry points, every module they import (transitively) and the packages'
    ``__init__.py`` files under ``target``; return the ORIGIN record."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    files: dict[str, str] = {}
    try:
        todo, seen = list(ENTRY_POINTS), set()
        while todo:
            path = todo.pop()
            if path in seen:
                continue
            seen.add(path)
            data = source.read(path)
            if data is None:
                if path in ENTRY_POINTS or path.endswith("/__init__.py"):
                    raise FetchError(f"{path}: not in {REPO} at {source.tag}")
                todo.append(path[: -len(".py")] + "/__init__.py")  # a package, then
                continue
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / path).write_bytes(data)
            files[path] = hashlib.sha256(data).hexdigest()
            todo += imported_paths(data.decode("utf-8"), path)
        for path in DATA_FILES:
            data = source.read(path)
            if data is None:
                raise FetchError(f"{path}: not in {REPO} at {source.tag}")
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / path).write_bytes(data)
            files[path] = hashlib.sha256(data).hexdigest()
        # test_pipeline_mixin imports transformers from <root>/src/transformers: the installed
        # package, whose version is the tag's (checked by the test that runs these files)
        (tmp / "src").mkdir()
        (tmp / "src" / "transformers").symlink_to(Path(transformers_package()).resolve())
        for path in [p for p in files if p.endswith(".py")]:  # every folder on the way: a package
            parts = Path(path).parts
            for i in range(1, len(parts)):
                init = tmp.joinpath(*parts[:i], "__init__.py")
                if not init.exists():
                    init.write_bytes(b"")
        origin = {
            "repository": f"https://github.com/{REPO}",
            "tag": source.tag,
            "commit": source.commit(),
            "files": dict(sorted(files.items())),
        }
        (tmp / "ORIGIN.json").write_text(json.dumps(origin, indent=1) + "\n", encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return origin


def main(argv: list[str] | None = None) -> int:
    version = metadata.version("transformers")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, help="a git clone of transformers with its tags")
    parser.add_argument("--tag", default=f"v{version}", help="default: the installed version")
    parser.add_argument("--base-url", default=RAW, help=argparse.SUPPRESS)
    parser.add_argument("--api-url", default=API, help=argparse.SUPPRESS)
    parser.add_argument("--target", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    target = args.target or cache_dir(args.tag.removeprefix("v"))
    try:
        origin = fetch(Source(args.tag, args.checkout, args.base_url, args.api_url), target)
    except (FetchError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{len(origin['files'])} files of {REPO} {origin['tag']} ({origin['commit']}) in {target}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
