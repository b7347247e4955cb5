"""Bring transformers' own model tests for the *installed* transformers version into
``tests/upstream/transformers-<version>/`` (not committed: see README.md).

    python tests/upstream/get_transformers_tests.py                 # from GitHub, tag v<version>
    python tests/upstream/get_transformers_tests.py --checkout DIR  # from a local git clone
    python tests/upstream/get_transformers_tests.py --assemble MANIFEST.json  # without github.com

It starts from the Longformer, Reformer and BERT modeling test files and follows their relative
imports (``from ...test_modeling_common import ...``) to every helper module they need, taking
each file at the tag ``v<installed version>``; ``ORIGIN.json`` records the tag, the commit it
names and each file's sha256. Written into a temporary folder and renamed into place when whole.

``--assemble`` is for a machine without github.com: it takes ``tests/*.py`` from PyPI's sdist of
the installed version (built from the tag, but without ``tests/models`` nor ``tests/generation``)
and every other file from where the manifest says it was obtained, one by one; ``ORIGIN.json``
then lists each file's source, the files *not* taken from the tag, and the stand-ins written in
place of files that could not be had (see STAND_INS), so the test can say what it really ran.
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
import tarfile
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


# Written by this harness, not transformers' code, in place of a file that could not be obtained;
# each says what it leaves out. ORIGIN.json lists them, and the test reports them.
STAND_INS = {
    "tests/generation/test_utils.py": (
        "transformers' generation tests (GenerationTesterMixin's test_* methods) do not run: no "
        "version of tests/generation/test_utils.py that imports against this transformers could "
        "be obtained",
        '"""Stand-in written by nbzoo\'s tests/upstream/get_transformers_tests.py, not transformers\'\n'
        "code: the model tests import GenerationTesterMixin from here, and none of its generation\n"
        'tests run (see ORIGIN.json)."""\n\n\nclass GenerationTesterMixin:\n    pass\n',
    ),
    "tests/utils/tiny_model_summary.json": (
        "empty: only the pipeline tests read it, and they are not selected",
        "{}\n",
    ),
}


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
        finish_tree(tmp)
        origin = {
            "repository": f"https://github.com/{REPO}",
            "tag": source.tag,
            "commit": source.commit(),
            "files": dict(sorted(files.items())),
        }
        put_in_place(tmp, target, origin)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return origin


def put_in_place(tmp: Path, target: Path, origin: dict) -> None:
    """Write ``ORIGIN.json`` into the finished tree ``tmp`` and let it replace ``target``."""
    (tmp / "ORIGIN.json").write_text(json.dumps(origin, indent=1) + "\n", encoding="utf-8")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assemble(manifest_path: Path, target: Path, version: str) -> dict:
    """Build the tree from PyPI's sdist of ``version`` and the files the manifest names.

    The manifest (JSON)::

        {"sdist": "transformers-5.24.0.tar.gz",
         "files": {"tests/models/bert/test_modeling_bert.py":
                       {"file": "local/copy.py", "source": "huggingface/transformers@<commit>"}},
         "stand_ins": ["tests/generation/test_utils.py"]}

    Relative paths are relative to the manifest. Every module the entry points import must be
    in the tree, or nothing is written.
    """
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FetchError(f"{manifest_path}: {exc}") from None
    unknown = set(manifest) - {"sdist", "files", "stand_ins"}
    if unknown:
        raise FetchError(f"{manifest_path}: unknown keys {sorted(unknown)}")
    base = manifest_path.parent
    sdist = base / manifest.get("sdist", "")
    if sdist.name != f"transformers-{version}.tar.gz" or not sdist.is_file():
        raise FetchError(f"{manifest_path}: 'sdist' must name transformers-{version}.tar.gz")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    files: dict[str, str] = {}
    sources: dict[str, str] = {}
    try:
        sdist_source = f"PyPI sdist {sdist.name} (sha256 {sha256_file(sdist)})"
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                rest = member.name.removeprefix(prefix)
                if rest == member.name or "/" in rest or not rest.endswith(".py"):
                    continue  # only tests/*.py: the sdist has no tests/models, tests/generation
                data = archive.extractfile(member).read()
                (tmp / "tests").mkdir(parents=True, exist_ok=True)
                (tmp / "tests" / rest).write_bytes(data)
                files["tests/" + rest] = hashlib.sha256(data).hexdigest()
                sources["tests/" + rest] = sdist_source
        if not files:
            raise FetchError(f"{sdist}: no {prefix}*.py in it")
        for path, entry in manifest.get("files", {}).items():
            if set(entry) != {"file", "source"} or path in files:
                raise FetchError(f"{manifest_path}: files[{path!r}] needs 'file' and 'source' only")
            data = (base / entry["file"]).read_bytes()
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / path).write_bytes(data)
            files[path] = hashlib.sha256(data).hexdigest()
            sources[path] = entry["source"]
        stand_ins = {}
        for path in manifest.get("stand_ins", []):
            if path not in STAND_INS or path in files:
                raise FetchError(f"{manifest_path}: no stand-in for {path!r} (or given twice)")
            why, text = STAND_INS[path]
            (tmp / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp / path).write_text(text, encoding="utf-8")
            files[path] = hashlib.sha256(text.encode()).hexdigest()
            sources[path] = "stand-in written by nbzoo's get_transformers_tests.py"
            stand_ins[path] = why
        missing = unreachable_imports(tmp, files)
        if missing:
            raise FetchError(f"the tree lacks {missing}: add them to {manifest_path}")
        finish_tree(tmp)
        origin = {
            "repository": f"https://github.com/{REPO}",
            "tag": f"v{version}",
            "commit": None,
            "assembled": True,
            "files": dict(sorted(files.items())),
            "sources": dict(sorted(sources.items())),
            "not_from_tag": sorted(p for p in files if sources[p] != sdist_source),
            "stand_ins": dict(sorted(stand_ins.items())),
        }
        put_in_place(tmp, target, origin)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return origin


def unreachable_imports(tmp: Path, files: dict[str, str]) -> list[str]:
    """The modules that the entry points import (transitively) and the tree lacks, and the
    entry points and data files it lacks."""
    missing, todo, seen = set(), list(ENTRY_POINTS), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = path[: -len(".py")] + "/__init__.py"
        if path not in files and package in files:
            path = package
        if path not in files:
            if not (tmp / path[: -len(".py")]).is_dir():  # a folder of modules: a package
                missing.add(path)
            continue
        todo += imported_paths((tmp / path).read_text(encoding="utf-8"), path)
    return sorted(missing | {p for p in DATA_FILES if p not in files})


def finish_tree(tmp: Path) -> None:
    """Make every folder holding a test module a package, and point <root>/src/transformers at
    the installed package: test_pipeline_mixin imports transformers from there, and the
    installed version is the tag's (checked by the test that runs these files)."""
    for path in list(tmp.rglob("*.py")):
        parts = path.relative_to(tmp).parts
        if parts[0] != "tests":
            continue  # utils/test_module is put on sys.path by the tests themselves
        for i in range(1, len(parts)):
            init = tmp.joinpath(*parts[:i], "__init__.py")
            if not init.exists():
                init.write_bytes(b"")
    (tmp / "src").mkdir(exist_ok=True)
    (tmp / "src" / "transformers").symlink_to(Path(transformers_package()).resolve())


def main(argv: list[str] | None = None) -> int:
    version = metadata.version("transformers")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, help="a git clone of transformers with its tags")
    parser.add_argument(
        "--assemble", type=Path, metavar="MANIFEST", help="build the tree from the sdist and files"
    )
    parser.add_argument("--tag", default=f"v{version}", help="default: the installed version")
    parser.add_argument("--base-url", default=RAW, help=argparse.SUPPRESS)
    parser.add_argument("--api-url", default=API, help=argparse.SUPPRESS)
    parser.add_argument("--target", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    target = args.target or cache_dir(args.tag.removeprefix("v"))
    try:
        if args.assemble:
            origin = assemble(args.assemble, target, version)
        else:
            origin = fetch(Source(args.tag, args.checkout, args.base_url, args.api_url), target)
    except (FetchError, OSError, tarfile.TarError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{len(origin['files'])} files of {REPO} {origin['tag']} "
        f"({origin['commit'] or 'assembled, not one commit'}) in {target}"
    )
    for path in origin.get("not_from_tag", []):
        print(f"  not from the tag: {path} <- {origin['sources'][path]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
