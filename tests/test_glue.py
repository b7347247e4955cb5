import pytest

from nbzoo.data import glue

REAL_SST2 = (
    "sentence\tlabel\n"
    "hide new secretions from the parental units \t0\n"
    'the greatest musicians " cut \t1\n'
)
REAL_STSB = (
    "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane is taking off.\tAn air plane is taking off.\t5.000\n"
    "1\tmain-captions\tMSRvid\t2012test\t0004\tnone\tnone\tA man is playing a large flute.\tA man is playing a flute.\t3.800\n"
)


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_reads_real_glue_rows_byte_for_byte(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", REAL_SST2)
    write(tmp_path / "STS-B" / "dev.tsv", REAL_STSB)
    sst2 = glue.read_split(tmp_path, "sst2", "train")
    assert sst2.text_a == [
        "hide new secretions from the parental units ",
        'the greatest musicians " cut ',
    ]
    assert sst2.labels == [0, 1]
    stsb = glue.read_split(tmp_path, "stsb", "dev")
    assert stsb.text_b == ["An air plane is taking off.", "A man is playing a flute."]
    assert stsb.labels == [5.0, 3.8]


@pytest.mark.parametrize("task", ["sst2", "stsb"])
@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_write_then_read_round_trips(tmp_path, task, split):
    data = glue.generate_split(task, 50, seed=1, split=split)
    glue.write_split(tmp_path, data, split)
    back = glue.read_split(tmp_path, task, split)
    assert back.text_a == data.text_a and back.text_b == data.text_b
    if split == "test":
        assert back.labels is None
    elif task == "sst2":
        assert back.labels == data.labels
    else:
        assert back.labels == pytest.approx(data.labels, abs=5e-4)


def test_written_files_use_glues_headers(tmp_path):
    glue.write_sample_dataset(tmp_path, "stsb", {"train": 3, "test": 2})
    assert (tmp_path / "STS-B" / "train.tsv").read_text().splitlines()[0].split("\t")[-3:] == [
        "sentence1",
        "sentence2",
        "score",
    ]
    assert (tmp_path / "STS-B" / "test.tsv").read_text().splitlines()[0].endswith("sentence2")


def test_errors_name_the_file_and_line(tmp_path):
    write(tmp_path / "SST-2" / "dev.tsv", "sentence\tlabel\ngood film\t1\nbad film\t7\n")
    with pytest.raises(glue.GlueFormatError, match=r"dev.tsv, line 3: label must be 0 or 1"):
        glue.read_split(tmp_path, "sst2", "dev")
    write(tmp_path / "SST-2" / "train.tsv", "text\tlabel\n")
    with pytest.raises(glue.GlueFormatError, match=r"train.tsv, line 1: expected the header"):
        glue.read_split(tmp_path, "sst2", "train")
    write(tmp_path / "STS-B" / "train.tsv", REAL_STSB.replace("3.800", "9.1"))
    with pytest.raises(glue.GlueFormatError, match=r"line 3: score must be a number in \[0, 5\]"):
        glue.read_split(tmp_path, "stsb", "train")
    write(tmp_path / "STS-B" / "dev.tsv", REAL_STSB.replace("\t5.000", ""))
    with pytest.raises(
        glue.GlueFormatError, match=r"line 2: expected 10 tab-separated fields, got 9"
    ):
        glue.read_split(tmp_path, "stsb", "dev")
    with pytest.raises(FileNotFoundError, match="STS-B/test.tsv"):
        glue.read_split(tmp_path, "stsb", "test")


def test_a_tsv_with_bytes_that_are_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "SST-2" / "train.tsv"
    path.parent.mkdir()
    path.write_bytes(b"sentence\tlabel\ngood film\t1\nna\xefve \xff film\t0\n")
    with pytest.raises(glue.GlueFormatError, match=r"SST-2/train.tsv, line 3: not UTF-8 text"):
        glue.read_split(tmp_path, "sst2", "train")


def test_a_header_only_train_tsv_says_it_has_no_rows(tmp_path):
    write(tmp_path / "SST-2" / "train.tsv", "sentence\tlabel\n")
    with pytest.raises(glue.GlueFormatError, match=r"train.tsv: the header and no rows"):
        glue.read_split(tmp_path, "sst2", "train")


def test_a_missing_tsv_names_the_glue_archive_it_comes_from(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"https://dl.fbaipublicfiles.com/glue/data/SST-2.zip"
    ):
        glue.read_split(tmp_path, "sst2", "dev")


def test_generator_is_seeded_and_balanced():
    a = glue.generate_split("sst2", 2000, seed=0)
    assert a.text_a == glue.generate_split("sst2", 2000, seed=0).text_a
    assert a.text_a != glue.generate_split("sst2", 2000, seed=1).text_a
    assert 0.4 < sum(a.labels) / len(a.labels) < 0.6
    s = glue.generate_split("stsb", 500, seed=0)
    assert min(s.labels) >= 0 and max(s.labels) <= 5 and len(set(s.labels)) > 50


def test_stsb_scores_follow_word_overlap():
    """The generated similarity is learnable: plain word overlap already correlates with it."""
    from nbzoo import metrics

    s = glue.generate_split("stsb", 1000, seed=0)
    overlap = [
        len(set(a.split()) & set(b.split())) / len(set(a.split()) | set(b.split()))
        for a, b in zip(s.text_a, s.text_b, strict=False)
    ]
    assert metrics.pearson(overlap, s.labels) > 0.7


def test_encoded_dataset_pads_and_types_labels():
    from nbzoo.text import word_tokenizer

    data = glue.generate_split("stsb", 20, seed=0)
    tok = word_tokenizer(data.text_a + data.text_b)
    enc = glue.EncodedGlue(data, tok, max_length=40)
    item = enc[0]
    assert item["input_ids"].shape == (40,) and item["labels"].dtype.is_floating_point
    assert set(item["token_type_ids"].tolist()) == {0, 1}  # two segments
