"""``nbzoo bench`` on real length distributions: the distributions, the three paths, the table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nbzoo import bench, bench_lengths, bench_lengths_table, bert_sample_lengths, packing
from nbzoo.device import cpu_description, setup

ROOT = Path(__file__).resolve().parents[1]
TINY_ALBERT = dict(
    embedding_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=64, vocab_size=200,
)  # fmt: skip


def test_the_modelled_wikipedia_lengths_pad_half_of_512_as_the_paper_states():
    spec = bench_lengths.histograms()["wikipedia_phase2_512"]
    assert "nbzoo's model" in spec["source"] and "Krell" in spec["source"]
    lengths = bert_sample_lengths.sample_lengths(
        spec["bert_create_pretraining_data"], 20000, np.random.default_rng(1)
    )
    share = packing.padding_fraction(lengths, 512)
    assert abs(share - spec["padding_share"]["value"]) < 0.01  # the share the JSON states
    assert 0.49 < share < 0.51  # about 50 % in Krell et al.'s abstract


def test_modelled_pretraining_samples_keep_bert_s_bounds_and_short_share():
    model = {**bench_lengths.histograms()["wikipedia_phase2_512"]["bert_create_pretraining_data"]}
    model["document_sentences"] = {"mean": 1000.0, "sigma": 0.01, "min": 1}  # no document ends
    lengths = bert_sample_lengths.sample_lengths(model, 4000, np.random.default_rng(0))
    assert min(lengths) >= 5 and max(lengths) == 512  # [CLS], two [SEP], one token each side
    short = sum(n < 490 for n in lengths) / len(lengths)  # short_seq_prob 0.1
    assert 0.07 < short < 0.2


def test_lengths_drawn_from_a_distribution_follow_it():
    lengths, max_length, source = bench_lengths.sample_lengths("wikipedia_phase2_512", 4000, 0)
    assert max_length == 512 and source
    assert 0.46 < packing.padding_fraction(lengths, 512) < 0.54
    sst2, _, _ = bench_lengths.sample_lengths("sst2_128", 4000, 0)
    assert min(sst2) >= 3 and max(sst2) <= 128
    assert 12 < sum(sst2) / len(sst2) < 14  # the documented mean, 13 tokens


@pytest.mark.parametrize("pct", bench_lengths.SWEEP)
def test_the_padding_sweep_pads_what_it_says(pct):
    lengths, _, _ = bench_lengths.sample_lengths(f"padding_{pct}", 2000, 0)
    assert abs(packing.padding_fraction(lengths, 128) - pct / 100) < 0.02


def tiny_record(name="albert_base_sst2", batch_size=8, run=None):
    case = bench_lengths.LengthCase(
        name, "tiny", "AlbertForSequenceClassification", bench_lengths._albert_base, "sst2_128",
        batch_size, 2, cpu={"config": TINY_ALBERT, "rounds": 2},
    )  # fmt: skip
    rt = setup("cpu", "fp32")
    record = bench_lengths.run_length_case(case, rt)
    return bench_lengths.finish(record, rt, run or bench_lengths.run_stamp("nbzoo bench test"))


def test_a_tiny_case_measures_four_paths_on_the_same_sentences(one_torch_thread):
    record = tiny_record()
    for path in bench_lengths.PATHS:
        assert record[path]["samples_per_second"] > 0 and len(record[path]["step_seconds"]) == 4
        assert record[path]["sequences_per_round"] == 16  # the same 16 sentences on every path
    tokens = record["tokens_computed"]
    assert tokens["nbzoo"] <= tokens["stock_best"] < tokens["stock_seed"]
    assert tokens["nbzoo_plain"] < tokens["stock_seed"]
    assert max(record["loss_rel_diff"].values()) < 1e-5  # the same sentences, packed or padded
    ratio = record["ratios"]["nbzoo_vs_stock_best"]
    assert ratio["median"] == pytest.approx(np.median(ratio["rounds"]))
    assert ratio["rounds"][0] == pytest.approx(
        record["nbzoo"]["round_samples_per_second"][0]
        / record["stock_best"]["round_samples_per_second"][0]
    )
    goal = record["goal"]  # the case's: nbzoo at least as fast as stock at its best
    assert goal["against"] == "stock_best" and goal["at_least"] == 1.0
    assert goal["met"] == (record["ratios"]["nbzoo_vs_stock_best"]["median"] >= 1.0)
    assert record["length_distribution"] == "sst2_128" and "GLUE" in record["source"]
    assert record["device_name"] == record["machine"]["cpu"]["model_name"]
    text = bench_lengths_table.table([record])
    assert "tiny" not in text and "albert_base_sst2" in text  # one row per record, by case name


def test_the_table_shows_one_run_and_names_its_missing_cases(tmp_path, one_torch_thread):
    old = bench_lengths.run_stamp("nbzoo bench real_lengths --device cpu")
    old["started"] = "2000-01-01T00:00:00+00:00"
    bench.write_record(tiny_record("bert_large_mlperf512", run=old), tmp_path)
    new = bench_lengths.run_stamp("nbzoo bench real_lengths --device cpu")
    bench.write_record(tiny_record("albert_base_sst2", run=new), tmp_path)
    text = bench_lengths_table.render_table(tmp_path, "cpu")
    assert "albert_base_sst2 |" in text and "bert_large_mlperf512 |" not in text
    assert "without a record (failed or not reached): bert_large_mlperf512" in text
    assert new["started"] in text and cpu_description()["model_name"] in text


def test_the_committed_readme_shows_the_committed_cpu_records():
    folder = ROOT / "results" / "bench" / "lengths" / "cpu"
    readme = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    assert bench_lengths_table.render_table(folder, "cpu") in readme


def test_real_length_groups_are_cases_of_nbzoo_bench():
    for names in bench_lengths.GROUPS.values():
        assert all(n in bench_lengths.CASES for n in names)
    parser = bench.build_parser()
    assert parser.parse_args(["real_lengths", "--device", "cpu"]).cases == ["real_lengths"]
