"""transformers' own Longformer, Reformer and BERT model tests, run with nbzoo's patches applied:
no test may fail under the patches that does not also fail without them, so a patch cannot drift
from upstream's behaviour unnoticed.

The test files are transformers', at the tag of the installed version, brought by
``python tests/upstream/get_transformers_tests.py`` into ``tests/upstream/transformers-<version>``
(see tests/upstream/README.md for why they are not committed), or assembled from the release's
sdist and files obtained one by one, in which case ORIGIN.json lists what is not the tag's and
every run says so. Each module runs in its own pytest process, once without patches and once per
compatible set of the patches that replace something in that model; the model and integration
test classes only, with transformers' slow (hub) tests left skipped as transformers itself does
without RUN_SLOW.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import pytest

from nbzoo import patching

UPSTREAM = Path(__file__).parent / "upstream"
MODELS = ("longformer", "reformer", "bert")
TIMEOUT_S = 420  # one run of one module, on 2 busy cores
# The model test classes and the integration classes (whose hub-free tests check layer outputs
# against reference numbers); pipeline tests need tokenizers from the hub and tests/pipelines, and
# transformers marks its hub tests @slow already.
SELECT = "(ModelTest or IntegrationTest) and not pipeline and not Pipeline"


def upstream_tests_dir() -> Path:
    return UPSTREAM / f"transformers-{metadata.version('transformers')}"


def patch_sets(model: str) -> list[tuple[str, ...]]:
    """The patches of ``model``'s modeling module, in sets that can be applied together (two
    replacements of one attribute go to different sets)."""
    module = f"transformers.models.{model}.modeling_{model}:"
    sets: list[list[str]] = []
    for name in patching.available():
        target = patching.get(name).target
        if not target.startswith(module):
            continue
        for group in sets:
            if all(patching.get(other).target != target for other in group):
                group.append(name)
                break
        else:
            sets.append([name])
    return [tuple(g) for g in sets]


def run_upstream(root: Path, module: str, patches: tuple[str, ...], report: Path, select=SELECT):
    """The failed (or errored) and the passed test ids of one pytest run of ``module``."""
    env = dict(os.environ)
    env.update(
        NBZOO_UPSTREAM_PATCHES=",".join(patches),
        PYTHONPATH=os.pathsep.join([str(UPSTREAM), str(root), env.get("PYTHONPATH", "")]),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONHASHSEED="0",
    )
    env.pop("RUN_SLOW", None)
    argv = [sys.executable, "-m", "pytest", module, "-q", "-p", "apply_nbzoo_patches"]
    argv += ["-p", "no:cacheprovider", "-p", "no:nbval", "-c", os.devnull, "--rootdir", str(root)]
    # the folder lives inside this project's tests/: its conftest.py (imported as ``tests``) must
    # not shadow transformers' ``tests`` package
    argv += ["--confcutdir", str(root)]
    argv += ["-k", select, f"--junitxml={report}", "-o", "junit_family=xunit2"]
    try:
        done = subprocess.run(
            argv, cwd=root, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{module} with patches {patches or 'none'} ran past {TIMEOUT_S} s")
    if done.returncode not in (0, 1) or not report.exists():
        pytest.fail(
            f"{module} with patches {patches or 'none'} did not run:\n{done.stdout[-3000:]}"
        )
    failed, passed = set(), set()
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(test_id)
        elif case.find("skipped") is None:
            passed.add(test_id)
    return failed, passed


def drift(unpatched: tuple[set, set], patched: tuple[set, set]) -> dict[str, list[str]]:
    """What the patches changed for the worse: tests that fail only under them, and tests that
    pass without them and do not run under them (skipped: a patch can hide a test)."""
    (failed, passed), (failed_patched, passed_patched) = unpatched, patched
    return {
        "fail only under the patches": sorted(failed_patched - failed),
        "pass unpatched, skipped patched": sorted(passed - passed_patched - failed_patched),
    }


def read_origin(root: Path) -> tuple[dict, str]:
    """ORIGIN.json of ``root``, checked against the files and the installed transformers, and a
    sentence saying what of it is not the tag's (empty when all of it is)."""
    origin = json.loads((root / "ORIGIN.json").read_text())
    tag = f"v{metadata.version('transformers')}"
    assert origin["tag"] == tag, f"{root} holds {origin['tag']}, transformers is {tag}"
    for path, digest in origin["files"].items():
        data = (root / path).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, f"{root / path} changed since brought"
    not_from_tag = origin.get("not_from_tag", [])
    if not not_from_tag:
        return origin, ""
    stand_ins = origin.get("stand_ins", {})
    taken = [f"{p} ({origin['sources'][p]})" for p in not_from_tag if p not in stand_ins]
    note = f"files not from {tag}: {'; '.join(taken)}" if taken else ""
    if stand_ins:
        gaps = "; ".join(f"{p}: {why}" for p, why in stand_ins.items())
        note += f"{'. ' if note else ''}stand-ins written by the harness: {gaps}"
    return origin, note


@pytest.fixture(scope="module")
def upstream_root() -> Path:
    root = upstream_tests_dir()
    if not (root / "ORIGIN.json").exists():
        pytest.skip(
            f"transformers' own tests are not here ({root.name}); bring them with "
            "`python tests/upstream/get_transformers_tests.py` (needs github.com, or --checkout "
            "a local clone, or --assemble a manifest: see tests/upstream/README.md)"
        )
    _, note = read_origin(root)
    if note:  # said on every run, pass or fail: these are not exactly the tag's tests
        warnings.warn(f"transformers' tests run from a mixed tree: {note}", stacklevel=1)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_transformers_own_tests_fail_no_more_with_the_patches(upstream_root, model, tmp_path):
    module = f"tests/models/{model}/test_modeling_{model}.py"
    sets = patch_sets(model)
    assert sets, f"no nbzoo patch touches {model}: nothing to compare"
    baseline = run_upstream(upstream_root, module, (), tmp_path / "upstream.xml")
    ran = len(baseline[1])
    assert ran > 20, f"only {ran} of transformers' {model} tests passed unpatched: selection broken"
    for patches in sets:
        changed = drift(baseline, run_upstream(upstream_root, module, patches, tmp_path / "p.xml"))
        assert not any(changed.values()), (
            f"{model} under {patches}: {changed} "
            f"({read_origin(upstream_root)[1] or 'files of the tag'})"
        )


@pytest.mark.parametrize(
    "name", [n for n in patching.available() if patching.get(n).target.endswith(".forward")]
)
def test_a_patched_forward_shows_upstreams_signature(name):
    """transformers reads a forward's signature to learn what the model accepts (the common test
    ``test_eager_matches_sdpa_inference`` skips a model whose forward shows no output_attentions,
    upstream's through ``**kwargs: Unpack[TransformersKwargs]``): a patched BertForPreTraining
    that showed a bare ``**kwargs`` turned that test from passed into skipped."""
    import inspect

    owner, attr = patching.get(name)._owner_and_attr()
    upstream = inspect.signature(getattr(owner, attr))
    with patching.applied(name):
        assert inspect.signature(getattr(owner, attr)) == upstream


# --------------------------------------------------------------------- the harness itself


FAKE_MODEL_TEST = """
import unittest
from transformers.models.bert import modeling_bert
from ...test_helpers import same_as_upstream


class BertModelTest(unittest.TestCase):
    def test_passes_either_way(self):
        self.assertTrue(same_as_upstream())

    def test_forward_is_upstreams(self):
        self.assertEqual(modeling_bert.BertForPreTraining.forward.__module__,
                         "transformers.models.bert.modeling_bert")

    def test_always_broken(self):
        raise RuntimeError("fails with and without patches")

    def test_hidden_by_the_patches(self):
        if modeling_bert.BertForPreTraining.forward.__module__ != modeling_bert.__name__:
            self.skipTest("not for a patched forward")
"""


def fake_tree(root: Path) -> Path:
    files = {
        "tests/__init__.py": "",
        "tests/models/__init__.py": "",
        "tests/models/bert/__init__.py": "",
        "tests/test_helpers.py": "def same_as_upstream():\n    return True\n",
        "tests/models/bert/test_modeling_bert.py": FAKE_MODEL_TEST,
    }
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    return root


def test_the_comparison_names_a_failure_and_a_skip_only_the_patches_bring(tmp_path):
    root = fake_tree(tmp_path / "tree")
    module = "tests/models/bert/test_modeling_bert.py"
    base = run_upstream(root, module, (), tmp_path / "a.xml", select="ModelTest")
    patched = run_upstream(
        root, module, ("bert_pretraining_sparse_mlm_perf",), tmp_path / "b.xml", select="ModelTest"
    )
    prefix = "tests.models.bert.test_modeling_bert.BertModelTest::"
    assert base[0] == {prefix + "test_always_broken"} and len(base[1]) == 3
    assert drift(base, patched) == {
        "fail only under the patches": [prefix + "test_forward_is_upstreams"],
        "pass unpatched, skipped patched": [prefix + "test_hidden_by_the_patches"],
    }


def test_the_tree_runs_inside_a_project_whose_own_tests_package_has_a_conftest(tmp_path):
    """Where this project keeps the folder: under its own ``tests`` package and conftest.py."""
    outer = tmp_path / "project" / "tests"
    outer.mkdir(parents=True)
    (outer / "__init__.py").write_text("")
    (outer / "conftest.py").write_text("")
    root = fake_tree(outer / "upstream" / "transformers-x")
    module = "tests/models/bert/test_modeling_bert.py"
    failed, passed = run_upstream(root, module, (), tmp_path / "a.xml", select="ModelTest")
    assert len(passed) == 3 and len(failed) == 1


def test_every_run_of_a_test_draws_the_same_random_inputs(tmp_path):
    """transformers' tests draw inputs from an unseeded Random in test_modeling_common: the
    unpatched and the patched run must still see the same ones."""
    root = fake_tree(tmp_path / "tree")
    (root / "tests" / "test_modeling_common.py").write_text(
        "import random\nglobal_rng = random.Random()\n"
    )
    (root / "tests" / "models" / "bert" / "test_modeling_bert.py").write_text(
        "import os, random, unittest\n"
        "import torch\n"
        "from ...test_modeling_common import global_rng\n\n\n"
        "class BertModelTest(unittest.TestCase):\n"
        "    def test_draw(self):\n"
        "        with open(os.environ['DRAWS'], 'a') as f:\n"
        "            print(global_rng.random(), random.random(), torch.rand(1).item(), file=f)\n"
    )
    module = "tests/models/bert/test_modeling_bert.py"
    draws = []
    for run in range(2):
        os.environ["DRAWS"] = str(tmp_path / f"draws{run}")
        try:
            run_upstream(root, module, (), tmp_path / f"{run}.xml", select="ModelTest")
        finally:
            del os.environ["DRAWS"]
        draws.append((tmp_path / f"draws{run}").read_text())
    assert draws[0] == draws[1] and len(draws[0].split()) == 3


def test_patch_sets_never_stack_two_replacements_of_one_attribute():
    longformer = patch_sets("longformer")
    assert {n for s in longformer for n in s} >= {
        "longformer_sliding_window",
        "longformer_static_global",
        "longformer_sparse_mlm_perf",
        "longformer_chunked_sdpa_perf",
    }
    for group in longformer + patch_sets("reformer") + patch_sets("bert"):
        targets = [patching.get(n).target for n in group]
        assert len(set(targets)) == len(targets)


def serve(files: dict[str, str], sha: str):
    """A stand-in for raw.githubusercontent.com and the GitHub API on 127.0.0.1."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path.lstrip("/"))
            if self.path.startswith("/api/commits/"):
                body = json.dumps({"sha": sha})
            self.send_response(200 if body is not None else 404)
            self.end_headers()
            if body is not None:
                self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def fetcher():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "get_transformers_tests", UPSTREAM / "get_transformers_tests.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_fetcher_follows_the_imports_at_the_tag_and_records_their_origin(tmp_path):
    get = fetcher()
    tag = "v5.24.0"
    tree = {
        f"{tag}/tests/models/{m}/test_modeling_{m}.py": (
            "from ...test_modeling_common import ModelTesterMixin\n"
            "from ...utils import helper\n"
            "from transformers import BertConfig\n"
        )
        for m in get.MODELS
    }
    tree[f"{tag}/tests/test_modeling_common.py"] = "from .generation.test_utils import G\n"
    tree[f"{tag}/tests/generation/test_utils.py"] = "G = 1\n"
    tree[f"{tag}/tests/utils/__init__.py"] = "from tests.utils.helper import x\n"
    tree[f"{tag}/tests/utils/helper.py"] = "x = 2\n"
    tree[f"{tag}/tests/utils/tiny_model_summary.json"] = "{}\n"
    server = serve(tree, "ab" * 20)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        argv = ["--base-url", base, "--api-url", f"{base}/api", "--target", str(tmp_path / "t")]
        assert get.main(argv) == 0
        origin = json.loads((tmp_path / "t" / "ORIGIN.json").read_text())
        assert origin["tag"] == tag and origin["commit"] == "ab" * 20
        expected = {k.removeprefix(f"{tag}/") for k in tree}
        assert set(origin["files"]) == expected
        for path, digest in origin["files"].items():
            data = (tmp_path / "t" / path).read_bytes()
            assert data == tree[f"{tag}/{path}"].encode()
            assert digest == hashlib.sha256(data).hexdigest()
        for package in ("tests", "tests/models", "tests/models/bert", "tests/generation"):
            assert (tmp_path / "t" / package / "__init__.py").exists()
        assert (tmp_path / "t" / "src" / "transformers" / "__init__.py").exists()
        # a tag without one of the model tests: an error, and nothing half-written
        del tree[f"{tag}/tests/models/bert/test_modeling_bert.py"]
        assert get.main([*argv[:-1], str(tmp_path / "u")]) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    finally:
        server.shutdown()


def fake_sdist_and_manifest(tmp_path: Path, version: str, files: dict) -> Path:
    """A PyPI-like sdist holding tests/*.py only, and a manifest naming the other files."""
    import io
    import tarfile

    sdist = tmp_path / f"transformers-{version}.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        for name, text in {
            "test_modeling_common.py": "from .generation.test_utils import GenerationTesterMixin\n",
            "test_configuration_common.py": "X = 1\n",
            "test_fsdp_mixin.py": "from .distributed_testing_utils import run\n",  # not needed
        }.items():
            data = text.encode()
            info = tarfile.TarInfo(f"transformers-{version}/tests/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    entries = {}
    for path, text in files.items():
        local = tmp_path / "obtained" / path
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)
        entries[path] = {"file": f"obtained/{path}", "source": f"somewhere@{len(text):040d}"}
    manifest = tmp_path / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "sdist": sdist.name,
                "files": entries,
                "stand_ins": [
                    "tests/generation/test_utils.py",
                    "tests/utils/tiny_model_summary.json",
                ],
            }
        )
    )
    return manifest


def test_an_assembled_tree_says_which_files_are_not_the_tags_and_which_are_stand_ins(tmp_path):
    get = fetcher()
    version = metadata.version("transformers")
    model_test = "from ...test_modeling_common import ModelTesterMixin\n"
    files = {f"tests/models/{m}/test_modeling_{m}.py": model_test for m in get.MODELS}
    manifest = fake_sdist_and_manifest(tmp_path, version, files)
    target = tmp_path / "tree"
    assert get.main(["--assemble", str(manifest), "--target", str(target)]) == 0
    origin, note = read_origin(target)
    assert origin["tag"] == f"v{version}" and origin["commit"] is None
    assert origin["sources"]["tests/test_modeling_common.py"].startswith(
        f"PyPI sdist transformers-{version}.tar.gz (sha256 "
    )
    assert set(origin["not_from_tag"]) == set(files) | set(origin["stand_ins"])
    assert "tests/generation/test_utils.py" in origin["stand_ins"]
    assert "tests/models/bert/test_modeling_bert.py (somewhere@" in note
    assert "generation tests" in note
    assert (target / "tests" / "models" / "bert" / "__init__.py").exists()
    # a file changed after it was brought is caught
    (target / "tests" / "test_configuration_common.py").write_text("X = 2\n")
    with pytest.raises(AssertionError, match="changed since brought"):
        read_origin(target)


def test_assembling_without_a_module_the_model_tests_import_writes_nothing(tmp_path):
    get = fetcher()
    version = metadata.version("transformers")
    files = {
        f"tests/models/{m}/test_modeling_{m}.py": "from ...test_pipeline_mixin import P\n"
        for m in get.MODELS
    }
    manifest = fake_sdist_and_manifest(tmp_path, version, files)
    assert get.main(["--assemble", str(manifest), "--target", str(tmp_path / "tree")]) == 1
    assert not (tmp_path / "tree").exists()
    assert not list(tmp_path.glob(".tree.tmp-*"))
