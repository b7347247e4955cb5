"""The rehearsal's stand-ins: real file formats, read back by the real readers (tiny sizes)."""

from __future__ import annotations

import json

import pytest
import torch

from nbzoo import standins
from nbzoo.data import corpus, glue

TINY_ALBERT = {
    **standins.ALBERT_BASE_V2,
    "embedding_size": 8,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "max_position_embeddings": 64,
    "vocab_size": 300,
}
TINY_REFORMER = {
    **standins.REFORMER_CRIME_AND_PUNISHMENT,
    "attention_head_size": 8,
    "axial_pos_embds_dim": [8, 8],
    "axial_pos_shape": [8, 8],
    "feed_forward_size": 32,
    "hidden_size": 16,
    "max_position_embeddings": 64,
    "num_buckets": [2, 4],
    "lsh_attn_chunk_length": 8,
    "local_attn_chunk_length": 8,
    "attn_layers": ["local", "lsh"],
    "num_hidden_layers": 2,
}
TINY_ROBERTA = {
    **standins.ROBERTA_BASE_ARGS,
    "encoder_layers": 2,
    "encoder_embed_dim": 16,
    "encoder_ffn_embed_dim": 32,
    "encoder_attention_heads": 2,
    "max_positions": 64,
}


@pytest.fixture(scope="module")
def sentences():
    split = glue.generate_split("sst2", 300, seed=1)
    return split.text_a


def test_the_real_configs_are_the_hubs_architectures():
    from transformers import AutoConfig

    albert = AutoConfig.for_model(**standins.ALBERT_BASE_V2)
    assert (albert.hidden_size, albert.num_hidden_layers, albert.embedding_size) == (768, 12, 128)
    reformer = AutoConfig.for_model(**standins.REFORMER_CRIME_AND_PUNISHMENT)
    assert list(reformer.attn_layers) == ["local", "lsh"] * 3
    assert list(reformer.axial_pos_shape) == [512, 1024]
    longformer = AutoConfig.for_model(**standins.LONGFORMER_BASE_4096)
    assert list(longformer.attention_window) == [512] * 12
    assert longformer.max_position_embeddings == 4098
    bert = AutoConfig.for_model(**standins.BERT_LARGE_UNCASED)
    assert (bert.hidden_size, bert.num_hidden_layers, bert.num_attention_heads) == (1024, 24, 16)


def test_an_albert_standin_loads_with_transformers_albert_tokenizer_and_model(tmp_path, sentences):
    from transformers import AlbertForSequenceClassification, AlbertTokenizer, AutoTokenizer

    folder = standins.albert_base_v2(tmp_path / "albert_base_v2", sentences, config=TINY_ALBERT)
    assert json.loads((folder / "config.json").read_text()) == TINY_ALBERT
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    slow = AlbertTokenizer.from_pretrained(folder, use_fast=False)
    auto = AutoTokenizer.from_pretrained(folder)
    text = "the acting is moving , but the pacing remains quite weak ."
    assert slow(text)["input_ids"] == auto(text)["input_ids"]
    ids = auto(text)["input_ids"]
    assert ids[0] == auto.cls_token_id == 2 and ids[-1] == auto.sep_token_id == 3
    assert auto.pad_token_id == 0 and auto.mask_token_id == 4 and auto.unk_token_id not in ids
    model = AlbertForSequenceClassification.from_pretrained(folder, num_labels=2)
    assert model.config.embedding_size == 8


def test_a_reformer_standin_has_its_spiece_model_and_loads(tmp_path, sentences):
    from transformers import ReformerModelWithLMHead, ReformerTokenizer

    folder = standins.reformer_crime_and_punishment(
        tmp_path / "reformer-crime-and-punishment", sentences, config=TINY_REFORMER
    )
    tok = ReformerTokenizer.from_pretrained(folder)
    assert 10 < len(tok) <= 320 and tok.eos_token_id == 2
    model = ReformerModelWithLMHead.from_pretrained(folder).eval()
    ids = torch.tensor([tok("the plot is not weak")["input_ids"][:8]])
    assert model(ids).logits.shape[-1] == TINY_REFORMER["vocab_size"]


def test_a_fairseq_roberta_standin_converts_and_matches_its_dictionary(tmp_path, sentences):
    from nbzoo import convert_fairseq
    from nbzoo.data.fairseq_glue import load_task_dictionary
    from nbzoo.data.gpt2_bpe import RobertaEncoder

    model_pt = standins.roberta_base_fairseq(
        tmp_path / "RoBERTa.base" / "model.pt", tmp_path / "bpe", sentences,
        args=TINY_ROBERTA, vocab_size=1024,
    )  # fmt: skip
    for name in ("encoder.json", "vocab.bpe", "dict.txt"):
        assert (tmp_path / "bpe" / name).exists()
    dictionary = load_task_dictionary(tmp_path / "bpe" / "dict.txt")
    assert len(dictionary) == 1024  # padded with madeupword symbols, + <mask>
    assert "madeupword0000" in (tmp_path / "bpe" / "dict.txt").read_text()
    converted = convert_fairseq.convert(model_pt, num_labels=2)
    assert converted.config.vocab_size == len(dictionary)
    assert converted.config.num_hidden_layers == 2 and converted.config.hidden_size == 16
    assert converted.config.max_position_embeddings == 66
    encoder = RobertaEncoder.from_dir(tmp_path / "bpe")
    ids = torch.from_numpy(encoder.encode(sentences[0], add_bos=True))[None]
    assert converted.model(input_ids=ids).logits.shape == (1, 2)


def test_the_binarized_sst2_uses_the_seeds_lable_folder(tmp_path, sentences):
    from nbzoo.data.fairseq import MMapIndexedDataset

    standins.glue_dataset(tmp_path / "dataset", {"train": 20, "dev": 10, "test": 4})
    standins.roberta_base_fairseq(
        tmp_path / "model.pt", tmp_path / "bpe", sentences, args=TINY_ROBERTA, vocab_size=1024
    )
    folder = standins.sst2_binarized(tmp_path / "dataset", tmp_path / "SST-2", tmp_path / "bpe")
    assert sorted(p.name for p in folder.iterdir() if p.name != ".nbzoo-owned") == [
        "input0",
        "lable",
    ]
    assert len(MMapIndexedDataset(folder / "input0" / "train")) == 20
    assert len(MMapIndexedDataset(folder / "lable" / "valid")) == 10
    assert (folder / "input0" / "dict.txt").read_bytes() == (
        tmp_path / "bpe" / "dict.txt"
    ).read_bytes()


def test_the_corpus_root_has_the_seeds_layout_and_a_byte_level_bpe(tmp_path):
    root = standins.corpus_root(tmp_path / "seed", {"train": 20, "test": 5}, vocab_size=400)
    assert (root / "corpus" / "train_corpus.txt").exists()
    assert (root / "corpus" / "test_corpus.txt").exists()
    tok = corpus.load_tokenizer(root / "lf_token")
    assert sorted(p.name for p in (root / "lf_token").iterdir() if p.name != ".nbzoo-owned") == [
        "config.json", "merges.txt", "vocab.json",
    ]  # fmt: skip
    assert tok.mask_token == "<mask>" and len(tok) <= 400


def test_mlperf_shards_have_mlperfs_shapes(tmp_path):
    from nbzoo.data import mlperf

    shards = standins.mlperf_shards(tmp_path, num_samples=6, samples_per_shard=4)
    assert [p.name for p in shards] == [
        "part-00000-of-00002.tfrecord",
        "part-00001-of-00002.tfrecord",
    ]
    sample = mlperf.read_shard(shards[0])[0]
    assert sample["input_ids"].shape == (512,) and sample["masked_lm_positions"].shape == (76,)


def tiny_longformer(window: int) -> dict:
    """longformer-base-4096's config.json, shrunk, with a vocabulary of 50."""
    return {
        **standins.LONGFORMER_BASE_4096,
        "attention_window": [window, window],
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "max_position_embeddings": 34,
        "vocab_size": 50,
    }


def test_a_hub_checkpoint_keeps_the_given_config_json(tmp_path):
    from transformers import LongformerForMaskedLM

    config = tiny_longformer(window=4)
    folder = standins.longformer_base_4096(tmp_path / "lf", config=config)
    assert json.loads((folder / "config.json").read_text()) == config
    model = LongformerForMaskedLM.from_pretrained(folder)
    assert list(model.config.attention_window) == [4, 4]
    assert not list(tmp_path.glob(".*tmp*"))


def test_a_checkpoint_of_another_vocabulary_loads_without_uninitialised_weights(tmp_path):
    """The full presets load the hub checkpoints with lf_token's vocabulary: the weights whose
    shape changes (embeddings, lm_head.bias) must start as a fresh model's, never uninitialised."""
    from nbzoo import longseq

    config = tiny_longformer(window=8)
    folder = standins.longformer_base_4096(tmp_path / "lf", config=config)
    root = standins.corpus_root(tmp_path / "seed", {"train": 20, "test": 5}, vocab_size=300)
    tok = corpus.load_tokenizer(root / "lf_token")
    model = longseq.build_mlm_model("longformer", str(folder), {}, tok, 32)
    assert model.config.vocab_size == len(tok) != 50
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all() and p.abs().max() < 10, name
    assert (model.lm_head.bias == 0).all()


@pytest.mark.parametrize(
    "model_class, config",
    [
        ("AlbertForMaskedLM", TINY_ALBERT),
        ("ReformerModelWithLMHead", TINY_REFORMER),
        ("LongformerForMaskedLM", {**standins.LONGFORMER_BASE_4096, "hidden_size": 16,
         "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
         "attention_window": [4, 4], "vocab_size": 100}),
        ("BertForPreTraining", {**standins.BERT_LARGE_UNCASED, "hidden_size": 16,
         "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
         "vocab_size": 100}),
    ],
)  # fmt: skip
def test_random_models_get_every_weight_from_transformers_own_initialisation(model_class, config):
    import transformers

    cfg = transformers.AutoConfig.for_model(**config)
    model = standins.random_model(getattr(transformers, model_class), cfg, seed=0)
    again = standins.random_model(getattr(transformers, model_class), cfg, seed=0)
    for (name, p), q in zip(model.named_parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q), f"{name} differs between two draws of one seed"
        if name.endswith("LayerNorm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
    weights = torch.cat([m.weight.flatten() for m in model.modules() if type(m) is torch.nn.Linear])
    assert weights.std().item() == pytest.approx(cfg.initializer_range, rel=0.1)
