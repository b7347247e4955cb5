"""The seed's preprocessing layout, the ais_bench-style runner (`python -m nbzoo.infer`) against a
direct onnxruntime call, its rejections, and the accuracy postprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nbzoo import infer
from nbzoo.data import albert_preprocess, glue
from nbzoo.export import albert
from nbzoo.export import onnx as onnx_export
from nbzoo.text import word_tokenizer
from tests.test_export_onnx import tiny_albert

N, SEQ, BS = 37, 16, 8  # 37 samples in batches of 8: the last batch holds 5 and 3 padding rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    dev = glue.generate_split("sst2", N, seed=0, split="dev")
    tokenizer = word_tokenizer(dev.text_a)
    data = albert_preprocess.preprocess(dev, tokenizer, root / "preprocessed_data_seq16", SEQ)
    features, labels = albert_preprocess.load_features(data)
    model = albert.export(tiny_albert(vocab_size=len(tokenizer)), features, root)
    return {"root": root, "data": data, "model": model, "dev": dev, "tok": tokenizer}


def small_model(setup):
    return tiny_albert(vocab_size=len(setup["tok"]))


def direct(model, data) -> np.ndarray:
    """All samples in one onnxruntime call, no runner involved."""
    features, _ = albert_preprocess.load_features(data)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], features)[0]


def dirs_arg(data) -> str:
    return ",".join(str(d) for d in albert_preprocess.input_dirs(data))


def test_preprocess_writes_the_seeds_layout(setup):
    data, dev, tok = setup["data"], setup["dev"], setup["tok"]
    assert outputs(data) == [  # and nbzoo's marker (nbzoo.safe_write)
        "attention_mask",
        "input_ids",
        "label.npy",
        "token_type_ids",
    ]
    for name in albert_preprocess.INPUT_NAMES:
        files = sorted((data / name).iterdir())
        assert len(files) == N
        sample = np.load(data / name / "7.npy")
        assert sample.dtype == np.int64 and sample.shape == (1, SEQ)
    labels = np.load(data / "label.npy")
    assert labels.dtype == np.int64 and labels.tolist() == dev.labels
    enc = tok(dev.text_a[7], max_length=SEQ, padding="max_length", truncation=True)
    assert np.load(data / "input_ids" / "7.npy")[0].tolist() == enc["input_ids"]
    assert np.load(data / "attention_mask" / "7.npy")[0].tolist() == enc["attention_mask"]
    assert not any(p.name.startswith(".") for p in data.parent.iterdir())


@pytest.mark.parametrize("outfmt", ["NPY", "BIN", "TXT"])
def test_runner_outputs_match_a_direct_onnxruntime_call(setup, outfmt, tmp_path):
    model, data = setup["model"], setup["data"]
    argv = ["--model", str(model), "--input", dirs_arg(data), "--output", str(tmp_path)]
    argv += ["--output_dirname", "seq16_bs8", "--outfmt", outfmt, "--batchsize", str(BS)]
    argv += ["--loop", "2", "--warmup_count", "1"]
    assert infer.main(argv) == 0
    out = tmp_path / "seq16_bs8"
    ext = outfmt.lower()
    # one file per sample, named after the input file as ais_bench does; none for padding rows
    assert outputs(out) == sorted(f"{i}_0.{ext}" for i in range(N))
    got = albert_preprocess.read_outputs(out, N)
    ref = direct(model, data)
    np.testing.assert_allclose(got, ref, atol=1e-5)  # TXT keeps 6 decimals (ais_bench's %f)
    if outfmt == "NPY":
        assert np.load(out / "0_0.npy").shape == (1, 2)
    summary = json.loads((tmp_path / "seq16_bs8_summary.json").read_text())
    assert summary["samples"] == N and summary["batches"] == 5 and summary["padded_samples"] == 3
    assert summary["compute_time_ms"]["count"] == 5 * 2  # loop 2 per batch, warm-up untimed
    lat = summary["latency_ms"]
    assert 0 < lat["p50"] <= lat["p99"] and lat["mean"] > 0
    assert summary["throughput"] == pytest.approx(1000 * BS / lat["mean"])
    assert summary["outputs_written"] == N


def test_cli_module_entry_point(setup, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "nbzoo.infer", "--model", str(setup["model"])]
        + ["--input", dirs_arg(setup["data"]), "--output", str(tmp_path), "--output_dirname", "r"]
        + ["--outfmt", "NPY", "--batchsize", "16"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "throughput" in done.stdout and f"{N} files" in done.stdout
    result = albert_preprocess.postprocess(tmp_path / "r", setup["data"] / "label.npy")
    ref = direct(setup["model"], setup["data"]).argmax(-1)
    assert result["accuracy"] == pytest.approx(
        float((ref == np.load(setup["data"] / "label.npy")).mean())
    )
    assert result["samples"] == N


def outputs(folder) -> list[str]:
    """The files of an output folder but nbzoo's marker (nbzoo.safe_write)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".nbzoo-owned")


def copy_data(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def rejected(setup, data, tmp_path, capsys, *extra, model=None) -> str:
    argv = ["--model", str(model or setup["model"]), "--input", dirs_arg(data)]
    argv += ["--output", str(tmp_path / "out"), "--output_dirname", "run", "--batchsize", "8"]
    assert infer.main(argv + list(extra)) == 2
    # nothing that looks like a result: no output folder, no summary, no hidden partial folder
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    return capsys.readouterr().err


def test_rejects_folders_with_different_sample_counts(setup, tmp_path, capsys):
    data = copy_data(setup["data"], tmp_path / "d")
    (data / "token_type_ids" / "36.npy").unlink()
    err = rejected(setup, data, tmp_path, capsys)
    assert "different numbers of samples" in err and "token_type_ids: 36" in err


def test_rejects_a_file_of_the_wrong_dtype(setup, tmp_path, capsys):
    data = copy_data(setup["data"], tmp_path / "d")
    bad = data / "attention_mask" / "12.npy"
    np.save(bad, np.load(bad).astype(np.int32))
    err = rejected(setup, data, tmp_path, capsys)
    assert str(bad) in err and "int32" in err and "int64" in err


def test_rejects_a_file_of_the_wrong_shape(setup, tmp_path, capsys):
    data = copy_data(setup["data"], tmp_path / "d")
    bad = data / "input_ids" / "20.npy"
    np.save(bad, np.zeros((1, SEQ + 1), dtype=np.int64))
    err = rejected(setup, data, tmp_path, capsys)
    assert str(bad) in err and "shape (1, 17)" in err
    np.save(bad, np.zeros(SEQ, dtype=np.int64))
    assert str(bad) in rejected(setup, data, tmp_path, capsys)


def test_rejects_inputs_of_different_lengths(setup, tmp_path, capsys):
    data = copy_data(setup["data"], tmp_path / "d")
    for f in (data / "token_type_ids").iterdir():
        np.save(f, np.zeros((1, 8), dtype=np.int64))
    err = rejected(setup, data, tmp_path, capsys)
    assert "token_type_ids" in err and "dimension 'seq' is 8 here but 16" in err


def test_rejects_a_model_whose_input_names_differ(setup, tmp_path, capsys):
    class Renamed(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids, mask, types):
            return self.inner(input_ids=ids, attention_mask=mask, token_type_ids=types).logits

    feats = albert.dummy_inputs(albert_preprocess.load_features(setup["data"])[0], 2)
    inner = small_model(setup)
    inner.set_attn_implementation("eager")  # SDPA has no ONNX form at opset 13
    other = onnx_export.export_onnx(
        Renamed(inner),
        {
            "ids": feats["input_ids"],
            "mask": feats["attention_mask"],
            "types": feats["token_type_ids"],
        },
        tmp_path / "renamed.onnx",
        ["ids", "mask", "types"],
        ["logits"],
        dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("ids", "mask", "types")},
    )
    err = rejected(setup, setup["data"], tmp_path, capsys, model=other)
    assert "renamed.onnx" in err and "['ids', 'mask', 'types']" in err
    # mapped by position instead, as ais_bench does, it runs
    argv = ["--model", str(other), "--input", dirs_arg(setup["data"]), "--match_inputs", "position"]
    assert infer.main(argv) == 0


def test_rejects_a_batchsize_the_static_model_does_not_have(setup, tmp_path, capsys):
    features, _ = albert_preprocess.load_features(setup["data"])
    static = albert.export(small_model(setup), features, tmp_path, batch_size=4)
    err = rejected(setup, setup["data"], tmp_path, capsys, model=static)
    assert "static batch of 4" in err and "--batchsize 8" in err


def test_a_failed_run_leaves_no_partial_output(setup, tmp_path, monkeypatch):
    out = tmp_path / "out"
    kwargs = dict(output=out, output_dirname="run", outfmt="NPY", batchsize=8)
    infer.run(setup["model"], albert_preprocess.input_dirs(setup["data"]), **kwargs)
    before = sorted(p.name for p in (out / "run").iterdir())
    calls = {"n": 0}
    original = infer.save_output

    def failing(path, data, outfmt):
        calls["n"] += 1
        if calls["n"] > 10:
            raise OSError("disk full")
        original(path, data, outfmt)

    monkeypatch.setattr(infer, "save_output", failing)
    with pytest.raises(OSError, match="disk full"):
        infer.run(setup["model"], albert_preprocess.input_dirs(setup["data"]), **kwargs)
    # the earlier complete run is untouched and no half-written folder is left beside it
    assert sorted(p.name for p in (out / "run").iterdir()) == before
    assert sorted(p.name for p in out.iterdir()) == ["run", "run_summary.json"]


def test_om_models_need_ais_bench(setup, tmp_path, capsys):
    om = tmp_path / "albert_seq16_bs8.om"
    om.write_bytes(b"\0")
    if infer.ais_bench_available():
        pytest.skip("ais_bench is installed here")
    err = rejected(setup, setup["data"], tmp_path, capsys, model=om)
    assert "ais_bench" in err and "not installed" in err


def test_natural_order_and_postprocess_errors(tmp_path):
    from pathlib import Path

    names = ["10.npy", "2.npy", "1.npy", "a_3.npy", "a_20.npy"]
    assert [p.name for p in infer.natural_sort([Path(n) for n in names])] == [
        "1.npy",
        "2.npy",
        "10.npy",
        "a_3.npy",
        "a_20.npy",
    ]
    np.save(tmp_path / "label.npy", np.array([0, 1, 1]))
    for i in range(2):
        np.save(tmp_path / f"{i}_0.npy", np.array([[0.1, 0.9]], dtype=np.float32))
    with pytest.raises(albert_preprocess.PostprocessError, match="2_0.npy: missing"):
        albert_preprocess.postprocess(tmp_path, tmp_path / "label.npy")
    np.save(tmp_path / "2_0.npy", np.array([[0.7, 0.3]], dtype=np.float32))
    assert albert_preprocess.postprocess(tmp_path, tmp_path / "label.npy")["accuracy"] == (
        pytest.approx(1 / 3)
    )


def run_argv(setup, data, out, name="run"):
    return ["--model", str(setup["model"]), "--input", dirs_arg(data), "--output", str(out)] + [
        "--output_dirname",
        name,
        "--outfmt",
        "NPY",
        "--batchsize",
        "8",
    ]


def test_an_existing_folder_of_the_users_is_never_emptied(setup, tmp_path, capsys):
    important = tmp_path / "out" / "important"
    important.mkdir(parents=True)
    (important / "notes.txt").write_text("my notes")
    assert infer.main(run_argv(setup, setup["data"], tmp_path / "out", "important")) == 2
    err = capsys.readouterr().err
    assert "important holds notes.txt that nbzoo did not write" in err
    assert (important / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["important"]


def test_output_files_without_a_summary_beside_them_are_not_replaced(setup, tmp_path, capsys):
    looks_like_outputs = tmp_path / "out" / "run"
    looks_like_outputs.mkdir(parents=True)
    np.save(looks_like_outputs / "0_0.npy", np.ones(3))
    assert infer.main(run_argv(setup, setup["data"], tmp_path / "out")) == 2
    assert "run holds 0_0.npy that nbzoo did not write" in capsys.readouterr().err
    assert np.load(looks_like_outputs / "0_0.npy").tolist() == [1, 1, 1]


def test_a_rerun_replaces_the_earlier_output_of_the_same_name(setup, tmp_path):
    more = copy_data(setup["data"], tmp_path / "more")
    for name in albert_preprocess.INPUT_NAMES:  # an earlier run over five samples more
        for i in range(N, N + 5):
            np.save(more / name / f"{i}.npy", np.load(more / name / "0.npy"))
    assert infer.main(run_argv(setup, more, tmp_path / "out")) == 0
    assert len(outputs(tmp_path / "out" / "run")) == N + 5
    assert infer.main(run_argv(setup, setup["data"], tmp_path / "out")) == 0
    assert outputs(tmp_path / "out" / "run") == sorted(f"{i}_0.npy" for i in range(N))


def test_a_file_the_user_put_into_an_earlier_output_is_never_deleted(setup, tmp_path, capsys):
    argv = run_argv(setup, setup["data"], tmp_path / "out")
    assert infer.main(argv) == 0
    (tmp_path / "out" / "run" / "my_notes.txt").write_text("mine")
    assert infer.main(argv) == 2
    assert "run holds my_notes.txt that nbzoo did not write" in capsys.readouterr().err
    assert (tmp_path / "out" / "run" / "my_notes.txt").read_text() == "mine"


def test_inputs_named_alike_write_one_output_each(setup, tmp_path, capsys):
    data = copy_data(setup["data"], tmp_path / "data")
    for name in albert_preprocess.INPUT_NAMES:  # a.1.npy and a.2.npy used to write one a_0.npy
        for f in sorted((data / name).iterdir()):
            f.rename(f.with_name(f"a.{f.name}"))
    assert infer.main(run_argv(setup, data, tmp_path / "out")) == 0
    out = tmp_path / "out" / "run"
    assert outputs(out) == sorted(f"a.{i}_0.npy" for i in range(N))
    assert f"({N} files)" in capsys.readouterr().out


def test_two_inputs_that_would_write_the_same_output_are_refused(setup, tmp_path, capsys):
    data = copy_data(setup["data"], tmp_path / "data")
    for name in albert_preprocess.INPUT_NAMES:  # 3.npy and 3.bin both name outputs 3_<k>
        np.load(data / name / "3.npy").tofile(data / name / "3.bin")
        (data / name / "36.npy").unlink()
    err = rejected(setup, data, tmp_path, capsys)
    assert "input_ids/3.npy and 3.bin would both write outputs named 3_<k>" in err


def test_a_truncated_npy_input_is_named_before_any_inference(setup, tmp_path, capsys):
    data = copy_data(setup["data"], tmp_path / "data")
    victim = data / "input_ids" / "30.npy"
    victim.write_bytes(victim.read_bytes()[:-5])
    err = rejected(setup, data, tmp_path, capsys)
    assert "30.npy: truncated" in err and "shape (1, 16)" in err
