"""ONNX export of the long-sequence masked LMs: PyTorch and ONNX Runtime agree (fp32, eval),
Longformer at several sequence lengths from one file; upstream alone does not export."""

from __future__ import annotations

import pytest
import torch

from nbzoo import longseq, patching
from nbzoo.export import longseq as export
from nbzoo.export import onnx as nbonnx
from tests.test_patches_longseq import longformer, reformer

TOL = 1e-4


@pytest.fixture(autouse=True)
def no_patch_left_on():
    yield
    for name in list(patching.active()):
        patching.undo(name)


def test_longformer_exports_once_and_runs_at_other_lengths(tmp_path):
    model = longformer(windows=(8, 16), slots=2).eval()
    path = export.export_longformer_mlm(model, tmp_path / "longformer.onnx", seq_len=64)
    assert patching.active() == []  # the export turned its patches off again
    diffs = export.longformer_parity(model, path, [64, 128], batch_size=2)
    assert set(diffs) == {64, 128} and max(diffs.values()) <= TOL, diffs
    ops = nbonnx.op_histogram(path)
    assert "TopK" in ops  # the global-attention slots are in the graph, not a frozen constant


def test_longformer_export_keeps_patches_the_caller_applied(tmp_path):
    model = longformer(windows=(8, 8), slots=1).eval()
    patching.apply("longformer_sliding_window")
    export.export_longformer_mlm(model, tmp_path / "m.onnx", seq_len=32)
    assert patching.active() == ["longformer_sliding_window"]


def test_longformer_export_refuses_lengths_off_the_window(tmp_path):
    with pytest.raises(ValueError, match="multiple of the attention window 16"):
        export.export_longformer_mlm(longformer(), tmp_path / "m.onnx", seq_len=40)


UPSTREAM_LONGFORMER = """
import warnings
warnings.simplefilter("ignore")
from nbzoo.export import longseq as export, onnx as nx
from tests.test_patches_longseq import longformer
model = longformer(windows=(8, 16), slots=2).eval()
axes = {n: {0: "batch", 1: "sequence"} for n in export.LONGFORMER_INPUTS}
path = nx.export_onnx(model, export.longformer_inputs(64, 2, 60), PATH,
                      export.LONGFORMER_INPUTS, ["logits"], dynamic_axes=axes, opset=17)
print("exported", flush=True)
for seq_len, n_global in [(128, 1), (64, 0)]:
    inputs = export.longformer_inputs(seq_len, 2, 60, global_tokens=n_global, seed=seq_len)
    print("diff", nx.parity_check(model, path, inputs), flush=True)
"""


def test_upstream_longformer_export_is_only_right_at_the_traced_shape(tmp_path):
    """Upstream exports at opset 17, but the file is wrong at another length (the strides of
    as_strided and the global-attention flag are frozen) and ONNX Runtime dies on a batch
    without global tokens. A subprocess, because that death is a signal."""
    from tests.conftest import run_python

    proc = run_python(UPSTREAM_LONGFORMER.replace("PATH", repr(str(tmp_path / "up.onnx"))))
    diffs = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("diff")]
    assert proc.returncode != 0 or max(diffs) > TOL, (proc.returncode, diffs, proc.stderr[-500:])


def test_reformer_export_matches_pytorch(tmp_path):
    model = reformer(hash_seed=None).eval()
    ids = torch.randint(3, 60, (2, 64), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="have no hash_seed"):
        export.export_reformer_mlm(model, tmp_path / "r.onnx", seq_len=64, batch_size=2)
    assert longseq.set_hash_seed(model, 3) == 2  # two LSH layers
    path = export.export_reformer_mlm(model, tmp_path / "r.onnx", seq_len=64, batch_size=2)
    assert nbonnx.parity_check(model, path, {"input_ids": ids}, ["logits"]) <= TOL
    ops = nbonnx.op_histogram(path)
    assert not {"RandomNormal", "RandomNormalLike", "PythonOp"} & set(ops)


def test_upstream_reformer_does_not_export(tmp_path):
    model = reformer(hash_seed=3).eval()
    ids = torch.randint(3, 60, (2, 64))
    with pytest.raises(Exception):  # noqa: B017 - the custom autograd Function
        nbonnx.export_onnx(
            model, {"input_ids": ids}, tmp_path / "up.onnx", ["input_ids"], ["logits"]
        )
