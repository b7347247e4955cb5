"""The corpus / lf_token layout of the Reformer and Longformer seeds, and the masking collators."""

from __future__ import annotations

import json

import pytest
import torch

from nbzoo.data import corpus


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    root = tmp_path_factory.mktemp("seed")
    corpus.write_sample_corpus(root, {"train": 300, "test": 30}, seed=0)
    tok = corpus.prepare_tokenizer(root, vocab_size=400)
    return root, tok


def test_layout_files_and_reader(sample):
    root, _ = sample
    assert sorted(p.name for p in (root / "corpus").iterdir() if p.name != ".nbzoo-owned") == [
        "test_corpus.txt",
        "train_corpus.txt",
    ]
    assert sorted(p.name for p in (root / "lf_token").iterdir() if p.name != ".nbzoo-owned") == [
        "config.json",
        "merges.txt",
        "vocab.json",
    ]
    train = corpus.read_corpus(root, "train")
    raw = (root / "corpus" / "train_corpus.txt").read_bytes().decode("utf-8")
    assert train == raw.splitlines() and len(train) == 300
    assert corpus.read_corpus(root, "test") != train[:30]  # its own seed


def test_generated_text_is_deterministic_and_structured():
    a, b = corpus.generate_documents(20, seed=3), corpus.generate_documents(20, seed=3)
    assert a == b and a != corpus.generate_documents(20, seed=4)
    for doc in a:
        name, _, rest = doc.partition(" was a ")
        # the hero is named first and comes home at the end, with the right pronoun
        pronoun = "she" if name in {"anna", "maria", "lena", "sofia", "clara", "ida"} else "he"
        assert doc.endswith(".") and rest.split(" ")[0] in corpus._TRADES
        assert f"in the evening {pronoun} went back to the " in doc


def test_reader_names_file_and_line_of_bad_bytes(tmp_path):
    path = tmp_path / "corpus" / "train_corpus.txt"
    path.parent.mkdir()
    path.write_bytes(b"fine line\n\xff\xfe broken\n")
    with pytest.raises(corpus.CorpusFormatError, match=r"train_corpus.txt, line 2: not UTF-8"):
        corpus.read_corpus(tmp_path, "train")
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(corpus.CorpusFormatError, match="no text"):
        corpus.read_corpus(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="test_corpus.txt"):
        corpus.read_corpus(tmp_path, "test")


def test_writer_refuses_line_breaks_inside_a_document(tmp_path):
    with pytest.raises(ValueError, match="document 1 contains a line break"):
        corpus.write_corpus(tmp_path, "train", ["ok", "two\nlines"])
    assert not (tmp_path / "corpus" / "train_corpus.txt").exists()


def test_tokenizer_files_are_gpt2_style_byte_level_bpe(sample):
    root, tok = sample
    folder = root / "lf_token"
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert merges[0].startswith("#version")
    assert [vocab[t] for t in corpus.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert config["model_type"] == "roberta" and config["vocab_size"] == len(vocab)
    assert "Ġthe" in vocab  # byte-level: a leading space is the byte 'Ġ'
    ids = tok("maria was a baker")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == "maria was a baker"
    assert tok.decode(tok("naïve ünïcode ✓")["input_ids"], skip_special_tokens=True) == (
        "naïve ünïcode ✓"
    )  # bytes never seen in training still round-trip
    # loading an existing folder gives the same tokenizer as training it did
    again = corpus.prepare_tokenizer(root)
    assert again("the dog followed tom")["input_ids"] == tok("the dog followed tom")["input_ids"]


def test_tokenizer_folder_errors_name_the_file(tmp_path, sample):
    root, _ = sample
    bad = tmp_path / "lf_token"
    bad.mkdir()
    for name in corpus.TOKENIZER_FILES:
        (bad / name).write_bytes((root / "lf_token" / name).read_bytes())
    (bad / "merges.txt").write_text("#version: 0.2\nĠ t\nthree parts here\n", encoding="utf-8")
    with pytest.raises(corpus.CorpusFormatError, match=r"merges.txt, line 3: expected two tokens"):
        corpus.load_tokenizer(bad)
    (bad / "merges.txt").write_text("#version: 0.2\nq z\n", encoding="utf-8")
    with pytest.raises(corpus.CorpusFormatError, match=r"line 2: the merge 'q z' makes 'qz'"):
        corpus.load_tokenizer(bad)
    (bad / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        corpus.load_tokenizer(bad)


@pytest.mark.parametrize(
    "name, content, line",
    [
        ("merges.txt", b"#version: 0.2\n\xc4\xa0 t\nna\xff ve\n", 3),
        ("config.json", b'{\n  "model_type": "roberta",\n  "name": "\xe9"\n}\n', 3),
        ("vocab.json", b'{"a": 0,\n "\xfe": 1}', 2),
    ],
)
def test_tokenizer_files_with_bytes_that_are_not_utf8_name_the_file_and_line(
    tmp_path, sample, name, content, line
):
    root, _ = sample
    bad = tmp_path / "lf_token"
    bad.mkdir()
    for each in corpus.TOKENIZER_FILES:
        (bad / each).write_bytes((root / "lf_token" / each).read_bytes())
    (bad / name).write_bytes(content)
    with pytest.raises(corpus.CorpusFormatError, match=rf"{name}, line {line}: not UTF-8 text"):
        corpus.load_tokenizer(bad)


def test_group_blocks_concatenates_documents(sample):
    root, tok = sample
    docs = corpus.read_corpus(root, "test")
    blocks = corpus.group_blocks(docs, tok, 64)
    stream = [t for d in docs for t in tok(d)["input_ids"]]
    assert blocks.shape == (len(stream) // 64, 64)
    assert blocks.flatten().tolist() == stream[: blocks.numel()]
    with pytest.raises(corpus.CorpusFormatError, match="no block of"):
        corpus.group_blocks(docs[:1], tok, 10_000)
    data = corpus.block_dataset(docs, tok, 64)
    item = data[0]
    assert item["special_tokens_mask"].tolist() == [
        int(t in tok.all_special_ids) for t in item["input_ids"].tolist()
    ]


def masked_stats(batch, original, tok):
    labels, inputs = batch["labels"], batch["input_ids"]
    masked = labels != -100
    assert torch.equal(labels[masked], original[masked])  # labels are the original tokens
    special = torch.isin(original, torch.tensor(tok.all_special_ids))
    assert not (masked & special).any()  # special tokens are never masked
    n = masked.sum().item()
    return {
        "rate": n / (~special).sum().item(),
        "mask": (inputs[masked] == tok.mask_token_id).sum().item() / n,
        "kept": (inputs[masked] == original[masked]).sum().item() / n,
    }


@pytest.mark.parametrize("make", [corpus.mlm_collator, corpus.ngram_collator])
def test_collators_mask_15_percent_80_10_10(sample, make):
    root, tok = sample
    data = corpus.block_dataset(corpus.read_corpus(root, "train"), tok, 128)
    examples = [data[i] for i in range(len(data))]
    original = torch.stack([e["input_ids"] for e in examples])
    batch = make(tok, seed=0)(examples)
    stats = masked_stats(batch, original, tok)
    assert 0.13 <= stats["rate"] <= 0.17
    assert 0.75 <= stats["mask"] <= 0.85
    # unchanged: the 10% kept plus random draws that hit the original token
    assert 0.06 <= stats["kept"] <= 0.15
    again = make(tok, seed=0)(examples)
    assert torch.equal(batch["input_ids"], again["input_ids"])  # seeded: reproducible
    assert torch.equal(examples[0]["input_ids"], original[0])  # examples are not modified


def test_ngram_masking_masks_whole_spans_of_one_to_three(sample):
    root, tok = sample
    data = corpus.block_dataset(corpus.read_corpus(root, "train"), tok, 128)
    examples = [data[i] for i in range(len(data))]
    original = torch.stack([e["input_ids"] for e in examples])
    collator = corpus.ngram_collator(tok, seed=1)
    collator.mask_replace_prob, collator.random_replace_prob = 1.0, 0.0  # see the spans
    batch = collator(examples)
    masked = batch["labels"] != -100
    runs = []
    for row in masked.tolist():
        run = 0
        for m in row + [False]:
            if m:
                run += 1
            elif run:
                runs.append(run)
                run = 0
    counts = torch.bincount(torch.tensor(runs))
    # spans of 2 and 3 occur (adjacent spans can merge into longer runs)
    assert counts[2] > 0 and counts[3] > 0 and counts[1] > counts[3]
    token_level = corpus.mlm_collator(tok, seed=1)(examples)["labels"] != -100
    assert _mean_run(masked) > _mean_run(token_level) + 0.3
    assert torch.equal(batch["input_ids"][masked], torch.full_like(original[masked], 4))


def _mean_run(masked):
    flat = torch.cat([masked, torch.zeros(masked.shape[0], 1, dtype=torch.bool)], 1).flatten()
    starts = (flat[1:] & ~flat[:-1]).sum() + flat[0]
    return flat.sum().item() / starts.item()


def test_masked_batches_are_fixed(sample):
    root, tok = sample
    data = corpus.block_dataset(corpus.read_corpus(root, "test"), tok, 64)
    a = corpus.masked_batches(data, corpus.ngram_collator(tok, seed=5), 4)
    b = corpus.masked_batches(data, corpus.ngram_collator(tok, seed=5), 4)
    assert len(a) == -(-len(data) // 4)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b, strict=True))


def test_local_data_without_lf_token_stops_and_names_the_seeds_layout(tmp_path):
    corpus.write_sample_corpus(tmp_path, {"train": 20, "test": 5}, seed=0)
    with pytest.raises(FileNotFoundError) as info:
        corpus.prepare_data(tmp_path, "local")
    message = str(info.value)
    assert "lf_token: vocab.json, merges.txt, config.json missing" in message
    assert "do not train one in its place" in message and "seeds/000_reformer.md" in message
    assert not (tmp_path / "lf_token").exists()


def test_local_data_reads_the_seeds_lf_token_as_it_is(tmp_path, sample):
    root, tok = sample
    loaded, docs = corpus.prepare_data(root, "local")
    assert loaded.get_vocab() == tok.get_vocab()
    assert docs["train"] == corpus.read_corpus(root, "train") and len(docs["test"]) == 30


def test_generated_data_trains_its_own_vocabulary(tmp_path):
    tok, docs = corpus.prepare_data(tmp_path, "generate", {"train": 40, "test": 5}, vocab_size=300)
    assert corpus.layout(tmp_path).has_tokenizer() and len(docs["train"]) == 40
    assert 260 < len(tok) <= 300
    with pytest.raises(ValueError, match="data_source must be one of generate, local"):
        corpus.prepare_data(tmp_path, "hub")


def test_a_missing_corpus_file_says_where_the_seeds_data_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train_corpus.txt.*name no public source"):
        corpus.read_corpus(tmp_path, "train")
