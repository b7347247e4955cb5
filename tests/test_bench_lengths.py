"""``nbzoo bench`` on real length distributions: the distributions, the three paths, the table."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from nbzoo import bench, bench_lengths, bert_sample_lengths, packing
from nbzoo.device import setup

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


def test_a_tiny_case_measures_three_paths_on_the_same_sentences(one_torch_thread):
    case = bench_lengths.LengthCase(
        "albert_base_sst2", "tiny", "AlbertForSequenceClassification",
        bench_lengths._albert_base, "sst2_128", 8, 2, cpu={"config": TINY_ALBERT},
    )  # fmt: skip
    record = bench_lengths.finish(
        bench_lengths.run_length_case(case, setup("cpu", "fp32")), setup("cpu", "fp32")
    )
    for path in bench_lengths.PATHS:
        assert record[path]["samples_per_second"] > 0 and len(record[path]["step_seconds"]) == 2
    assert record["stock_seed"]["sequences"] == record["nbzoo"]["sequences"] == 16
    assert record["rows_packed"] < record["rows_padded"]
    assert record["loss_rel_diff"] < 1e-5  # the same sentences, packed or padded
    assert record["ratio_vs_padded"] == pytest.approx(
        record["nbzoo"]["samples_per_second"] / record["stock_seed"]["samples_per_second"]
    )
    assert record["length_distribution"] == "sst2_128" and "GLUE" in record["source"]
    assert "tiny" not in bench_lengths.table([record])  # one row per record, by case name
    assert "albert_base_sst2" in bench_lengths.table([record])


def test_the_committed_readme_shows_the_committed_cpu_records():
    folder = ROOT / "results" / "bench" / "lengths" / "cpu"
    readme = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    assert bench_lengths.render_table(folder) in readme


def test_real_length_groups_are_cases_of_nbzoo_bench():
    for names in bench_lengths.GROUPS.values():
        assert all(n in bench_lengths.CASES for n in names)
    parser = bench.build_parser()
    assert parser.parse_args(["real_lengths", "--device", "cpu"]).cases == ["real_lengths"]
