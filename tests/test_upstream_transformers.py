"""transformers' own Longformer, Reformer and BERT model tests, run with nbzoo's patches applied:
no test may fail under the patches that does not also fail without them, so a patch cannot drift
from upstream's behaviour unnoticed.

The test files are transformers', at the tag of the installed version, brought by
``python tests/upstream/get_transformers_tests.py`` into ``tests/upstream/transformers-<version>``
(see tests/upstream/README.md for why they are not committed). Each module runs in its own
pytest process, once without patches and once per compatible set of the patches that replace
something in that model; the modeling test classes only, with transformers' slow (hub) tests
left skipped as transformers itself does without RUN_SLOW.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

import pytest

from nbzoo import patching

UPSTREAM = Path(__file__).parent / "upstream"
MODELS = ("longformer", "reformer", "bert")
TIMEOUT_S = 420  # one run of one module, on 2 busy cores
# Pipeline tests need tokenizers from the hub and tests/pipelines; hub tests are @slow already.
SELECT = "ModelTest and not pipeline and not Pipeline"


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
    """Failed and errored test ids of one pytest run of ``module`` under ``root``."""
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
    failed, passed = set(), 0
    for case in ET.parse(report).getroot().iter("testcase"):
        test_id = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.add(test_id)
        elif case.find("skipped") is None:
            passed += 1
    return failed, passed


@pytest.fixture(scope="module")
def upstream_root() -> Path:
    root = upstream_tests_dir()
    origin = root / "ORIGIN.json"
    if not origin.exists():
        pytest.skip(
            f"transformers' own tests are not here ({root.name}); bring them with "
            "`python tests/upstream/get_transformers_tests.py` (needs github.com, or --checkout "
            "a local clone)"
        )
    tag = json.loads(origin.read_text())["tag"]
    assert tag == f"v{metadata.version('transformers')}", f"{root} holds {tag}"
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_transformers_own_tests_fail_no_more_with_the_patches(upstream_root, model, tmp_path):
    module = f"tests/models/{model}/test_modeling_{model}.py"
    sets = patch_sets(model)
    assert sets, f"no nbzoo patch touches {model}: nothing to compare"
    baseline, ran = run_upstream(upstream_root, module, (), tmp_path / "upstream.xml")
    assert ran > 20, f"only {ran} of transformers' {model} tests passed unpatched: selection broken"
    for patches in sets:
        failed, _ = run_upstream(upstream_root, module, patches, tmp_path / "patched.xml")
        new = sorted(failed - baseline)
        assert not new, f"{model} tests that fail only under {patches}: {new}"


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


def test_the_comparison_names_a_failure_only_the_patches_bring(tmp_path):
    root = fake_tree(tmp_path / "tree")
    module = "tests/models/bert/test_modeling_bert.py"
    base, passed = run_upstream(root, module, (), tmp_path / "a.xml", select="ModelTest")
    patched, _ = run_upstream(
        root, module, ("bert_pretraining_sparse_mlm_perf",), tmp_path / "b.xml", select="ModelTest"
    )
    prefix = "tests.models.bert.test_modeling_bert.BertModelTest::"
    assert base == {prefix + "test_always_broken"} and passed == 2
    assert patched - base == {prefix + "test_forward_is_upstreams"}


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
