"""nbzoo.convert_checkpoint: TensorFlow 1 and MindSpore BERT checkpoints, written here from the
formats' specifications (tests/checkpoint_spec_writers.py), into a transformers BertForPreTraining
folder."""

from __future__ import annotations

import hashlib
import importlib.abc
import json
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import BertConfig, BertForPreTraining

from nbzoo import convert_checkpoint, safe_write
from tests import checkpoint_spec_writers as spec

# Google's bert_config.json keys (google-research/bert), a tiny BERT
GOOGLE_CONFIG = {
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 8,
    "initializer_range": 0.02,
    "intermediate_size": 12,
    "max_position_embeddings": 16,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "type_vocab_size": 2,
    "vocab_size": 40,
}
TIED = ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias")

# transformers name -> Google's TF1 name, written out here rather than taken from nbzoo's table:
# google-research/bert modeling.py's scopes and run_pretraining.py's cls/ variables.
GOOGLE_RULES = [
    (r"^bert\.embeddings\.(\w+_embeddings)\.weight$", r"bert/embeddings/\1"),
    (r"^cls\.predictions\.bias$", "cls/predictions/output_bias"),
    (r"^cls\.seq_relationship\.weight$", "cls/seq_relationship/output_weights"),
    (r"^cls\.seq_relationship\.bias$", "cls/seq_relationship/output_bias"),
    (r"\.", "/"),
    (r"/layer/(\d+)/", r"/layer_\1/"),
    (r"LayerNorm/weight$", "LayerNorm/gamma"),
    (r"LayerNorm/bias$", "LayerNorm/beta"),
    (r"/weight$", "/kernel"),
]
# transformers name -> MindSpore's, after the model zoo's table (mindspore-ai/models
# official/nlp/Bert/scripts/ms2tf/ms2tf_config.py, param_name_dict's values)
MINDSPORE_RULES = [
    (r"^bert\.embeddings\.word_embeddings\.weight$",
     "bert.bert.bert_embedding_lookup.embedding_table"),
    (r"^bert\.embeddings\.position_embeddings\.weight$",
     "bert.bert.bert_embedding_postprocessor.full_position_embedding.embedding_table"),
    (r"^bert\.embeddings\.token_type_embeddings\.weight$",
     "bert.bert.bert_embedding_postprocessor.token_type_embedding.embedding_table"),
    (r"^bert\.embeddings\.LayerNorm\.", "bert.bert.bert_embedding_postprocessor.LayerNorm."),
    (r"^bert\.encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.",
     r"bert.bert.bert_encoder.layers.\1.attention.attention.\2_layer."),
    (r"^bert\.encoder\.layer\.(\d+)\.intermediate\.dense\.",
     r"bert.bert.bert_encoder.layers.\1.intermediate."),
    (r"^bert\.encoder\.layer\.", "bert.bert.bert_encoder.layers."),
    (r"^bert\.pooler\.dense\.", "bert.bert.dense."),
    (r"^cls\.predictions\.transform\.", "bert.cls1."),
    (r"^cls\.predictions\.bias$", "bert.cls1.output_bias"),
    (r"^cls\.seq_relationship\.", "bert.cls2.dense."),
    (r"LayerNorm\.weight$", "layernorm.gamma"),
    (r"LayerNorm\.bias$", "layernorm.beta"),
]  # fmt: skip


def renamed(name: str, rules) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = BertConfig(**{**GOOGLE_CONFIG, "hidden_act": "gelu_new"})  # Google's gelu is tanh's
    return BertForPreTraining(config).eval()


def weights(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k not in TIED}


def google_tensors(model, slots=("adam_m", "adam_v")) -> dict[str, np.ndarray]:
    """The model under Google's names, kernels [in, out], with optimizer slots and global_step."""
    out = {}
    for name, array in weights(model).items():
        google = renamed(name, GOOGLE_RULES)
        out[google] = array.T.copy() if google.endswith("/kernel") else array
        for slot in slots:
            out[f"{google}/{slot}"] = np.full_like(out[google], 0.5)
    out["global_step"] = np.array(28252, dtype=np.int64)
    return out


def mindspore_params(model) -> list[tuple[str, np.ndarray]]:
    """The model under the model zoo's names ([out, in] like torch), with THOR's and the
    optimizer's state as bert_thor's training checkpoints hold it."""
    params = [(renamed(k, MINDSPORE_RULES), v) for k, v in weights(model).items()]
    query = "bert.bert.bert_encoder.layers.0.attention.attention.query_layer"
    return params + [
        (f"moments.{params[0][0]}", np.zeros_like(params[0][1])),
        (f"{query}.matrix_A_inv", np.zeros((8, 8), np.float16)),
        (f"{query}.cov_step", np.zeros((1,), np.int32)),
        ("global_step", np.array([3000], np.int32)),
    ]


def write_config(folder: Path, **changes) -> Path:
    path = folder / "bert_config.json"
    path.write_text(json.dumps({**GOOGLE_CONFIG, **changes}))
    return path


def tf1_checkpoint(tmp_path: Path, model, **kwargs) -> Path:
    return spec.write_tf1(tmp_path / "model.ckpt-28252", google_tensors(model), **kwargs)


def mindspore_checkpoint(tmp_path: Path, model) -> Path:
    params = mindspore_params(model)
    return spec.write_mindspore(
        tmp_path / "bert_thor.ckpt",
        params,
        split={params[0][0]},  # the word embeddings as two consecutive slices
        packed={params[1][0]},
        model_type="normal",
    )


class ImportRecorder(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.tried = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "mindspore"):
            self.tried.append(name)
        return None


def convert_recording_imports(src, out, config):
    recorder = ImportRecorder()
    sys.meta_path.insert(0, recorder)
    try:
        result = convert_checkpoint.convert(src, out, config, log=lambda _: None)
    finally:
        sys.meta_path.remove(recorder)
    assert recorder.tried == []
    return result


def assert_converted(out: Path, model) -> None:
    """Every tensor equal to the model's, no decoder in the file; transformers loads the folder
    with nothing missing or unexpected, and its MLM logits are the model's."""
    stored = load_file(str(out / "model.safetensors"))
    expected = weights(model)
    assert set(stored) == set(expected)
    for name, array in expected.items():
        np.testing.assert_array_equal(stored[name], array, err_msg=name)
    loaded, info = BertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    decoder = loaded.cls.predictions.decoder.weight
    assert decoder.data_ptr() == loaded.bert.embeddings.word_embeddings.weight.data_ptr()
    ids = torch.tensor([[2, 7, 11, 39, 5, 0]])
    with torch.no_grad():
        expected_logits = model(input_ids=ids).prediction_logits
        actual = loaded.eval()(input_ids=ids).prediction_logits
    torch.testing.assert_close(actual, expected_logits, rtol=0, atol=0)


def test_a_tf1_checkpoint_converts_every_tensor_equal_with_the_decoder_tied(tmp_path, model):
    # two shards, small blocks: several data blocks, restart points inside them
    src = tf1_checkpoint(tmp_path, model, num_shards=2, block_size=512, restart_interval=4)
    result = convert_recording_imports(src, tmp_path / "out", write_config(tmp_path))
    kernels = [n for n in google_tensors(model, slots=()) if n.endswith("/kernel")]
    assert sorted(result.transposed) == sorted(kernels)
    assert_converted(tmp_path / "out", model)


def test_a_mindspore_ckpt_converts_every_tensor_equal_with_the_decoder_tied(tmp_path, model):
    src = mindspore_checkpoint(tmp_path, model)
    result = convert_recording_imports(src, tmp_path / "out", write_config(tmp_path))
    assert result.transposed == []
    assert_converted(tmp_path / "out", model)


def test_skipped_optimizer_slots_and_global_step_are_counted_and_listed(tmp_path, model, capsys):
    src = tf1_checkpoint(tmp_path, model)
    rc = convert_checkpoint.main([str(src), str(tmp_path / "out"), "--config",
                                  str(write_config(tmp_path))])  # fmt: skip
    out = capsys.readouterr().out
    n = len(weights(model))
    assert rc == 0
    assert f"skipped {2 * n} optimizer state tensors (adam_m {n}, adam_v {n}):" in out
    listed = re.search(r"^  adam_v: (.*)$", out, re.MULTILINE).group(1).split(", ")
    assert sorted(listed) == sorted(k for k in google_tensors(model) if k.endswith("/adam_v"))
    assert "\nskipped global_step\n" in out
    record = json.loads((tmp_path / "out" / convert_checkpoint.RECORD).read_text())
    assert len(record["skipped"]["optimizer_state"]["adam_m"]) == n
    assert record["skipped"]["global_step"] == ["global_step"]


def test_mindspore_optimizer_and_thor_state_is_reported(tmp_path, model):
    src = mindspore_checkpoint(tmp_path, model)
    result = convert_checkpoint.convert(src, tmp_path / "out", write_config(tmp_path),
                                        log=lambda _: None)  # fmt: skip
    assert sorted(result.skipped.optimizer_state) == ["cov_step", "matrix_A_inv", "moments"]
    assert (result.skipped.global_step, result.skipped.other) == (["global_step"], [])


def cli_error(capsys, src, out, config) -> str:
    rc = convert_checkpoint.main([str(src), str(out), "--config", str(config)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert not out.exists()
    return err


def test_a_truncated_shard_names_the_shard_and_the_tensor(tmp_path, model, capsys):
    src = tf1_checkpoint(tmp_path, model)
    shard = Path(f"{src}.data-00000-of-00001")
    shard.write_bytes(shard.read_bytes()[:-100])
    err = cli_error(capsys, src, tmp_path / "out", write_config(tmp_path))
    assert str(shard) in err and "truncated" in err
    assert re.search(r"tensor (bert|cls)/\S+ ends at byte", err)


def test_a_missing_shard_and_a_missing_prefix_are_named(tmp_path, model, capsys):
    src = tf1_checkpoint(tmp_path, model, num_shards=2)
    Path(f"{src}.data-00001-of-00002").unlink()
    err = cli_error(capsys, src, tmp_path / "out", write_config(tmp_path))
    assert f"{src}.data-00001-of-00002: missing (it holds tensor " in err
    err = cli_error(capsys, tmp_path / "model.ckpt-1", tmp_path / "out", write_config(tmp_path))
    assert "model.ckpt-1" in err and "no such checkpoint" in err
    err = cli_error(capsys, tmp_path, tmp_path / "out", write_config(tmp_path))
    assert (
        f"a folder; SRC is a checkpoint prefix or file; its TensorFlow checkpoint prefixes: {src}"
        in err
    )


def test_a_truncated_index_names_the_file_and_the_last_tensor_it_still_holds(
    tmp_path, model, capsys
):
    src = tf1_checkpoint(tmp_path, model)
    index = Path(f"{src}.index")
    index.write_bytes(index.read_bytes()[:300])
    err = cli_error(capsys, src, tmp_path / "out", write_config(tmp_path))
    assert str(index) in err and "truncated" in err
    assert re.search(r"entries read up to tensor (bert|cls)/\S+, then stop", err)


def corrupt(src: Path, model, name: str) -> Path:
    """Flip a byte of tensor ``name`` in a one-shard checkpoint of spec.write_tf1."""
    tensors = google_tensors(model)
    offset = sum(a.nbytes for a in list(tensors.values())[: list(tensors).index(name)])
    shard = Path(f"{src}.data-00000-of-00001")
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    return shard


def test_a_damaged_tensor_fails_its_checksum_naming_the_shard_and_tensor(tmp_path, model, capsys):
    src = tf1_checkpoint(tmp_path, model)
    shard = corrupt(src, model, "bert/embeddings/word_embeddings")
    err = cli_error(capsys, src, tmp_path / "out", write_config(tmp_path))
    assert f"{shard}: tensor bert/embeddings/word_embeddings: checksum mismatch" in err


def zip_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "weights.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.pkl", b"\x80\x02}q\x00.")
    return path.read_bytes()


@pytest.mark.parametrize("kind", ["random bytes", "a zip"])
def test_a_foreign_file_is_refused_naming_it(tmp_path, model, capsys, kind):
    foreign = (
        np.random.default_rng(0).bytes(4096) if kind == "random bytes" else zip_bytes(tmp_path)
    )
    src = tf1_checkpoint(tmp_path, model)
    Path(f"{src}.index").write_bytes(foreign)
    err = cli_error(capsys, src, tmp_path / "out", write_config(tmp_path))
    assert f"{src}.index: not a readable TensorFlow checkpoint index" in err
    assert "no tensor entry can be read from it" in err
    ckpt = tmp_path / "foreign.ckpt"
    ckpt.write_bytes(foreign)
    err = cli_error(capsys, ckpt, tmp_path / "out", write_config(tmp_path))
    assert f"{ckpt}: not a readable MindSpore checkpoint" in err


def test_a_truncated_mindspore_ckpt_names_the_parameter_it_is_cut_in(tmp_path, model, capsys):
    src = mindspore_checkpoint(tmp_path, model)
    data = src.read_bytes()
    cut = data.index(b"bert.bert.bert_encoder.layers.1.output.dense.weight") + 200
    src.write_bytes(data[:cut])
    err = cli_error(capsys, src, tmp_path / "out", write_config(tmp_path))
    assert (
        str(src) in err
        and "in parameter bert.bert.bert_encoder.layers.1.output.dense.weight" in err
    )


@pytest.mark.parametrize("source", ["tf1", "mindspore"])
def test_a_shape_other_than_the_config_gives_names_file_and_tensor(tmp_path, model, capsys, source):
    src = (
        tf1_checkpoint(tmp_path, model)
        if source == "tf1"
        else mindspore_checkpoint(tmp_path, model)
    )
    err = cli_error(capsys, src, tmp_path / "out", write_config(tmp_path, intermediate_size=24))
    expected = {
        "tf1": "tensor bert/encoder/layer_0/intermediate/dense/kernel has shape [8, 12]; ",
        "mindspore": "tensor bert.bert.bert_encoder.layers.0.intermediate.weight has shape [12, 8]; ",
    }[source]
    assert expected in err
    assert re.search(r"bert_config\.json gives \[(8, 24|24, 8)\]", err)


def test_a_checkpoint_deeper_than_the_config_is_refused(tmp_path, model, capsys):
    src = tf1_checkpoint(tmp_path, model)
    err = cli_error(capsys, src, tmp_path / "out", write_config(tmp_path, num_hidden_layers=1))
    assert "tensor bert/encoder/layer_1/" in err and "num_hidden_layers 1" in err


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def test_a_users_folder_is_refused_and_left_byte_identical(tmp_path, model, capsys):
    src = tf1_checkpoint(tmp_path, model)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "config.json").write_text("{}")
    before = digest(out)
    rc = convert_checkpoint.main([str(src), str(out), "--config", str(write_config(tmp_path))])
    err = capsys.readouterr().err
    assert rc == 2 and "holds config.json, notes.txt that nbzoo did not write" in err
    assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failure_mid_way_leaves_nothing_at_out_dir(tmp_path, model, capsys):
    src = tf1_checkpoint(tmp_path, model)
    corrupt(src, model, "cls/seq_relationship/output_bias")  # the last weight converted
    err = cli_error(capsys, src, tmp_path / "out", write_config(tmp_path))
    assert "cls/seq_relationship/output_bias: checksum mismatch" in err
    assert not any(p.name.startswith((".out", "out")) for p in tmp_path.iterdir())


def test_an_empty_folder_and_an_earlier_conversion_are_written_over(tmp_path, model):
    src = tf1_checkpoint(tmp_path, model)
    out = tmp_path / "out"
    out.mkdir()
    config = write_config(tmp_path)
    convert_checkpoint.convert(src, out, config, log=lambda _: None)
    first = digest(out)
    convert_checkpoint.convert(src, out, config, log=lambda _: None)
    assert digest(out).keys() == first.keys() == {"model.safetensors", "config.json",
                                                   convert_checkpoint.RECORD, safe_write.MARKER}  # fmt: skip


def test_the_standin_writers_files_convert_back_to_the_model(tmp_path, model):
    from nbzoo.checkpoint_formats import standins

    config = standins.write_bert_config(model.config, tmp_path / "bert_config.json")
    prefix = standins.write_tf1_checkpoint(model, tmp_path / "tf" / "model.ckpt-28252")
    convert_checkpoint.convert(prefix, tmp_path / "from_tf", config, log=lambda _: None)
    ckpt = standins.write_mindspore_checkpoint(model, tmp_path / "ms" / "bert.ckpt")
    convert_checkpoint.convert(ckpt, tmp_path / "from_ms", config, log=lambda _: None)
    for out in ("from_tf", "from_ms"):
        assert_converted(tmp_path / out, model)
