"""Where the seeds' data and weights come from: every URL nbzoo downloads, with the checksum its
publisher gives (or a plain statement that none is published), and the instructions each
missing-data message quotes.

One record per remote file, so a downloader never runs without knowing what to expect.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Remote:
    """A file nbzoo knows how to fetch: its URL, its published sha256 and size (None where the
    publisher gives none), and where the checksum was published or why there is none."""

    url: str
    sha256: str | None
    size: int | None
    checksum_source: str

    def __post_init__(self) -> None:
        if self.sha256 is not None and (
            len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"{self.url}: sha256 must be 64 lowercase hex digits")
        if not self.checksum_source:
            raise ValueError(f"{self.url}: say where the checksum was published, or that none is")


_HF_GLUE = (
    "Hugging Face datasets, datasets/glue/dataset_infos.json (download_checksums), "
    "huggingface/datasets@040102f100964a33fd334e2695f1c493fa6b92db"
)

# GLUE's task archives, as GLUE's own download script and fairseq's preprocess_GLUE_tasks.sh
# expect them.
GLUE_SST2 = Remote(
    "https://dl.fbaipublicfiles.com/glue/data/SST-2.zip",
    sha256="d67e16fb55739c1b32cdce9877596db1c127dc322d93c082281f64057c16deaa",
    size=7_439_277,
    checksum_source=_HF_GLUE,
)
GLUE_STSB = Remote(
    "https://dl.fbaipublicfiles.com/glue/data/STS-B.zip",
    sha256="e60a6393de5a8b5b9bac5020a1554b54e3691f9d600b775bd131e613ac179c85",
    size=802_872,
    checksum_source=_HF_GLUE,
)

_FAIRSEQ_NONE = (
    "none published: fairseq's README and preprocess_GLUE_tasks.sh give the URL only; the file's "
    "length and format are checked instead"
)
# What fairseq's examples/roberta/preprocess_GLUE_tasks.sh fetches (wget -N, no checksum).
GPT2_ENCODER_JSON = Remote(
    "https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/encoder.json", None, None, _FAIRSEQ_NONE
)
GPT2_VOCAB_BPE = Remote(
    "https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/vocab.bpe", None, None, _FAIRSEQ_NONE
)
GPT2_DICT_TXT = Remote(
    "https://dl.fbaipublicfiles.com/fairseq/gpt2_bpe/dict.txt", None, None, _FAIRSEQ_NONE
)
# fairseq's examples/roberta/README.md links the archive without a checksum.
ROBERTA_BASE = Remote(
    "https://dl.fbaipublicfiles.com/fairseq/models/roberta.base.tar.gz", None, None, _FAIRSEQ_NONE
)

KNOWN: dict[str, Remote] = {
    r.url: r
    for r in (GLUE_SST2, GLUE_STSB, GPT2_ENCODER_JSON, GPT2_VOCAB_BPE, GPT2_DICT_TXT, ROBERTA_BASE)
}


def remote(url: str) -> Remote:
    """The record of ``url``; a URL nbzoo does not know (a user's mirror) has no checksum."""
    return KNOWN.get(url) or Remote(url, None, None, "a URL given by the user: no known checksum")


# --- where each seed's data comes from (quoted by the missing-data messages) ------------------

GLUE_HOWTO = (
    "the seed (seeds/002_albert.md) reads GLUE's own TSVs: download {url} and unpack it into "
    "the data folder (or run with data_source=download)"
)


def glue_howto(task_dir: str) -> str:
    url = {"SST-2": GLUE_SST2.url, "STS-B": GLUE_STSB.url}.get(task_dir, "GLUE's archive")
    return GLUE_HOWTO.format(url=url)


FAIRSEQ_SST2_HOWTO = (
    "the seed (seeds/004_roberta.md) trains on SST-2 as fairseq's "
    "examples/roberta/preprocess_GLUE_tasks.sh <glue_data> SST-2 writes it: GLUE's "
    f"{GLUE_SST2.url}, the GPT-2 BPE files (gpt2_bpe/encoder.json, vocab.bpe, dict.txt), then "
    "python -m examples.roberta.multiprocessing_bpe_encoder --encoder-json encoder.json "
    "--vocab-bpe vocab.bpe --inputs <split>.raw.input0 --outputs <split>.input0 --keep-empty; "
    "fairseq-preprocess --only-source --trainpref train.input0 --validpref dev.input0 "
    "--testpref test.input0 --destdir SST-2-bin/input0 --srcdict dict.txt; "
    "fairseq-preprocess --only-source --trainpref train.label --validpref dev.label "
    "--destdir SST-2-bin/label (the seed's tree spells it lable/; both are read). "
    "Or run with data_source=download, which does the same here"
)

CORPUS_HOWTO = (
    "the seeds (seeds/000_reformer.md, seeds/001_longformer.md) name no public source: the user "
    "puts the text in corpus/train_corpus.txt and corpus/test_corpus.txt (one document per line) "
    "and the byte-level BPE vocabulary in lf_token/ (vocab.json, merges.txt, config.json) under "
    "data_dir"
)

MLPERF_BERT_HOWTO = (
    "the seed (seeds/003_bert_thor.md) uses the MLPerf v0.7 BERT pretraining data, made with the "
    "scripts of https://github.com/mlperf/training/tree/master/language_model/tensorflow/bert "
    "(create_pretraining_data.py over the Wikipedia dump, 500 shards "
    "part-00000-of-00500.tfrecord ... part-00499-of-00500.tfrecord, max_seq_length 512, "
    "max_predictions_per_seq 76)"
)
