"""fairseq's binarized format: dict.txt, the MMIDIDX .idx/.bin pair, GPT-2 BPE and the SST-2 binarizer."""

from __future__ import annotations

import json
import struct
from itertools import pairwise

import numpy as np
import pytest
import regex
import torch
from transformers import GPT2Tokenizer

from nbzoo.data import glue
from nbzoo.data.fairseq import (
    Dictionary,
    FairseqFormatError,
    MMapIndexedDataset,
    MMapIndexedDatasetBuilder,
    best_fitting_int_dtype,
    write_dataset,
)
from nbzoo.data.fairseq_glue import PadCollator, SentencePredictionDataset, binarize_sst2
from nbzoo.data.gpt2_bpe import GPT2BPE, RobertaEncoder, train_bpe

# --- the .idx/.bin pair, built byte by byte from the format description ----------------------


def spec_bytes(items: list[list[int]], code: int, fmt: str) -> tuple[bytes, bytes]:
    """(.idx, .bin) as the spec says: magic, u64 version 1, u8 dtype code, u64 count, int32 sizes,
    int64 byte pointers; the .bin holds the ids back to back (``fmt`` is the struct letter)."""
    width = struct.calcsize("<" + fmt)
    idx = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    idx += struct.pack("<Q", len(items))
    idx += b"".join(struct.pack("<i", len(x)) for x in items)
    offset, pointers = 0, []
    for x in items:
        pointers.append(struct.pack("<q", offset))
        offset += len(x) * width
    idx += b"".join(pointers)
    data = b"".join(struct.pack(f"<{len(x)}{fmt}", *x) for x in items)
    return idx, data


ITEMS = [[0, 31414, 232, 2], [2], [], [7, 65000, 5, 9, 11, 2]]


@pytest.mark.parametrize(
    "code,fmt,dtype",
    [(8, "H", np.uint16), (4, "i", np.int32), (5, "q", np.int64), (9, "I", np.uint32)],
)
def test_reader_reads_a_pair_built_from_the_spec(tmp_path, code, fmt, dtype):
    idx, data = spec_bytes(ITEMS, code, fmt)
    (tmp_path / "train.idx").write_bytes(idx)
    (tmp_path / "train.bin").write_bytes(data)
    ds = MMapIndexedDataset(tmp_path / "train")
    assert len(ds) == 4 and ds.dtype == np.dtype(dtype) and ds.num_tokens == 11
    assert ds.sizes.tolist() == [4, 1, 0, 6]
    assert [x.tolist() for x in ds] == ITEMS
    assert [ds[i].tolist() for i in range(4)] == ITEMS
    assert ds[-1].tolist() == ITEMS[-1]
    assert isinstance(ds.tokens, np.ndarray) and not ds.tokens.flags.writeable  # a view of the map
    with pytest.raises(IndexError, match="item 4 out of range"):
        ds[4]


@pytest.mark.parametrize("vocab,code,fmt", [(50264, 8, "H"), (65500, 9, "I"), (2**32, 5, "q")])
def test_writer_output_is_byte_identical_to_the_spec(tmp_path, vocab, code, fmt):
    """fairseq's make_builder(vocab_size=len(dict)) dtype choice, and its exact bytes."""
    write_dataset(tmp_path / "valid", ITEMS, vocab_size=vocab)
    idx, data = spec_bytes(ITEMS, code, fmt)
    assert (tmp_path / "valid.idx").read_bytes() == idx
    assert (tmp_path / "valid.bin").read_bytes() == data
    assert not list(tmp_path.glob("*.tmp-*"))


def test_best_fitting_int_dtype_follows_fairseq():
    assert best_fitting_int_dtype(65499) is np.uint16
    assert best_fitting_int_dtype(65500) is np.uint32
    assert best_fitting_int_dtype(4294967294) is np.uint32
    assert best_fitting_int_dtype(4294967295) is np.int64
    assert best_fitting_int_dtype(None) is np.uint32


def test_writer_refuses_ids_that_do_not_fit_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="token id 70000 does not fit the dataset dtype uint16"):
        with MMapIndexedDatasetBuilder(tmp_path / "x", dtype=np.uint16) as b:
            b.add_item([1, 70000])
    assert list(tmp_path.iterdir()) == []


def _write(tmp_path, idx: bytes, data: bytes):
    (tmp_path / "d.idx").write_bytes(idx)
    (tmp_path / "d.bin").write_bytes(data)
    return tmp_path / "d"


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda i, d: (b"TNTIDX\x00\x00" + i[8:], d), r"d\.idx: not a fairseq MMIDIDX index"),
        (lambda i, d: (i[:9] + struct.pack("<Q", 2) + i[17:], d), r"d\.idx: index version 2"),
        (lambda i, d: (i[:17] + b"\x0b" + i[18:], d), r"d\.idx: unknown dtype code 11"),
        (lambda i, d: (i[:20], d), r"d\.idx: truncated header"),
        (lambda i, d: (i[:-3], d), r"d\.idx: truncated: \d+ bytes, expected \d+ for 4 items"),
        (lambda i, d: (i + b"\x00", d), r"d\.idx: has trailing bytes"),
        (
            lambda i, d: (i, d[:-2]),
            r"d\.bin: 20 bytes, but the sizes in d\.idx add up to 11 tokens",
        ),
        (lambda i, d: (i, d + b"\x00\x00"), r"d\.bin: 24 bytes, but the sizes"),
        (
            lambda i, d: (i[: 26 + 16 + 8] + struct.pack("<q", 4) + i[26 + 16 + 16 :], d),
            r"d\.idx: pointer of item 1 is 4, expected 8",
        ),
        (
            lambda i, d: (i[:26] + struct.pack("<i", -1) + i[30:], d),
            r"d\.idx: size of item 0 is -1",
        ),
    ],
)
def test_damaged_files_give_one_clear_error_naming_the_file(tmp_path, mutate, message):
    idx, data = spec_bytes(ITEMS, 8, "H")
    prefix = _write(tmp_path, *mutate(idx, data))
    with pytest.raises(FairseqFormatError, match=message):
        MMapIndexedDataset(prefix)


def test_missing_half_of_the_pair(tmp_path):
    (tmp_path / "d.idx").write_bytes(spec_bytes(ITEMS, 8, "H")[0])
    with pytest.raises(FileNotFoundError, match=r"d\.bin: no such file"):
        MMapIndexedDataset(tmp_path / "d")


def test_empty_dataset(tmp_path):
    write_dataset(tmp_path / "e", [], vocab_size=100)
    ds = MMapIndexedDataset(tmp_path / "e")
    assert len(ds) == 0 and list(ds) == [] and ds.num_tokens == 0


# --- dict.txt ---------------------------------------------------------------------------------


def test_dictionary_specials_come_first_and_save_round_trips(tmp_path):
    text = "13 850314647\n262 800385005\n11 800251374\nmadeupword0000 0\n"
    (tmp_path / "dict.txt").write_text(text, encoding="utf-8")
    d = Dictionary.load(tmp_path / "dict.txt")
    assert d.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and d.nspecial == 4
    assert d.index("13") == 4 and d.index("11") == 6 and d.index("999") == d.unk() == 3
    assert len(d) == 8
    assert d.encode_line(" 262  13 999\n").tolist() == [5, 4, 3, 2]
    d.save(tmp_path / "again.txt")
    assert (tmp_path / "again.txt").read_text(encoding="utf-8") == text


def test_dictionary_overwrite_flag_and_errors(tmp_path):
    path = tmp_path / "dict.txt"
    path.write_text("a 5\nb 3\na 2 #fairseq:overwrite\n", encoding="utf-8")
    d = Dictionary.load(path)
    assert d.index("a") == 6 and len(d) == 7  # fairseq appends a new entry for the overwrite
    path.write_text("a 5\nb 3\na 2\n", encoding="utf-8")
    with pytest.raises(FairseqFormatError, match=r"dict\.txt, line 3: symbol 'a' appears twice"):
        Dictionary.load(path)
    path.write_text("a 5\nbroken\n", encoding="utf-8")
    with pytest.raises(FairseqFormatError, match=r"dict\.txt, line 2: expected '<symbol> <count>"):
        Dictionary.load(path)
    path.write_text("a 5\nb x\n", encoding="utf-8")
    with pytest.raises(FairseqFormatError, match=r"line 2: .*got 'b x"):
        Dictionary.load(path)


def test_dictionary_build_sorts_by_count_then_symbol_and_pads_to_eight():
    d = Dictionary.build(["1", "0", "1", "1", "0", "b a", "a"])
    # counts: 1→3, 0→2, a→2, b→1; ties keep symbol order; 4 specials + 4 symbols = 8: no padding
    assert d.symbols[4:] == ["1", "0", "a", "b"]
    d = Dictionary.build(["1", "0", "1"])
    assert d.symbols[4:] == ["1", "0", "madeupword0000", "madeupword0001"]
    assert d.counts[4:] == [2, 1, 0, 0]


# --- GPT-2 byte-level BPE ---------------------------------------------------------------------

# A reference of the published GPT-2 BPE (regex split, byte → unicode table, lowest-rank merge
# first), written here from the algorithm's description to check the tokenizers-based encoder.
GPT2_SPLIT = regex.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)


def byte_table() -> dict[int, str]:
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def reference_bpe(text: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> list[int]:
    ranks = {pair: i for i, pair in enumerate(merges)}
    table, ids = byte_table(), []
    for piece in GPT2_SPLIT.findall(text):
        word = [table[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(pairwise(word))]
            rank, _ = min(pairs)
            if rank == len(ranks):
                break
            first, second = merges[rank]
            merged, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids.extend(vocab[w] for w in word)
    return ids


def test_gpt2_bpe_on_hand_made_files(tmp_path):
    table = byte_table()
    vocab = {table[b]: b for b in range(256)}
    merges = [("l", "o"), ("lo", "w"), ("Ġ", "low"), ("e", "r")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    (tmp_path / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    bpe = GPT2BPE.from_dir(tmp_path)
    # "lower lower": low+e+r (e r merges), then " low" as one token, e r again
    assert bpe.encode("  lower lower\n") == [vocab["low"], vocab["er"], vocab["Ġlow"], vocab["er"]]
    assert bpe.encode("lower lower") == reference_bpe("lower lower", vocab, merges)
    assert bpe.decode(bpe.encode("naïve lower")) == "naïve lower"


def test_bad_bpe_files_are_named(tmp_path):
    (tmp_path / "encoder.json").write_text('["not", "a", "dict"]', encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\n", encoding="utf-8")
    with pytest.raises(FairseqFormatError, match=r"encoder\.json: expected a JSON object"):
        GPT2BPE.from_dir(tmp_path)
    (tmp_path / "encoder.json").write_text('{"a": 0, "b": 1}', encoding="utf-8")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b\nthree parts here\n", encoding="utf-8")
    with pytest.raises(FairseqFormatError, match=r"vocab\.bpe, line 3: expected a merge"):
        GPT2BPE.from_dir(tmp_path)
    (tmp_path / "vocab.bpe").write_bytes(b"#version: 0.2\na b\n\x80 b\n")
    with pytest.raises(FairseqFormatError, match=r"vocab\.bpe, line 3: not UTF-8 text"):
        GPT2BPE.from_dir(tmp_path)
    (tmp_path / "dict.txt").write_bytes(b"a 5\nb 3\n\xe4 2\n")
    with pytest.raises(FairseqFormatError, match=r"dict\.txt, line 3: not UTF-8 text"):
        Dictionary.load(tmp_path / "dict.txt")


@pytest.fixture(scope="module")
def sst2_bin(tmp_path_factory):
    """Generated SST-2 TSVs → a BPE learnt on them → the seed's binarized layout."""
    root = tmp_path_factory.mktemp("sst2")
    glue.write_sample_dataset(root / "glue", "sst2", {"train": 300, "dev": 80, "test": 20}, seed=3)
    train = glue.read_split(root / "glue", "sst2", "train")
    train_bpe(train.text_a, root / "bpe", vocab_size=300)
    binarize_sst2(root / "glue", root / "SST-2", RobertaEncoder.from_dir(root / "bpe"))
    return root


def test_binarized_layout_is_the_seeds(sst2_bin):
    names = sorted(
        p.relative_to(sst2_bin / "SST-2").as_posix()
        for p in (sst2_bin / "SST-2").rglob("*")
        if p.name != ".nbzoo-owned"  # nbzoo's marker (nbzoo.safe_write)
    )
    assert names == [
        "input0",
        *[
            f"input0/{n}"
            for n in [
                "dict.txt",
                "preprocess.log",
                "test.bin",
                "test.idx",
                "train.bin",
                "train.idx",
                "valid.bin",
                "valid.idx",
            ]
        ],
        "label",
        *[
            f"label/{n}"
            for n in [
                "dict.txt",
                "preprocess.log",
                "train.bin",
                "train.idx",
                "valid.bin",
                "valid.idx",
            ]
        ],
    ]
    assert (
        (sst2_bin / "bpe" / "vocab.bpe").read_text(encoding="utf-8").startswith("#version: 0.2\n")
    )


@pytest.mark.parametrize("split,fs_split", [("train", "train"), ("dev", "valid"), ("test", "test")])
def test_round_trip_gives_the_direct_tokenizer_encoding_for_every_sample(sst2_bin, split, fs_split):
    """TSV → binarize → read == transformers' GPT-2 tokenizer on the same files, then dict.txt
    (read here line by line: symbol on line k has id k + 3) and </s>."""
    bpe_dir = sst2_bin / "bpe"
    tokenizer = GPT2Tokenizer(
        vocab=str(bpe_dir / "encoder.json"), merges=str(bpe_dir / "vocab.bpe")
    )
    lines = (sst2_bin / "SST-2" / "input0" / "dict.txt").read_text(encoding="utf-8").splitlines()
    dict_id = {line.split(" ")[0]: k + 4 for k, line in enumerate(lines)}
    vocab = json.loads((bpe_dir / "encoder.json").read_text(encoding="utf-8"))
    merges = [
        tuple(m.split())
        for m in (bpe_dir / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]
    ]
    rows = glue.read_split(sst2_bin / "glue", "sst2", split)
    ds = MMapIndexedDataset(sst2_bin / "SST-2" / "input0" / fs_split)
    assert ds.dtype == np.uint16 and len(ds) == len(rows)
    for text, stored in zip(rows.text_a, ds, strict=True):
        bpe_ids = tokenizer(text.strip(), add_special_tokens=False)["input_ids"]
        assert bpe_ids == reference_bpe(text.strip(), vocab, merges)
        assert stored.tolist() == [dict_id.get(str(i), 3) for i in bpe_ids] + [2]
    if rows.labels is not None:
        label_lines = (
            (sst2_bin / "SST-2" / "label" / "dict.txt").read_text(encoding="utf-8").splitlines()
        )
        label_id = {line.split(" ")[0]: k + 4 for k, line in enumerate(label_lines)}
        labels = MMapIndexedDataset(sst2_bin / "SST-2" / "label" / fs_split)
        assert [x.tolist() for x in labels] == [[label_id[str(y)], 2] for y in rows.labels]
    else:
        assert not (sst2_bin / "SST-2" / "label" / f"{fs_split}.idx").exists()


def test_sentence_prediction_dataset_reads_like_fairseqs_task(sst2_bin):
    folder = sst2_bin / "SST-2"
    ds = SentencePredictionDataset(folder, "valid", max_positions=512)
    rows = glue.read_split(sst2_bin / "glue", "sst2", "dev")
    assert (
        ds.class_names
        == [s.split(" ")[0] for s in (folder / "label" / "dict.txt").read_text().splitlines()][:2]
    )
    assert len(ds.dictionary) == len(Dictionary.load(folder / "input0" / "dict.txt")) + 1  # <mask>
    raw = MMapIndexedDataset(folder / "input0" / "valid")
    item = ds[0]
    assert item["input_ids"].tolist() == [0, *raw[0].tolist()]
    assert [ds.class_names[int(ds[i]["labels"])] for i in range(len(ds))] == [
        str(y) for y in rows.labels
    ]
    short = SentencePredictionDataset(folder, "valid", max_positions=5)
    assert short[0]["input_ids"].tolist() == [0, *raw[0][:3].tolist(), 2]
    batch = PadCollator(1)([ds[0], short[0]])
    assert batch["input_ids"].shape == (2, len(item["input_ids"]))
    assert batch["attention_mask"][1].tolist() == [1] * 5 + [0] * (len(item["input_ids"]) - 5)
    assert batch["labels"].dtype == torch.long


def test_label_items_that_are_not_label_plus_eos_are_rejected(sst2_bin, tmp_path):
    import shutil

    folder = tmp_path / "SST-2"
    shutil.copytree(sst2_bin / "SST-2", folder)
    write_dataset(folder / "label" / "valid", [[4, 2]] * 79 + [[4, 4]], vocab_size=8)
    with pytest.raises(FairseqFormatError, match=r"valid\.bin: label item 79 is \[4, 4\]"):
        SentencePredictionDataset(folder, "valid")
    write_dataset(folder / "label" / "valid", [[4, 2]] * 3, vocab_size=8)
    with pytest.raises(FairseqFormatError, match=r"valid\.idx: 3 labels for 80 sentences"):
        SentencePredictionDataset(folder, "valid")
    write_dataset(folder / "input0" / "train", [[4, 999, 2]] * 300, vocab_size=1000)
    with pytest.raises(FairseqFormatError, match=r"train\.bin: item 0 holds token id 999"):
        SentencePredictionDataset(folder, "train")


def test_the_binarizer_can_write_the_seeds_lable_spelling_and_the_reader_reads_it(
    sst2_bin, tmp_path
):
    dest = binarize_sst2(
        sst2_bin / "glue",
        tmp_path / "SST-2",
        RobertaEncoder.from_dir(sst2_bin / "bpe"),
        label_name="lable",
    )
    assert sorted(p.name for p in dest.iterdir() if p.name != ".nbzoo-owned") == ["input0", "lable"]
    seed_layout = SentencePredictionDataset(dest, "valid")
    fairseq_layout = SentencePredictionDataset(sst2_bin / "SST-2", "valid")
    assert (seed_layout.targets == fairseq_layout.targets).all()
    assert (tmp_path / "SST-2" / "lable" / "train.idx").read_bytes() == (
        sst2_bin / "SST-2" / "label" / "train.idx"
    ).read_bytes()
    with pytest.raises(ValueError, match="label_name must be one of label, lable"):
        binarize_sst2(sst2_bin / "glue", tmp_path / "x", None, label_name="labels")
