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


def toy_fit(folder: Path, steps: int | None = None, run_id: str = "toy"):
    from nbzoo import device
    from nbzoo.train import TrainConfig, fit

    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    data = [{"x": x[i], "y": (x[i].sum() > 0).long()} for i in range(32)]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    cfg = TrainConfig(epochs=1, batch_size=8, checkpoint_dir=folder, run_id=run_id, max_steps=steps)
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
    assert "Unsupported global" in out and "_Foreign" in out  # why, not how to load it anyway


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


# --- every writer: the user's folder is untouched when it succeeds, refuses and fails ----------
#
# For each writer: ``write(folder)`` writes its output into ``folder`` (raising on refusal or
# failure), ``same_names`` are files of the user's named as the writer's outputs, ``beside`` the
# files it writes next to its folder, ``break_`` makes one of its writes fail half-way
# (OSError ENOSPC, or a transfer cut off) through the monkeypatch it is given.


class Writer:
    def __init__(
        self, write, same_names, break_, beside=(), resumable=False, scratch=False, closer=None
    ):
        self.write, self.same_names, self.break_, self.beside = write, same_names, break_, beside
        # a download cut off keeps its .part in nbzoo's folder, to resume from on the next run;
        # a scratch folder (build/) is emptied by every run, a failed one too
        self.resumable, self.scratch = resumable, scratch
        self.close = closer or (lambda: None)


def _local_server():
    """The download tests' HTTP server on 127.0.0.1 (tests/test_download.py), a fresh state."""
    from tests import test_download as td

    td.Handler.files, td.Handler.requests, td.Handler.mode = {}, [], None
    td.Handler.break_after, td.Handler.validators, td.Handler.versions = None, "both", {}
    httpd = td.http.server.ThreadingHTTPServer(("127.0.0.1", 0), td.Handler)
    td.threading.Thread(target=httpd.serve_forever, daemon=True).start()

    def close():
        httpd.shutdown()
        httpd.server_close()

    return f"http://127.0.0.1:{httpd.server_address[1]}", td, close


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _full_after(n: int, real):
    """``real``, but the call after the first ``n`` ones fails as on a full disk."""
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            _full()
        return real(*args, **kwargs)

    return wrapper


def _cli(main, argv) -> None:
    if (code := main(argv)) != 0:
        raise RuntimeError(f"exit {code}")


def _texts() -> list[str]:
    from nbzoo.data import glue

    return glue.generate_split("sst2", 60, seed=0).text_a


def _glue_generator(tmp_path, monkeypatch):
    from nbzoo import safe_write
    from nbzoo.data import glue

    return Writer(
        lambda folder: glue.write_sample_dataset(folder, "sst2", GLUE_SIZES),
        {"SST-2/train.tsv": b"sentence\tlabel\nmine\t1\n", "SST-2/dev.tsv": b"mine\n"},
        lambda mp: mp.setattr(
            safe_write.Owned, "_install", _full_after(1, safe_write.Owned._install)
        ),
    )


def _glue_download(tmp_path, monkeypatch):
    from nbzoo.data import glue

    url, td, close = _local_server()
    td._serve_glue(monkeypatch, url, td._glue_archive(tmp_path / "archive.zip"))
    return Writer(
        lambda folder: glue.download_task(folder, "sst2"),
        {"SST-2.zip": b"PK my own zip", "SST-2/dev.tsv": b"mine\n"},
        lambda mp: mp.setattr(td.Handler, "break_after", 100),
        resumable=True,
        closer=close,
    )


def _bpe_learner(tmp_path, monkeypatch):
    from nbzoo.data import fairseq
    from nbzoo.data.gpt2_bpe import train_bpe

    return Writer(
        lambda folder: train_bpe(_texts(), folder, vocab_size=300),
        {"encoder.json": b"{}", "dict.txt": b"1 1\n"},
        lambda mp: mp.setattr(fairseq.Dictionary, "save", _full),
    )


def _gpt2_bpe_download(tmp_path, monkeypatch):
    from nbzoo.data import gpt2_bpe, sources

    url, td, close = _local_server()
    td.Handler.files = {f"/{n}": f"{n} content\n".encode() * 50 for n in gpt2_bpe.GPT2_BPE_FILES}
    files = {n: sources.Remote(f"{url}/{n}", None, None, "test") for n in gpt2_bpe.GPT2_BPE_FILES}
    monkeypatch.setattr(gpt2_bpe, "GPT2_BPE_FILES", files)
    return Writer(
        gpt2_bpe.download_gpt2_bpe,
        {"encoder.json": b"{}", "notes.txt": b"x"},
        lambda mp: mp.setattr(td.Handler, "break_after", 10),
        resumable=True,
        closer=close,
    )


def _binarizer(tmp_path, monkeypatch):
    from nbzoo.data import fairseq_glue, glue
    from nbzoo.data.gpt2_bpe import RobertaEncoder, train_bpe

    source = tmp_path / "source"
    glue.write_sample_dataset(source / "glue", "sst2", GLUE_SIZES)
    train_bpe(glue.read_split(source / "glue", "sst2", "train").text_a, source / "bpe", 300)
    encoder = RobertaEncoder.from_dir(source / "bpe")
    return Writer(
        lambda folder: fairseq_glue.binarize_sst2(source / "glue", folder, encoder),
        {"input0/dict.txt": b"1 1\n", "input0/train.bin": b"\x00"},
        lambda mp: mp.setattr(
            fairseq_glue, "write_dataset", _full_after(2, fairseq_glue.write_dataset)
        ),
    )


def _corpus_generator(tmp_path, monkeypatch):
    from tokenizers import ByteLevelBPETokenizer

    from nbzoo.data import corpus

    return Writer(
        lambda folder: corpus.prepare_data(folder, "generate", {"train": 30, "test": 10}, 0, 300),
        {"corpus/train_corpus.txt": b"mine\n", "lf_token/vocab.json": b"{}"},
        lambda mp: mp.setattr(ByteLevelBPETokenizer, "save_model", _full),
    )


def _mlperf_generator(tmp_path, monkeypatch):
    from nbzoo.data import mlperf

    spec = mlperf.SampleSpec(vocab_size=64, seq_length=16, max_predictions=3)
    return Writer(
        lambda folder: mlperf.generate_sample_shards(folder, 20, 10, spec),
        {"vocab.txt": b"[PAD]\n", "part-00000-of-00002.tfrecord": b"\x00" * 16},
        lambda mp: mp.setattr(mlperf, "write_shard", _full_after(1, mlperf.write_shard)),
    )


def _checkpoints(tmp_path, monkeypatch):
    from nbzoo import train

    runs = iter(range(100))  # each run another configuration: it trains and saves
    return Writer(
        lambda folder: toy_fit(folder, run_id=f"toy-{next(runs)}"),
        {"last/model.safetensors": b"mine", "last/trainer_state.pt": b"mine"},
        lambda mp: mp.setattr(train.torch, "save", _full),
    )


def _finetuned(tmp_path, monkeypatch):
    import transformers

    from nbzoo import device, finetune
    from nbzoo.data import glue

    data = {s: glue.generate_split("sst2", 24, 0, s) for s in ("train", "dev")}
    model_config = {"embedding_size": 8, "hidden_size": 16, "num_hidden_layers": 1}
    model_config |= {"num_attention_heads": 2, "intermediate_size": 16}

    def write(folder):
        cfg = config("01_albert_glue", checkpoint_dir=str(folder), epochs=1, batch_size=8)
        cfg.update(max_steps=1, max_seq_length=16, model_config=model_config, packing="off")
        finetune.finetune_glue("sst2", cfg, device.Runtime("cpu", "fp32"), data)

    return Writer(
        write,
        {"sst2/config.json": b"{}", "sst2/model.safetensors": b"mine"},
        lambda mp: mp.setattr(
            transformers.PreTrainedTokenizerBase, "save_pretrained", _full, raising=False
        ),
    )


def _masked_lm_weights(tmp_path, monkeypatch):
    from nbzoo import masked_lm
    from nbzoo.train import TrainResult

    def write(folder):
        torch.manual_seed(0)
        masked_lm.save_weights(torch.nn.Linear(3, 2), folder, TrainResult([], [], 0, 0, 0.0, None))

    return Writer(
        write,
        {"model.safetensors": b"mine", "training_record.json": b"{}"},
        lambda mp: mp.setattr(masked_lm, "save_model", _full),
    )


def _convert_fairseq(tmp_path, monkeypatch):
    from transformers import RobertaForSequenceClassification

    from nbzoo import convert_fairseq

    checkpoint = fairseq_checkpoint(tmp_path / "ckpt" / "model.pt")
    return Writer(
        lambda folder: _cli(
            convert_fairseq.main, [str(checkpoint), str(folder), "--num-labels", "2"]
        ),
        {"config.json": b"{}", "model.safetensors": b"mine"},
        lambda mp: mp.setattr(RobertaForSequenceClassification, "save_pretrained", _full),
    )


def _launch_record(tmp_path, monkeypatch):
    from nbzoo import launch, safe_write

    return Writer(
        lambda folder: launch.write_record(folder / "record.json", {"result": [1, 2]}),
        {"record.json": b'{"mine": true}'},
        lambda mp: mp.setattr(safe_write.Owned, "_install", _full),
    )


def _executed_notebook(tmp_path, monkeypatch):
    import nbformat

    from nbzoo import cli, safe_write

    notebook = tmp_path / "notebooks" / "01_probe.ipynb"
    notebook.parent.mkdir()
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print('ran')")])
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nbformat.write(nb, notebook)
    return Writer(
        lambda folder: cli.execute(notebook, folder / "01_probe.ipynb", {}, "python3"),
        {"01_probe.ipynb": b'{"cells": []}', "01_probe.failed.ipynb": b"my notes"},
        lambda mp: mp.setattr(safe_write.os, "replace", _full),
    )


def _results_record(tmp_path, monkeypatch):
    from nbzoo import device, metrics, safe_write

    def write(folder):
        rt = device.Runtime("cpu", "fp32")
        metrics.write_results(
            "01_albert_glue", preset="demo", rt=rt, metrics={"sst2_accuracy": 0.5},
            reference={}, output_dir=folder,
        )  # fmt: skip

    return Writer(
        write,
        {"01_albert_glue.json": b'{"notebook": "mine"}'},
        lambda mp: mp.setattr(safe_write.os, "replace", _full),
    )


def _infer(tmp_path, monkeypatch):
    from nbzoo import infer

    model, inputs = tiny_onnx(tmp_path / "m"), samples(tmp_path / "in")

    def write(folder):
        _cli(infer.main, infer_argv(model, inputs, folder.parent, folder.name))

    return Writer(
        write,
        {"0_0.npy": b"mine", "1_0.npy": b"mine too"},
        lambda mp: mp.setattr(np, "save", _full_after(2, np.save)),
        beside=("{name}_summary.json",),
    )


def _cann_standins(tmp_path, monkeypatch):
    from nbzoo import safe_write
    from nbzoo.export import cann_standins

    return Writer(
        lambda folder: _cli(cann_standins.main, [str(folder)]),
        {"bin/atc": b"#!/bin/sh\n", "python/ais_bench/__init__.py": b""},
        lambda mp: mp.setattr(
            safe_write.Owned, "_install", _full_after(1, safe_write.Owned._install)
        ),
    )


def _standin_checkpoint(tmp_path, monkeypatch):
    import transformers

    from nbzoo import standins

    bert = {"model_type": "bert", "vocab_size": 32, "hidden_size": 8, "num_hidden_layers": 1}
    bert |= {"num_attention_heads": 2, "intermediate_size": 8, "max_position_embeddings": 16}
    return Writer(
        lambda folder: standins.write_hf_checkpoint(folder, bert, "BertForMaskedLM"),
        {"config.json": b"{}", "model.safetensors": b"mine"},
        lambda mp: mp.setattr(transformers.PreTrainedModel, "save_pretrained", _full),
    )


def _notebooks_scratch(tmp_path, monkeypatch):
    import shutil

    from nbzoo import demo

    notebooks = tmp_path / "nb-source"
    notebooks.mkdir()
    (notebooks / "01_albert_glue.ipynb").write_text("{}")

    def write(folder):
        demo.clean_root(folder, notebooks, tmp_path / "results")

    return Writer(
        write,
        {"notebooks/01_albert_glue.ipynb": b"{my edits}"},
        lambda mp: mp.setattr(shutil, "copytree", _full),
        scratch=True,
    )


def _albert_preprocess(tmp_path, monkeypatch):
    from nbzoo.data import albert_preprocess, glue
    from nbzoo.text import word_tokenizer

    dev = glue.generate_split("sst2", 12, seed=0, split="dev")
    tokenizer = word_tokenizer(dev.text_a)
    return Writer(
        lambda folder: albert_preprocess.preprocess(dev, tokenizer, folder, 16),
        {"input_ids/0.npy": b"mine", "label.npy": b"mine"},
        lambda mp: mp.setattr(np, "save", _full_after(5, np.save)),
    )


WRITERS = {
    "GLUE sample generator (01)": _glue_generator,
    "GLUE download and extraction": _glue_download,
    "BPE learner (03)": _bpe_learner,
    "GPT-2 BPE download (03 full)": _gpt2_bpe_download,
    "SST-2 binarizer (03)": _binarizer,
    "corpus and tokenizer generator (04, 05)": _corpus_generator,
    "MLPerf shard generator (06)": _mlperf_generator,
    "training checkpoints": _checkpoints,
    "fine-tuned checkpoint (01)": _finetuned,
    "masked-LM weights (04, 05)": _masked_lm_weights,
    "convert_fairseq": _convert_fairseq,
    "torchrun launch records": _launch_record,
    "results record": _results_record,
    "executed notebook (nbzoo run)": _executed_notebook,
    "nbzoo.infer": _infer,
    "cann_standins": _cann_standins,
    "stand-in checkpoints (rehearsal)": _standin_checkpoint,
    "make notebooks' scratch root": _notebooks_scratch,
    "ALBERT preprocessing (02)": _albert_preprocess,
}


def _outside(before: dict[str, str], after: dict[str, str], own: str, beside=()) -> None:
    """Every path of ``before`` is in ``after`` with the same bytes; what was added lies in the
    writer's own folder ``own`` or is one of the files it writes beside it."""
    assert {k: v for k, v in after.items() if k in before} == before
    added = [k for k in after if k not in before]
    allowed = (own, *(b.format(name=own) for b in beside))
    assert all(k == own or k.startswith(own + "/") or k in allowed for k in added), added


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if ".nbzoo-tmp-" in p.name]


@pytest.fixture(params=list(WRITERS))
def writer(request, tmp_path, monkeypatch, one_torch_thread):
    made = WRITERS[request.param](tmp_path, monkeypatch)
    user = users_folder(tmp_path / "user", made.same_names)
    yield made, user
    made.close()


def test_a_writer_given_a_folder_of_the_users_refuses_and_changes_nothing(writer, capsys):
    made, user = writer
    before = fingerprint(user.parent)
    with pytest.raises(Exception) as refused:  # noqa: B017  (each writer's own error)
        made.write(user)
    said = str(refused.value) + capsys.readouterr().err
    assert "nbzoo did not write" in said, said
    assert fingerprint(user.parent) == before


def test_a_writer_that_succeeds_beside_the_users_files_leaves_them_as_they_were(writer):
    made, user = writer
    before = fingerprint(user)
    own = user / "nbzoo-out"
    for _ in range(2):  # the first run, and a rerun over its own output
        made.write(own)
        _outside(before, fingerprint(user), "nbzoo-out", made.beside)
    assert list(own.rglob(".nbzoo-owned"))  # nbzoo's folder says so
    _no_temporaries(user)


def test_a_writer_that_fails_half_way_leaves_everything_as_it_was(writer, monkeypatch):
    made, user = writer
    own = user / "nbzoo-out"
    if not made.resumable:  # a run to fail over; a download that has its file fetches nothing
        made.write(own)
    before = fingerprint(user)
    with monkeypatch.context() as mp:
        made.break_(mp)
        with pytest.raises(Exception) as failed:  # noqa: B017  (each writer's own failure)
            made.write(own)
    injected = ("No space left", "incomplete", "broke off", "exit 1")  # not another failure
    assert any(word in str(failed.value) for word in injected), failed.value
    if made.resumable:  # only the .part to resume from, in nbzoo's own folder
        _outside(before, fingerprint(user), "nbzoo-out")
        assert {p.suffix for p in own.iterdir() if p.is_file()} <= {".part", ".json", ""}
    elif made.scratch:  # emptied, and nothing else touched
        after = fingerprint(user)
        assert {k: v for k, v in after.items() if not k.startswith("nbzoo-out")} == {
            k: v for k, v in before.items() if not k.startswith("nbzoo-out")
        }
    else:  # every byte as it was; nbzoo's marker may list the same bytes under a newer time
        assert bookkept(fingerprint(user)) == bookkept(before)
    _no_temporaries(user)


def bookkept(prints: dict[str, str]) -> dict[str, str]:
    return {k: "marker" if k.endswith(".nbzoo-owned") else v for k, v in prints.items()}


# --- the ais_bench stand-in writes where the seed's line says: results/seq8_bs2 -----------------


@pytest.fixture
def seed_work(tmp_path):
    from nbzoo.export import cann_standins

    tools = cann_standins.write(tmp_path / "tools").root
    work = tmp_path / "work"
    standin_om(work, batch=2, seq=8)
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        for i in range(5):
            np.save(work / "preprocessed_data_seq8" / name / f"{i}.npy", np.full((1, 8), i))
    return work, tools


def test_the_ais_bench_standin_never_writes_over_the_users_results_folder(seed_work):
    work, tools = seed_work
    users_folder(work / "results", {"seq8_bs2/0_0.npy": b"mine", "seq8_bs2_summary.json": b"{}"})
    before = fingerprint(work)
    done = run_standin_ais_bench(work, tools, 2, 8)
    assert done.returncode != 0 and "nbzoo did not write" in done.stderr
    assert fingerprint(work) == before


def test_the_ais_bench_standin_beside_the_users_files_and_failing_half_way(seed_work):
    work, tools = seed_work
    users_folder(work / "results", {"seq8_bs1/0_0.npy": b"another run's, of the user's"})
    before = fingerprint(work / "results")
    for _ in range(2):  # the first run, and a rerun over its own output
        assert run_standin_ais_bench(work, tools, 2, 8).returncode == 0
        _outside(before, fingerprint(work / "results"), "seq8_bs2", ("{name}_summary.json",))
    done_once = fingerprint(work)
    (work / "preprocessed_data_seq8" / "input_ids" / "3.npy").write_bytes(b"\x93NUMPY broken")
    done_once = {**done_once, "preprocessed_data_seq8/input_ids/3.npy": fingerprint(work)[
        "preprocessed_data_seq8/input_ids/3.npy"
    ]}  # fmt: skip
    assert run_standin_ais_bench(work, tools, 2, 8).returncode != 0  # fails on the 4th sample
    assert fingerprint(work) == done_once
    _no_temporaries(work)


# --- folders an nbzoo without markers wrote --------------------------------------------------


def _without_markers(folder: Path) -> None:
    for marker in folder.rglob(".nbzoo-owned"):
        marker.unlink()


def _glue_demo(folder: Path) -> None:
    from nbzoo import finetune

    cfg = config("01_albert_glue", data_dir=str(folder), sample_sizes=GLUE_SIZES)
    finetune.prepare_data("sst2", cfg)


def _corpus_demo(folder: Path) -> None:
    from nbzoo import masked_lm

    sizes = {"train": 30, "test": 10}
    masked_lm.prepare_data(config("04_reformer_mlm", data_dir=str(folder), sample_sizes=sizes))


def _mlperf_demo(folder: Path) -> None:
    from nbzoo import pretraining

    cfg = config("06_bert_thor", data_dir=str(folder), num_samples=20, samples_per_shard=10)
    pretraining.prepare_data(cfg)


ADOPTABLE = {"01": _glue_demo, "04 and 05": _corpus_demo, "06": _mlperf_demo}


@pytest.mark.parametrize("notebook", list(ADOPTABLE))
def test_demo_data_written_before_markers_is_adopted_only_when_byte_identical(tmp_path, notebook):
    from nbzoo.safe_write import NotOursError

    generate = ADOPTABLE[notebook]
    folder = tmp_path / "data"
    generate(folder)
    _without_markers(folder)  # as an nbzoo before this change left it
    same = fingerprint(folder)
    generate(folder)  # adopted: the same bytes, now marked
    assert (folder / ".nbzoo-owned").is_file()
    assert {k: v for k, v in fingerprint(folder).items() if ".nbzoo-owned" not in k} == same
    _without_markers(folder)
    victim = sorted(p for p in folder.rglob("*") if p.is_file())[-1]
    victim.write_bytes(victim.read_bytes() + b"\n")  # one byte of the user's
    changed = fingerprint(folder)
    with pytest.raises(NotOursError, match="nbzoo did not write"):
        generate(folder)
    assert fingerprint(folder) == changed


def test_03s_demo_folders_written_before_markers_are_adopted(tmp_path):
    from nbzoo import sentence_prediction

    cfg = config(
        "03_roberta_sst2",
        data_dir=str(tmp_path / "bin"),
        glue_dir=str(tmp_path / "glue"),
        bpe_dir=str(tmp_path / "bpe"),
        sample_sizes=GLUE_SIZES,
        bpe_vocab_size=300,
    )
    sentence_prediction.prepare_data(cfg)
    _without_markers(tmp_path)
    same = {k: v for k, v in fingerprint(tmp_path).items() if not k.endswith("preprocess.log")}
    sentence_prediction.prepare_data(cfg)
    again = fingerprint(tmp_path)
    assert all((tmp_path / name / ".nbzoo-owned").is_file() for name in ("bin", "glue", "bpe"))
    assert {k: again[k] for k in same} == same
