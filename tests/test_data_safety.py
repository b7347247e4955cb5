"""The user's files are sacred (nbzoo.safe_write): every writer of nbzoo leaves a folder of the
user's byte for byte as it was -- when it succeeds beside it, when it refuses it, and when it fails
half-way -- and the defects of issue 26 that lost or mangled the user's data stay fixed.

A full disk is simulated two ways: in this process by making a write raise OSError(ENOSPC)
(monkeypatched), and in a child process by RLIMIT_FSIZE, under which the kernel fails real writes
(EFBIG) deep inside native code (safetensors' Rust writer) without any root privileges."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nbzoo import presets

# --- the user's folder and its fingerprint ---------------------------------------------------


def users_folder(folder: Path, same_names: dict[str, bytes]) -> Path:
    """A folder of the user's: ``same_names`` (files with the names the writer writes), an
    unrelated file, and nested folders with files of their own."""
    files = {
        **same_names,
        "notes.md": b"# my notes\nnothing generated here\n",
        "nested/deep/keep.bin": bytes(range(256)) * 3,
        "nested/readme.txt": "données à garder\n".encode(),
    }
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / "nested" / "empty").mkdir(exist_ok=True)
    return folder


def fingerprint(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` (folders too) with the sha256 of each file's bytes."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_symlink():
            out[rel] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def config(stem: str, **values) -> presets.Config:
    cfg = presets.Config(preset="demo", seed=0)
    cfg.update(presets.load(stem)["demo"])
    cfg.update(values)
    return cfg


def one_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


# --- defect 1: the demo generators never write into the user's data ---------------------------

GLUE_SIZES = {"train": 40, "dev": 10, "test": 5}


def test_generating_glue_data_into_the_users_glue_folder_changes_nothing(tmp_path):
    from nbzoo import finetune
    from nbzoo.safe_write import NotOursError

    data = users_folder(
        tmp_path / "dataset",
        {"SST-2/train.tsv": b"sentence\tlabel\nmy own review\t1\n", "SST-2/dev.tsv": b"x\n"},
    )
    before = fingerprint(data)
    cfg = config("01_albert_glue", data_dir=str(data), sample_sizes=GLUE_SIZES)
    with pytest.raises(NotOursError) as refused:
        finetune.prepare_data("sst2", cfg)
    assert fingerprint(data) == before
    message = one_line(str(refused.value))
    assert "SST-2/dev.tsv" in message and "nbzoo did not write" in message
    assert "data_source=local" in message


def test_generating_03s_data_into_the_users_binarized_folder_changes_nothing(tmp_path):
    from nbzoo import sentence_prediction
    from nbzoo.safe_write import NotOursError

    data = users_folder(
        tmp_path / "SST-2-bin",
        {
            "input0/dict.txt": b"50256 10\n",
            "input0/train.bin": b"\x01\x02",
            "input0/train.idx": b"MMIDIDX\x00\x00",
        },
    )
    before = fingerprint(tmp_path)
    cfg = config(
        "03_roberta_sst2",
        data_dir=str(data),
        glue_dir=str(tmp_path / "glue"),
        bpe_dir=str(tmp_path / "bpe"),
        sample_sizes=GLUE_SIZES,
    )
    with pytest.raises(NotOursError, match="input0/dict.txt"):
        sentence_prediction.prepare_data(cfg)
    assert fingerprint(tmp_path) == before  # not even the glue and bpe folders were written


def test_generating_a_corpus_into_the_users_corpus_folder_changes_nothing(tmp_path):
    from nbzoo import masked_lm
    from nbzoo.safe_write import NotOursError

    data = users_folder(
        tmp_path / "seed",
        {
            "corpus/train_corpus.txt": b"my own text\n",
            "corpus/test_corpus.txt": b"more of it\n",
            "lf_token/vocab.json": b"{}",
            "lf_token/unrelated.txt": b"keep me",
        },
    )
    before = fingerprint(data)
    cfg = config("04_reformer_mlm", data_dir=str(data), sample_sizes={"train": 30, "test": 10})
    with pytest.raises(NotOursError, match="corpus/test_corpus.txt"):
        masked_lm.prepare_data(cfg)
    assert fingerprint(data) == before


def test_generating_mlperf_shards_into_the_users_shard_folder_changes_nothing(tmp_path):
    from nbzoo import pretraining
    from nbzoo.safe_write import NotOursError

    data = users_folder(
        tmp_path / "tfrecord",
        {"vocab.txt": b"[PAD]\n[UNK]\n", "part-00000-of-00500.tfrecord": b"\x00" * 64},
    )
    before = fingerprint(data)
    cfg = config("06_bert_thor", data_dir=str(data), num_samples=40, samples_per_shard=10)
    with pytest.raises(NotOursError, match="part-00000-of-00500"):
        pretraining.prepare_data(cfg)
    assert fingerprint(data) == before


# --- defect 2: nbzoo.infer never takes a folder of the user's for its own output ---------------


def tiny_onnx(folder: Path, batch: int | str = "batch", rows: int = 4) -> Path:
    """A one-input ONNX model: logits[i] = (sum of input_ids[i], its negative)."""
    import onnx
    from onnx import TensorProto, helper

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, [batch, rows])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["f", "axes"], ["s"], keepdims=1),
        helper.make_node("Neg", ["s"], ["n"]),
        helper.make_node("Concat", ["s", "n"], ["logits"], axis=1),
    ]
    graph = helper.make_graph(nodes, "tiny", [ids], [logits], [axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "tiny.onnx"))
    return folder / "tiny.onnx"


def samples(folder: Path, n: int = 6, rows: int = 4) -> Path:
    inputs = folder / "input_ids"
    inputs.mkdir(parents=True)
    for i in range(n):
        np.save(inputs / f"{i}.npy", np.full((1, rows), i, dtype=np.int64))
    return inputs


def infer_argv(model: Path, inputs: Path, output: Path, name: str = "run") -> list[str]:
    return ["--model", str(model), "--input", str(inputs), "--output", str(output)] + [
        "--output_dirname", name, "--outfmt", "NPY", "--batchsize", "2",
    ]  # fmt: skip


def test_infer_never_deletes_a_users_folder_that_looks_like_its_output(tmp_path, capsys):
    from nbzoo import infer

    model, inputs = tiny_onnx(tmp_path / "m"), samples(tmp_path / "in")
    user = users_folder(
        tmp_path / "minutes",
        {
            "notes/meeting_1.txt": b"we met\n",
            "notes/meeting_2.txt": b"we met again\n",
            "notes_summary.json": b'{"mine": true}\n',
        },
    )
    before = fingerprint(user)
    assert infer.main(infer_argv(model, inputs, user, "notes")) == 2
    message = one_line(capsys.readouterr().err)
    assert "notes" in message and "nbzoo did not write" in message
    assert fingerprint(user) == before


# --- defect 7: the ais_bench stand-in and the stand-ins' folder -------------------------------


def test_cann_standins_never_overwrite_the_users_own_atc(tmp_path, capsys):
    from nbzoo.export import cann_standins

    user = users_folder(tmp_path / "cann", {"bin/atc": b"#!/bin/sh\necho the real atc\n"})
    before = fingerprint(user)
    assert cann_standins.main([str(user)]) == 2
    assert "bin/atc" in one_line(capsys.readouterr().err)
    assert fingerprint(user) == before


def standin_om(work: Path, batch: int, seq: int) -> None:
    """A stand-in ``outputs/albert_seq{seq}_bs{batch}.om`` wrapping a model with the seed's three
    inputs (static shapes, as ATC makes them)."""
    from onnx import TensorProto, helper

    from nbzoo.export import cann_standins

    names = ("input_ids", "attention_mask", "token_type_ids")
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, [batch, seq]) for n in names]
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 1])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["f", "axes"], ["logits"], keepdims=1),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, [out], [axes]),
        opset_imports=[helper.make_opsetid("", 13)],
    )
    (work / "outputs").mkdir(parents=True)
    om = work / "outputs" / f"albert_seq{seq}_bs{batch}.om"
    header = json.dumps({"standin": cann_standins.MARKER}).encode()
    om.write_bytes(cann_standins.OM_MAGIC + header + b"\n" + model.SerializeToString())
    for name in names:
        (work / f"preprocessed_data_seq{seq}" / name).mkdir(parents=True)


def run_standin_ais_bench(work: Path, tools: Path, batch: int, seq: int):
    from nbzoo.export import cann_standins

    argv = [sys.executable, *cann_standins.seed_ais_bench_argv(seq, batch)[1:]]
    env = {**os.environ, "PYTHONPATH": str(tools / "python")}
    return subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=120)


def test_the_ais_bench_standin_writes_each_sample_of_a_batch_to_its_own_file(tmp_path):
    """Input files named alike up to their first dot (s.0.npy ... s.3.npy) would all be named
    s_0.npy by ais_bench's naming rule ({basename.split('.')[0]}_{k}); the stand-in never writes
    one batch's four samples into one file listed four times."""
    from nbzoo.export import cann_standins

    tools = cann_standins.write(tmp_path / "cann").root
    work = tmp_path / "work"
    standin_om(work, batch=4, seq=8)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        for i in range(4):
            np.save(work / "preprocessed_data_seq8" / name / f"s.{i}.npy", np.full((1, 8), i))
    done = run_standin_ais_bench(work, tools, 4, 8)
    out = work / "results" / "seq8_bs4"
    if done.returncode == 0:
        summary = json.loads((work / "results" / "seq8_bs4_summary.json").read_text())
        written = [e["outfiles"][0] for e in summary["filesinfo"].values()]
        assert len(set(written)) == len(written) == 4
        assert len(list(out.iterdir())) == 4
    else:
        assert "s.0.npy" in done.stderr and "s.1.npy" in done.stderr and "s_0.npy" in done.stderr
        assert not out.exists() and not (work / "results" / "seq8_bs4_summary.json").exists()


# --- defect 10: a refused pickle in trainer_state.pt is set aside ------------------------------


class _Foreign:
    """Not an allowed type of torch.load(weights_only=True): a pickle it refuses."""


def toy_fit(folder: Path, steps: int | None = None):
    from nbzoo import device
    from nbzoo.train import TrainConfig, fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    data = [{"x": x[i], "y": (x[i].sum() > 0).long()} for i in range(32)]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    cfg = TrainConfig(epochs=1, batch_size=8, checkpoint_dir=folder, run_id="toy", max_steps=steps)
    return fit(
        model,
        data,
        torch.optim.SGD(model.parameters(), lr=0.1),
        device.Runtime("cpu", "fp32"),
        cfg,
        loss_fn=lambda m, b: torch.nn.functional.cross_entropy(m(b["x"]), b["y"]),
    )


def test_a_refused_pickle_in_trainer_state_is_set_aside_and_the_rerun_proceeds(tmp_path, capsys):
    folder = tmp_path / "training"
    toy_fit(folder, steps=2)
    state = folder / "last" / "trainer_state.pt"
    torch.save({"state": _Foreign()}, state)  # a valid zip whose pickle weights_only refuses
    bad = state.read_bytes()
    result = toy_fit(folder)
    assert result.resumed_from_step is None and result.steps == 4
    out = capsys.readouterr().out
    aside = [p for p in folder.iterdir() if p.name.startswith("broken-last")]
    assert len(aside) == 1 and (aside[0] / "trainer_state.pt").read_bytes() == bad
    assert f"set aside as {aside[0]}" in out and "trainer_state.pt" in out


# --- defect 11: extraction is all or nothing ---------------------------------------------------


def test_extraction_that_meets_a_file_where_the_archive_has_a_folder_writes_nothing(tmp_path):
    from nbzoo.data import DownloadError, extract_zip

    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("A/first.txt", "1")
        zf.writestr("B/second.txt", "2")
        zf.writestr("C/third.txt", "3")
    into = users_folder(tmp_path / "into", {"B": b"a file where the archive has a folder"})
    before = fingerprint(tmp_path)
    with pytest.raises(DownloadError, match="B"):
        extract_zip(archive, into)
    assert fingerprint(tmp_path) == before


# --- defect 13: one clear line from every command line, never a traceback ----------------------


def test_nbzoo_results_names_a_record_without_preset_instead_of_a_traceback(tmp_path, capsys):
    from nbzoo import cli

    record = {"notebook": "01_albert_glue", "metrics": {"sst2_accuracy": 0.9}, "device": "cpu"}
    (tmp_path / "01_albert_glue.json").write_text(json.dumps(record))
    code = cli.main(["results", "--dir", str(tmp_path)])
    captured = capsys.readouterr()
    assert code in (0, 1) and "Traceback" not in captured.err + captured.out
    assert "01_albert_glue.json" in one_line(captured.err) and "preset" in captured.err


def test_infer_with_output_a_file_is_one_line(tmp_path, capsys):
    from nbzoo import infer

    model, inputs = tiny_onnx(tmp_path / "m"), samples(tmp_path / "in")
    (tmp_path / "out").write_text("a file")
    assert infer.main(infer_argv(model, inputs, tmp_path / "out")) == 2
    assert "out" in one_line(capsys.readouterr().err)
    assert (tmp_path / "out").read_text() == "a file"


@pytest.mark.parametrize(
    "failure", [errno.EACCES, errno.EROFS, errno.ENOSPC], ids=["denied", "read-only", "full"]
)
def test_infer_on_a_folder_it_cannot_write_is_one_line(tmp_path, capsys, monkeypatch, failure):
    from nbzoo import infer

    model, inputs = tiny_onnx(tmp_path / "m"), samples(tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    real_save = np.save

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(failure, os.strerror(failure))
        return real_save(path, *args, **kwargs)

    monkeypatch.setattr(np, "save", refuse)
    assert infer.main(infer_argv(model, inputs, out)) == 1
    message = one_line(capsys.readouterr().err)
    assert "cannot write" in message and str(out) in message
    assert list(out.iterdir()) == []


def fairseq_checkpoint(path: Path) -> Path:
    from transformers import RobertaForSequenceClassification

    from tests.test_fairseq_convert import fairseq_names, randomized, save_fairseq, tiny_config

    model = randomized(RobertaForSequenceClassification(tiny_config(num_labels=2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_fairseq(path, fairseq_names(model.state_dict()))


FULL_DISK = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
from nbzoo import convert_fairseq
sys.exit(convert_fairseq.main(sys.argv[1:]))
"""


def test_convert_fairseq_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    checkpoint = fairseq_checkpoint(tmp_path / "ckpt" / "model.pt")
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(checkpoint), str(out), "--num-labels", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    message = one_line(done.stderr)
    assert "cannot write" in message and "out" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cann_standins_given_a_file_is_one_line(tmp_path, capsys):
    from nbzoo.export import cann_standins

    (tmp_path / "tools").write_text("a file")
    assert cann_standins.main([str(tmp_path / "tools")]) == 2
    assert "tools" in one_line(capsys.readouterr().err)
    assert (tmp_path / "tools").read_text() == "a file"


def test_cann_standins_in_a_read_only_folder_is_one_line(tmp_path, capsys, monkeypatch):
    from nbzoo.export import cann_standins

    def read_only(self, *args, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    assert cann_standins.main([str(tmp_path / "tools")]) == 1
    assert "cannot write" in one_line(capsys.readouterr().err)
