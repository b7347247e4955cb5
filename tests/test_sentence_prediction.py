"""fairseq's SST-2 fine-tuning recipe on nbzoo: data preparation, model, optimizer, downloads."""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import tarfile
import threading

import pytest
import torch
from transformers import RobertaConfig, RobertaForMaskedLM

from nbzoo import presets, standins
from nbzoo import sentence_prediction as sp
from nbzoo.data import gpt2_bpe
from nbzoo.device import setup


def demo_cfg(tmp_path, **overrides):
    names = {k: None for k in presets.load("03_roberta_sst2")["demo"]}
    names.update(
        seed=0,
        data_dir=str(tmp_path / "SST-2-bin"),
        glue_dir=str(tmp_path / "glue"),
        bpe_dir=str(tmp_path / "bpe"),
        checkpoint_dir=str(tmp_path / "ck"),
        sample_sizes={"train": 160, "dev": 40, "test": 8},
        epochs=1,
        **overrides,
    )
    return presets.resolve("03_roberta_sst2", "demo", names)


def test_schedule_is_fairseqs_polynomial_decay_with_warmup():
    """fairseq's polynomial_decay (power 1, end lr 0): lr·t/w while warming up, then
    lr·(1 - (t - w)/(T - w)); Adam's weight decay applies to every parameter."""
    cfg = argparse.Namespace(
        learning_rate=1e-5,
        adam_betas=[0.9, 0.98],
        adam_eps=1e-6,
        weight_decay=0.1,
        warmup_ratio=0.06,
    )
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    total = 200
    optimizer, scheduler = sp.make_optimizer(model, cfg, total)
    (group,) = optimizer.param_groups
    assert len(group["params"]) == 4 and group["weight_decay"] == 0.1
    assert group["betas"] == (0.9, 0.98) and group["eps"] == 1e-6
    assert isinstance(optimizer, torch.optim.AdamW)  # decoupled decay, as fairseq's Adam
    warmup = 12  # 6% of 200
    for t in range(total + 1):
        want = 1e-5 * t / warmup if t <= warmup else 1e-5 * (1 - (t - warmup) / (total - warmup))
        assert optimizer.param_groups[0]["lr"] == pytest.approx(want, abs=1e-14), t
        optimizer.step()
        scheduler.step()


def test_the_full_presets_schedule_counts_fairseqs_updates_whatever_the_epochs():
    """fairseq's SST-2 recipe: warm-up 1256 updates, decay to 0 at update 20935, the same on the
    1-epoch row (about 2,100 updates, ending early in the decay) and the 10-epoch 8p row."""
    model = torch.nn.Linear(3, 3)
    for preset in ("full", "full_8p", "full_8p_on_1"):
        cfg = presets.Config(presets.load("03_roberta_sst2")[preset])
        assert sp.schedule_updates(cfg, run_updates=2105) == (1256, 20935)
        optimizer, scheduler = sp.make_optimizer(model, cfg, 2105)
        lrs = []
        for _ in range(20935 + 2):
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        assert lrs[1256] == pytest.approx(1e-5) and max(lrs) == lrs[1256]
        assert lrs[2105] == pytest.approx(1e-5 * (1 - (2105 - 1256) / (20935 - 1256)))
        assert lrs[20935] == 0.0
    demo = presets.Config(presets.load("03_roberta_sst2")["demo"])
    assert sp.schedule_updates(demo, run_updates=300) == (18, 300)  # warmup_ratio 0.06


def test_demo_pipeline_binarizes_trains_and_predicts(tmp_path):
    cfg = demo_cfg(tmp_path)
    folder = sp.prepare_data(cfg)
    assert (folder / "input0" / "train.idx").exists() and (folder / "label" / "dict.txt").exists()
    rt = setup("cpu", "fp32", 0)
    run = sp.finetune(cfg, rt, folder)
    assert run.result.steps == 5  # 160 sentences / batch 32, one epoch
    assert 0.0 <= run.accuracy <= 1.0 and run.result.evals[-1]["accuracy"] == run.accuracy
    config = run.model.config
    assert config.vocab_size == len(run.splits["train"].dictionary)
    assert config.max_position_embeddings == cfg.max_positions + 2 and config.pad_token_id == 1
    encoder = gpt2_bpe.RobertaEncoder.from_dir(tmp_path / "bpe")
    (row,) = sp.predict_sentences(run.model, encoder, ["the movie is funny ."], ["1", "0"], rt)
    assert row[0] == "the movie is funny ." and row[1] in ("1", "0") and 0.5 <= row[2] <= 1.0


def test_max_tokens_batches_as_fairseq_and_the_schedule_counts_those_batches(tmp_path):
    cfg = demo_cfg(tmp_path, max_tokens=160, packing="plain")  # fairseq's own order
    folder = sp.prepare_data(cfg)
    train = sp.load_splits(folder, cfg.max_positions)["train"]
    plan = sp.batch_plan(cfg, train)
    batches = plan(0, 0, 1)
    assert sorted(i for b in batches for i in b) == list(range(len(train)))
    assert all(len(b) * train.item_tokens[b].max() <= 160 and len(b) <= 32 for b in batches)
    assert len(batches) > 5  # more batches than 160 / 32 sentences: the token limit binds
    rt = setup("cpu", "fp32", 0)
    run = sp.finetune(cfg, rt, folder)
    assert run.result.steps == len(batches)
    assert run.result.samples == len(train)
    assert sp.batch_plan(demo_cfg(tmp_path, max_tokens=0, packing="plain"), train) is None


def test_the_seeds_lable_folder_is_read_like_label(tmp_path):
    cfg = demo_cfg(tmp_path)
    folder = sp.prepare_data(cfg)
    before = sp.load_splits(folder, cfg.max_positions)["valid"]
    (folder / "label").rename(folder / "lable")
    assert sp.prepare_data(demo_cfg(tmp_path, data_source="binarized")) == folder
    after = sp.load_splits(folder, cfg.max_positions)["valid"]
    assert after.label_dir.name == "lable" and after.class_names == before.class_names
    assert (after.targets == before.targets).all()
    (folder / "label").mkdir()
    with pytest.raises(ValueError, match="both label/ and lable/ exist"):
        sp.load_splits(folder, cfg.max_positions)


def test_binarized_source_must_be_fairseqs_layout(tmp_path):
    cfg = demo_cfg(tmp_path, data_source="binarized")
    with pytest.raises(
        FileNotFoundError, match=r"SST-2-bin/input0/dict\.txt: missing; data_dir must be"
    ):
        sp.prepare_data(cfg)
    (tmp_path / "SST-2-bin" / "input0").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no label/ \(or the seed's lable/\) folder.*"):
        sp.prepare_data(cfg)
    with pytest.raises(FileNotFoundError, match=r"fairseq-preprocess --only-source"):
        sp.prepare_data(cfg)
    with pytest.raises(
        ValueError, match="data_source must be one of generate, download, binarized"
    ):
        sp.prepare_data(demo_cfg(tmp_path, data_source="hub"))


def _tiny_fairseq_checkpoint(path, vocab: int):
    config = RobertaConfig(
        vocab_size=vocab,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=66,
        type_vocab_size=1,
    )
    sd = standins.fairseq_roberta_state_dict(RobertaForMaskedLM(config))
    args = argparse.Namespace(encoder_attention_heads=2, activation_fn="gelu")
    torch.save({"args": args, "model": sd}, path)


class _Files(http.server.BaseHTTPRequestHandler):
    def __init__(self, *args, files, **kwargs):
        self.files = files
        super().__init__(*args, **kwargs)

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_files():
    files: dict[str, bytes] = {}
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_Files, files=files)
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files
    server.shutdown()


def test_full_path_downloads_roberta_base_and_converts_it(tmp_path, http_files):
    """The full preset's model path: fetch the roberta.base archive from a (local) server, unpack
    model.pt beside the seed's path, convert it, and check its vocabulary against the data's."""
    base, files = http_files
    folder = sp.prepare_data(demo_cfg(tmp_path))
    dictionary = sp.load_splits(folder, 64)["train"].dictionary
    _tiny_fairseq_checkpoint(tmp_path / "model.pt", vocab=len(dictionary))
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        tar.add(tmp_path / "model.pt", arcname="roberta.base/model.pt")
        info = tarfile.TarInfo("../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    files["/roberta.base.tar.gz"] = archive.getvalue()
    target = tmp_path / "pre_train_model" / "RoBERTa.base" / "model.pt"
    cfg = demo_cfg(tmp_path, model_name=str(target), model_url=f"{base}/roberta.base.tar.gz")
    model = sp.build_model(cfg, dictionary, num_classes=2)
    assert target.exists() and not (tmp_path / "escape.txt").exists()
    assert model.config.num_labels == 2 and model.config.hidden_dropout_prob == cfg.dropout
    _tiny_fairseq_checkpoint(target, vocab=50)
    with pytest.raises(ValueError, match=r"embeddings for 50 symbols, but the data's dictionary"):
        sp.build_model(cfg, dictionary, num_classes=2)


def test_a_damaged_roberta_archive_is_named_and_nothing_half_written_is_left(tmp_path, http_files):
    from nbzoo.data import DownloadError

    base, files = http_files
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:gz") as tar:
        data = bytes(range(256)) * 4000
        info = tarfile.TarInfo("roberta.base/model.pt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    files["/roberta.base.tar.gz"] = payload.getvalue()[:-200]  # cut inside the gzip stream
    target = tmp_path / "RoBERTa.base" / "model.pt"
    with pytest.raises(DownloadError, match=r"roberta.base.tar.gz: damaged archive"):
        sp.download_roberta_base(target, f"{base}/roberta.base.tar.gz")
    assert sorted(p.name for p in target.parent.iterdir() if p.name != ".nbzoo-owned") == [
        "roberta.base.tar.gz"
    ]
