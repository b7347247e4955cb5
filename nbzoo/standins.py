"""Stand-ins for what the full presets download: the real architectures with random weights, in the
hub's (or fairseq's) on-disk layout, with tokenizer files in the real formats, and data in the
seeds' layouts. ``make rehearse`` (nbzoo.rehearse) runs every full preset on them.

Only the bytes of the weights and the data are made up; every file format is the real one, read by
the same code that reads the downloads:

* ``albert_base_v2``: ``config.json`` (albert-base-v2's) + ``model.safetensors`` +
  ``spiece.model`` (a SentencePiece unigram model trained with the ``sentencepiece`` package, with
  ALBERT's special pieces) + ``tokenizer.json``;
* ``roberta_base_fairseq``: fairseq's ``model.pt`` (roberta.base's arguments and state-dict names)
  beside GPT-2 BPE ``encoder.json`` / ``vocab.bpe`` and fairseq's ``dict.txt``, padded with
  fairseq's ``madeupword`` symbols to roberta.base's 50,265 embeddings;
* ``reformer_crime_and_punishment``: its ``config.json``, ``model.safetensors`` and a
  ``spiece.model`` of its 320 pieces;
* ``longformer_base_4096`` and ``bert_large``: ``config.json`` + ``model.safetensors``;
* data: GLUE TSVs, fairseq-binarized SST-2 (``input0/`` and the seed's ``lable/``), the
  ``corpus/`` + ``lf_token/`` layout, MLPerf BERT TFRecord shards -- written by nbzoo.data's own
  generators and writers.

The configurations are the hub's ``config.json`` files, copied as data (sources beside each).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from nbzoo import safe_write

# https://huggingface.co/albert-base-v2/resolve/main/config.json (the URL transformers' ALBERT
# configuration used to map albert-base-v2 to).
ALBERT_BASE_V2 = {
    "architectures": ["AlbertForMaskedLM"],
    "attention_probs_dropout_prob": 0,
    "bos_token_id": 2,
    "classifier_dropout_prob": 0.1,
    "down_scale_factor": 1,
    "embedding_size": 128,
    "eos_token_id": 3,
    "gap_size": 0,
    "hidden_act": "gelu_new",
    "hidden_dropout_prob": 0,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "inner_group_num": 1,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "albert",
    "net_structure_type": 0,
    "num_attention_heads": 12,
    "num_hidden_groups": 1,
    "num_hidden_layers": 12,
    "num_memory_blocks": 0,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 30000,
}

# fairseq's roberta.base (https://dl.fbaipublicfiles.com/fairseq/models/roberta.base.tar.gz): the
# roberta_base architecture of fairseq/models/roberta/model.py, as its checkpoint's args carry it;
# the same model as https://huggingface.co/roberta-base/resolve/main/config.json (vocab 50265,
# 514 positions = 512 + padding index + 1).
ROBERTA_BASE_ARGS = {
    "arch": "roberta_base",
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "pooler_activation_fn": "tanh",
    "dropout": 0.1,
    "attention_dropout": 0.1,
    "activation_dropout": 0.0,
    "pooler_dropout": 0.0,
    "max_positions": 512,
    "encoder_normalize_before": False,
    "untie_weights_roberta": False,
}
ROBERTA_BASE_VOCAB = 50265  # dict.txt's 50,260 symbols + <s> <pad> </s> <unk> + <mask>

# https://huggingface.co/google/reformer-crime-and-punishment/resolve/main/config.json (the values
# transformers' ReformerConfig documents for this checkpoint; PaddleNLP's mirror carries the same).
REFORMER_CRIME_AND_PUNISHMENT = {
    "architectures": ["ReformerModelWithLMHead"],
    "attention_head_size": 64,
    "attn_layers": ["local", "lsh", "local", "lsh", "local", "lsh"],
    "axial_norm_std": 1.0,
    "axial_pos_embds": True,
    "axial_pos_embds_dim": [64, 192],
    "axial_pos_shape": [512, 1024],
    "chunk_size_feed_forward": 0,
    "chunk_size_lm_head": 0,
    "eos_token_id": 2,
    "feed_forward_size": 512,
    "hash_seed": None,
    "hidden_act": "relu",
    "hidden_dropout_prob": 0.05,
    "hidden_size": 256,
    "initializer_range": 0.02,
    "is_decoder": True,
    "layer_norm_eps": 1e-12,
    "local_attention_probs_dropout_prob": 0.05,
    "local_attn_chunk_length": 64,
    "local_num_chunks_after": 0,
    "local_num_chunks_before": 1,
    "lsh_attention_probs_dropout_prob": 0.0,
    "lsh_attn_chunk_length": 64,
    "lsh_num_chunks_after": 0,
    "lsh_num_chunks_before": 1,
    "max_position_embeddings": 524288,
    "model_type": "reformer",
    "num_attention_heads": 2,
    "num_buckets": [64, 128],
    "num_hashes": 1,
    "num_hidden_layers": 6,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
    "vocab_size": 320,
}

# https://huggingface.co/allenai/longformer-base-4096/resolve/main/config.json
LONGFORMER_BASE_4096 = {
    "architectures": ["LongformerForMaskedLM"],
    "attention_mode": "longformer",
    "attention_probs_dropout_prob": 0.1,
    "attention_window": [512] * 12,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "gradient_checkpointing": False,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "ignore_attention_mask": False,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 4098,
    "model_type": "longformer",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "sep_token_id": 2,
    "type_vocab_size": 1,
    "vocab_size": 50265,
}

# https://huggingface.co/google-bert/bert-large-uncased/resolve/main/config.json (BERT-Large, the
# model of seeds/003_bert_thor.md; nbzoo.pretraining.BERT_LARGE holds the same sizes).
BERT_LARGE_UNCASED = {
    "architectures": ["BertForPreTraining"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 1024,
    "initializer_range": 0.02,
    "intermediate_size": 4096,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 16,
    "num_hidden_layers": 24,
    "pad_token_id": 0,
    "position_embedding_type": "absolute",
    "type_vocab_size": 2,
    "vocab_size": 30522,
}

# ALBERT's SentencePiece model: <pad>=0, <unk>=1, [CLS]=2, [SEP]=3, [MASK]=4 (albert-base-v2's ids).
ALBERT_PIECES = {"pad_id": 0, "unk_id": 1, "bos_id": -1, "eos_id": -1}
ALBERT_CONTROL = ["[CLS]", "[SEP]", "[MASK]"]


WRITER = "nbzoo.standins"


def _new_folder(dest: Path):
    """A stand-in folder made whole (nbzoo.safe_write): it replaces only an earlier stand-in."""
    return safe_write.new_folder(
        dest, WRITER, hint="stand-ins replace only their own folders: name another place"
    )


def sentencepiece_model(
    texts: Iterable[str],
    vocab_size: int,
    control_symbols: list[str] | None = None,
    **ids: int,
) -> bytes:
    """A SentencePiece unigram model trained on ``texts`` (the real ``spiece.model`` format).

    ``vocab_size`` is an upper bound (``hard_vocab_limit=False``): generated text may hold fewer
    pieces than a real vocabulary."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        hard_vocab_limit=False,
        control_symbols=control_symbols or [],
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **ids,
    )
    return model.getvalue()


def train_sentencepiece(
    texts: Iterable[str],
    path: str | os.PathLike,
    vocab_size: int,
    control_symbols: list[str] | None = None,
    **ids: int,
) -> Path:
    """:func:`sentencepiece_model` written to ``path`` (through a temporary name; it replaces only
    a file nbzoo wrote)."""
    data = sentencepiece_model(texts, vocab_size, control_symbols, **ids)
    return safe_write.write_output_file(Path(path), data, WRITER)


@contextlib.contextmanager
def _torch_initialisers_leave_nan():
    """transformers' ``no_init_weights`` (torch's initialisers and ``init_weights`` off during
    construction), with what torch's initialisers would have set filled with NaN instead of left
    as uninitialised memory: whatever ``init_weights`` does not set afterwards shows."""
    from transformers import initialization as hf_init

    def nan_(tensor, *args, **kwargs):
        with torch.no_grad():
            return tensor.fill_(float("nan"))

    with hf_init.no_init_weights():  # restores torch's functions on exit
        for module_name in hf_init.TORCH_MODULES_TO_PATCH:
            module = sys.modules.get(module_name)
            for name in hf_init.TORCH_INIT_FUNCTIONS if module is not None else ():
                if hasattr(module, name):
                    setattr(module, name, nan_)
        yield


def random_model(model_class, config, seed: int = 0):
    """``model_class(config)`` randomly initialised by transformers' own ``init_weights`` (normal
    with the configuration's ``initializer_range``, LayerNorms at one and zero, as a fresh
    pretraining starts), without torch's default initialisers, which the constructor runs first
    and ``init_weights`` then overwrites: a third of the time for longformer-base (148 M
    parameters), a tenth for albert-base."""
    torch.manual_seed(seed)
    with _torch_initialisers_leave_nan():
        model = model_class(config)
    model.init_weights()
    unset = [name for name, p in model.named_parameters() if p.isnan().any()]
    if unset:
        raise RuntimeError(f"{model_class.__name__}: init_weights leaves {unset[:3]} unset")
    return model


def write_hf_checkpoint(
    dest: str | os.PathLike, config: dict[str, Any], model_class: str, seed: int = 0
) -> Path:
    """``config.json`` exactly as given + ``model.safetensors`` of a randomly initialised
    ``model_class`` (a transformers class name) -- the hub's layout."""
    dest = Path(dest)
    with _new_folder(dest) as tmp:
        _hf_checkpoint_into(tmp, config, model_class, seed)
    return dest


def _hf_checkpoint_into(folder: Path, config: dict[str, Any], model_class: str, seed: int) -> None:
    import transformers

    config_obj = transformers.AutoConfig.for_model(**config)
    model = random_model(getattr(transformers, model_class), config_obj, seed)
    model.save_pretrained(folder, safe_serialization=True)
    # save_pretrained rewrites config.json with every default; the stand-in keeps the hub's file.
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def albert_base_v2(
    dest: str | os.PathLike, texts: Iterable[str], seed: int = 0, config=ALBERT_BASE_V2
) -> Path:
    """albert-base-v2's layout: config.json, model.safetensors, spiece.model, tokenizer.json."""
    from transformers import AutoTokenizer

    dest = Path(dest)
    with _new_folder(dest) as tmp:
        _hf_checkpoint_into(tmp, config, "AlbertForMaskedLM", seed)
        spiece = sentencepiece_model(
            texts, config["vocab_size"], control_symbols=ALBERT_CONTROL, **ALBERT_PIECES
        )
        (tmp / "spiece.model").write_bytes(spiece)
        # the hub's tokenizer.json: the tokenizers-library form transformers converts spiece to
        converted = AutoTokenizer.from_pretrained(str(tmp)).backend_tokenizer
        converted.save(str(tmp / "tokenizer.json"))
    return dest


def reformer_crime_and_punishment(
    dest: str | os.PathLike,
    texts: Iterable[str],
    seed: int = 0,
    config=REFORMER_CRIME_AND_PUNISHMENT,
) -> Path:
    """The seed's checkpoint/reformer-crime-and-punishment: config.json, model.safetensors and a
    spiece.model of at most 320 pieces (<unk> 0, <s> 1, </s> 2)."""
    dest = Path(dest)
    with _new_folder(dest) as tmp:
        _hf_checkpoint_into(tmp, config, "ReformerModelWithLMHead", seed)
        (tmp / "spiece.model").write_bytes(sentencepiece_model(texts, config["vocab_size"]))
    return dest


def longformer_base_4096(dest: str | os.PathLike, seed: int = 0, config=LONGFORMER_BASE_4096):
    return write_hf_checkpoint(dest, config, "LongformerForMaskedLM", seed)


def bert_large(dest: str | os.PathLike, seed: int = 0, config=BERT_LARGE_UNCASED) -> Path:
    return write_hf_checkpoint(dest, config, "BertForPreTraining", seed)


def fairseq_roberta_state_dict(model) -> dict[str, torch.Tensor]:
    """A transformers ``RobertaForMaskedLM``'s weights under fairseq's RoBERTa names (the names of
    fairseq/models/roberta/model.py, which nbzoo.convert_fairseq reads back)."""
    from nbzoo.convert_fairseq import ENC as enc
    from nbzoo.convert_fairseq import LAYER_NAMES

    hf = model.state_dict()
    sd = {
        enc + "embed_tokens.weight": hf["roberta.embeddings.word_embeddings.weight"],
        enc + "embed_positions.weight": hf["roberta.embeddings.position_embeddings.weight"],
        enc + "layernorm_embedding.weight": hf["roberta.embeddings.LayerNorm.weight"],
        enc + "layernorm_embedding.bias": hf["roberta.embeddings.LayerNorm.bias"],
        enc + "version": torch.tensor([2.0]),
        "encoder.lm_head.weight": hf["lm_head.decoder.weight"],
        "encoder.lm_head.bias": hf["lm_head.bias"],
    }
    for kind in ("weight", "bias"):
        sd[f"encoder.lm_head.dense.{kind}"] = hf[f"lm_head.dense.{kind}"]
        sd[f"encoder.lm_head.layer_norm.{kind}"] = hf[f"lm_head.layer_norm.{kind}"]
    for i in range(model.config.num_hidden_layers):
        for tf, fs in LAYER_NAMES.items():
            for kind in ("weight", "bias"):
                sd[f"{enc}layers.{i}.{fs}.{kind}"] = hf[f"roberta.encoder.layer.{i}.{tf}.{kind}"]
    return {k: v.detach().clone() for k, v in sd.items()}


def roberta_base_fairseq(
    model_pt: str | os.PathLike,
    bpe_dir: str | os.PathLike,
    texts: Iterable[str],
    seed: int = 0,
    args: dict[str, Any] = ROBERTA_BASE_ARGS,
    vocab_size: int = ROBERTA_BASE_VOCAB,
) -> Path:
    """fairseq's roberta.base files: ``bpe_dir/{encoder.json,vocab.bpe,dict.txt}`` (a byte-level
    BPE learnt on ``texts``; dict.txt padded with fairseq's madeupword symbols to roberta.base's
    size) and ``model_pt`` (fairseq's checkpoint layout: ``args``, ``model``, histories)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    from nbzoo.data.fairseq import Dictionary
    from nbzoo.data.gpt2_bpe import GPT2BPE, write_bpe_files

    texts = [t.strip() for t in texts]
    bpe_dir = Path(bpe_dir)
    with _new_folder(bpe_dir) as tmp:
        write_bpe_files(texts, tmp, vocab_size=vocab_size)
        bpe = GPT2BPE(tmp / "encoder.json", tmp / "vocab.bpe")
        lines = (" ".join(map(str, ids)) for ids in bpe.encode_batch(texts))
        # 4 specials + symbols, padded as fairseq-preprocess pads: to 50,264 (+ <mask> = 50,265)
        dictionary = Dictionary.build(lines, padding_factor=vocab_size - 1)
        if len(dictionary) != vocab_size - 1:
            raise ValueError(
                f"{len(dictionary)} BPE symbols do not fit a vocabulary of {vocab_size}"
            )
        dictionary.save(tmp / "dict.txt")
    config = RobertaConfig(
        vocab_size=vocab_size,
        hidden_size=args["encoder_embed_dim"],
        num_hidden_layers=args["encoder_layers"],
        num_attention_heads=args["encoder_attention_heads"],
        intermediate_size=args["encoder_ffn_embed_dim"],
        max_position_embeddings=args["max_positions"] + 2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=1,
    )
    state = {
        "args": argparse.Namespace(**args),
        "model": fairseq_roberta_state_dict(random_model(RobertaForMaskedLM, config, seed)),
        "optimizer_history": [{"criterion_name": "MaskedLmLoss", "num_updates": 0}],
        "extra_state": {},
    }
    model_pt = Path(model_pt)
    with safe_write.claim(model_pt.parent, WRITER).file(model_pt.name) as tmp:
        torch.save(state, tmp)
    return model_pt


# ----------------------------------------------------------------------------- data


def glue_dataset(data_dir: str | os.PathLike, sizes: dict[str, int], seed: int = 0) -> Path:
    """``data_dir/SST-2/*.tsv`` and ``data_dir/STS-B/*.tsv`` in GLUE's layout."""
    from nbzoo.data import glue

    for task in ("sst2", "stsb"):
        glue.write_sample_dataset(data_dir, task, sizes, seed=seed)
    return Path(data_dir)


def sst2_binarized(
    glue_dir: str | os.PathLike, dest: str | os.PathLike, bpe_dir: str | os.PathLike
) -> Path:
    """The seed's ``SST-2/`` folder: ``input0/`` and ``lable/`` (the seed's spelling of fairseq's
    ``label/``), binarized with the BPE files of ``bpe_dir``."""
    from nbzoo.data.fairseq_glue import binarize_sst2
    from nbzoo.data.gpt2_bpe import RobertaEncoder

    return binarize_sst2(glue_dir, Path(dest), RobertaEncoder.from_dir(bpe_dir), label_name="lable")


def corpus_root(root: str | os.PathLike, sizes: dict[str, int], vocab_size: int, seed: int = 0):
    """``root/corpus/{train,test}_corpus.txt`` and ``root/lf_token/`` (byte-level BPE:
    config.json, merges.txt, vocab.json) trained on the training text."""
    from nbzoo.data import corpus

    lay = corpus.write_sample_corpus(root, sizes, seed=seed)
    corpus.train_tokenizer(corpus.read_corpus(root, "train"), lay.tokenizer_dir, vocab_size)
    return Path(root)


def mlperf_shards(
    folder: str | os.PathLike, num_samples: int, samples_per_shard: int, seed: int = 0
) -> list[Path]:
    """MLPerf BERT TFRecord shards at MLPerf's shapes: sequences of 512, 76 predictions. The
    synthetic language uses the first 1,000 of BERT's 30,522 ids: its successor table costs
    vocabulary squared to draw (40 s for the whole vocabulary), and BERT-Large's embedding is sized
    by its configuration, not by the data."""
    from nbzoo.data import mlperf

    spec = mlperf.SampleSpec(vocab_size=1000, seq_length=512, max_predictions=76)
    return mlperf.generate_sample_shards(folder, num_samples, samples_per_shard, spec, seed=seed)


# ----------------------------------------------------------------------------- downloads


def glue_archive(tsv_dir: str | os.PathLike, task: str, dest: str | os.PathLike) -> Path:
    """GLUE's task archive (``SST-2.zip``: ``SST-2/train.tsv``, ``dev.tsv``, ``test.tsv``) of the
    TSVs in ``tsv_dir/<TASK>/``, the layout GLUE's download script and nbzoo's unpack."""
    import zipfile

    from nbzoo.data import glue

    folder = glue.TASK_DIRS[task]
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for split in glue.SPLITS:
            zf.write(Path(tsv_dir) / folder / f"{split}.tsv", f"{folder}/{split}.tsv")
    os.replace(tmp, dest)
    return dest


def roberta_base_archive(model_pt: str | os.PathLike, dict_txt: str | os.PathLike,
                         dest: str | os.PathLike) -> Path:  # fmt: skip
    """fairseq's ``roberta.base.tar.gz``: ``roberta.base/model.pt``, ``dict.txt`` and ``NOTE``.
    gzip level 0 (stored blocks, still the gzip format the reader unpacks): random weights do not
    compress, and deflate would spend half a minute of CPU trying."""
    import tarfile

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    note = (
        b"nbzoo stand-in of fairseq's roberta.base: roberta.base's architecture, random weights\n"
    )
    with tarfile.open(tmp, "w:gz", compresslevel=0) as tar:
        tar.add(model_pt, "roberta.base/model.pt")
        tar.add(dict_txt, "roberta.base/dict.txt")
        info = tarfile.TarInfo("roberta.base/NOTE")
        info.size = len(note)
        tar.addfile(info, io.BytesIO(note))
    os.replace(tmp, dest)
    return dest


def bert_large_foreign_checkpoints(
    folder: str | os.PathLike, seed: int = 0, config=BERT_LARGE_UNCASED
) -> tuple[dict[str, Path], Any]:
    """A random BERT-Large (``BertForPreTraining``) in the two formats the seed's starting
    checkpoint comes in: MLPerf's download (``bert_config.json`` and the TensorFlow 1 bundle
    ``tf1_ckpt/model.ckpt-28252``, with Adam slots and ``global_step``) and MindSpore's ``.ckpt``
    (the BERT model zoo's names, with THOR state), for the rehearsal to convert as a lab converts
    the real one. Returns the paths and the model (the weights both conversions must give back)."""
    from transformers import BertConfig, BertForPreTraining

    from nbzoo.checkpoint_formats import standins as foreign

    folder = Path(folder)
    model = random_model(BertForPreTraining, BertConfig(**config), seed)
    paths = {
        "config": foreign.write_bert_config(model.config, folder / "bert_config.json"),
        "tf1": foreign.write_tf1_checkpoint(model, folder / "tf1_ckpt" / "model.ckpt-28252"),
        "mindspore": foreign.write_mindspore_checkpoint(
            model, folder / "mindspore" / "bert_large_thor.ckpt"
        ),
    }
    return paths, model
