"""Shared helpers of the Reformer / Longformer notebooks: metrics and baselines, model building,
the activation-memory measurement and the Longformer attention map."""

from __future__ import annotations

import math
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from nbzoo import device, longseq, patching
from tests import figure_check
from tests.test_patches_longseq import longformer, reformer


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits are given: evaluation must score exactly these."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.logits[: input_ids.shape[0]])


def test_evaluate_mlm_matches_a_hand_computation():
    rt = device.setup("cpu", "fp32", 0)
    labels = torch.tensor([[-100, 2, 3, -100], [3, -100, -100, 3]])
    logits = torch.log_softmax(torch.randn(2, 4, 5, generator=torch.Generator().manual_seed(0)), -1)
    logits[0, 1] = torch.log(torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1]))  # right
    logits[0, 2] = torch.log(torch.tensor([0.6, 0.1, 0.1, 0.1, 0.1]))  # wrong
    logits[1, 0] = torch.log(torch.tensor([0.1, 0.1, 0.1, 0.6, 0.1]))  # right
    logits[1, 3] = torch.log(torch.tensor([0.1, 0.6, 0.1, 0.1, 0.1]))  # wrong
    unigram = longseq.Unigram(np.array([0.0, 1.0, 2.0, 5.0, 0.0]))  # token 3 most frequent
    batches = [{"input_ids": torch.zeros(2, 4, dtype=torch.long), "labels": labels}]
    got = longseq.evaluate_mlm(FixedLogits(logits), batches, rt, unigram)
    nll = -(math.log(0.6) + math.log(0.1) + math.log(0.6) + math.log(0.1)) / 4
    assert got["masked_token_accuracy"] == pytest.approx(0.5)
    assert got["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert got["baseline_accuracy"] == pytest.approx(3 / 4)  # labels 2, 3, 3, 3
    smoothed = np.array([1.0, 2.0, 3.0, 6.0, 1.0]) / 13
    expected = math.exp(-(np.log(smoothed[2]) + 3 * np.log(smoothed[3])) / 4)
    assert got["unigram_perplexity"] == pytest.approx(expected)
    assert got["masked_tokens"] == 4
    per_token = -np.log([0.6, 0.1, 0.6, 0.1])  # the delta method: exp(mean) * sd / sqrt(n)
    se = math.exp(nll) * per_token.std(ddof=1) / math.sqrt(4)
    assert got["perplexity_standard_error"] == pytest.approx(se, rel=1e-5)


def test_unigram_ignores_special_tokens():
    blocks = torch.tensor([[0, 5, 5, 2], [0, 6, 5, 2]])
    uni = longseq.Unigram.fit(blocks, vocab_size=8, special_ids=[0, 1, 2])
    assert uni.most_frequent == 5 and uni.counts[0] == 0
    assert np.exp(uni.log_probs()).sum() == pytest.approx(1.0)


def test_reformer_config_requires_axial_shape_to_match_the_block():
    class Tok:  # what the config builder reads from a tokenizer
        pad_token_id, bos_token_id, eos_token_id = 1, 0, 2

        def __len__(self):
            return 10

    tok = Tok()
    with pytest.raises(ValueError, match=r"multiplies to 64.*block_size = 128"):
        longseq.reformer_config({"axial_pos_shape": [8, 8]}, tok, 128)
    config = longseq.reformer_config({"axial_pos_shape": [8, 16], "is_decoder": True}, tok, 128)
    assert config.is_decoder is False and config.vocab_size == 10  # masked LM is bidirectional


def test_axial_factors_are_as_close_to_the_square_root_as_possible():
    assert longseq.axial_factors(2048) == [32, 64] and longseq.axial_factors(128) == [8, 16]


def test_reformer_keeps_less_for_backward_than_full_attention():
    rt = device.setup("cpu", "fp32", 0)
    config = reformer().config
    ids = torch.randint(5, 60, (1, 256))
    small = longseq.measure_step(longseq.reformer_at_length(config, 256), ids, rt, repeats=1)
    twin = longseq.full_attention_twin(longseq.reformer_at_length(config, 256).config)
    full = longseq.measure_step(twin, ids, rt, repeats=1)
    assert 0 < small["activation_MiB"] < full["activation_MiB"] / 2
    assert small["seconds_per_step"] > 0


def test_step_time_is_the_median_of_its_repeats_with_their_quartiles(monkeypatch):
    """A busy machine slows some steps: the median and the interquartile range show it, one slow
    step does not move the figure (steps of 1, 9, 2, 2 and 3 s: median 2, IQR 2-3)."""
    rt = device.setup("cpu", "fp32", 0)
    ticks = iter([0.0, 1.0, 10.0, 19.0, 20.0, 22.0, 30.0, 32.0, 40.0, 43.0])
    monkeypatch.setattr(longseq.time, "perf_counter", lambda: next(ticks))
    ids = torch.randint(5, 60, (1, 256))
    row = longseq.measure_step(longseq.reformer_at_length(reformer().config, 256), ids, rt, 5)
    assert row["seconds"] == [1.0, 9.0, 2.0, 2.0, 3.0]
    assert (row["seconds_q1"], row["seconds_per_step"], row["seconds_q3"]) == (2.0, 2.0, 3.0)


def test_the_models_of_one_length_take_turns_step_by_step(monkeypatch):
    """A, B, A, B, ...: a neighbour that slows the machine for a while slows both alike."""
    rt = device.setup("cpu", "fp32", 0)
    order = []

    class Recorder(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.w = name, torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, labels):
            order.append(self.name)
            return SimpleNamespace(loss=(self.w * input_ids.float()).sum())

    longseq.measure_steps({"a": Recorder("a"), "b": Recorder("b")}, torch.ones(1, 4), rt, 3)
    assert order == ["a", "b"] + ["a", "b"] * 3  # the warm-ups, then alternating rounds


def _table(rows):
    import pandas as pd

    return pd.DataFrame(
        [{"model": m, "seq_len": n, "seconds": s, "activation_MiB": mib} for m, n, s, mib in rows]
    )


def test_the_crossover_is_worded_from_the_interquartile_ranges():
    table = _table(
        [
            ("Reformer", 256, [0.20, 0.21, 0.22, 0.23], 1.0),
            ("full", 256, [0.05, 0.06, 0.06, 0.07], 4.0),
            ("Reformer", 1024, [0.30, 0.35, 0.40, 0.45], 4.0),
            ("full", 1024, [0.33, 0.36, 0.38, 0.44], 26.0),
            ("Reformer", 2048, [0.50, 0.51, 0.52, 0.53], 8.0),
            ("full", 2048, [1.50, 1.60, 1.70, 1.80], 84.0),
        ]
    )
    found = longseq.crossover(table, "Reformer", "full")
    assert found.by_length[256].leader == "full" and found.by_length[2048].leader == "Reformer"
    assert not found.by_length[1024].significant  # overlapping IQRs: no verdict
    assert found.first_faster == 2048
    assert found.text().startswith(
        "Reformer is slower than full at 256 tokens; no clear difference at 1024 tokens; "
        "Reformer is faster from 2048 tokens on"
    )
    assert "84.0 MiB (10.5× as much)" in longseq.memory_text(table, "Reformer", "full")


def test_a_model_faster_only_at_a_middle_length_has_no_crossover():
    table = _table(
        [
            ("Reformer", 256, [0.1, 0.1, 0.1, 0.1], 1.0),
            ("full", 256, [0.3, 0.3, 0.3, 0.3], 4.0),
            ("Reformer", 512, [0.5, 0.5, 0.5, 0.5], 2.0),
            ("full", 512, [0.3, 0.3, 0.3, 0.3], 9.0),
        ]
    )
    assert longseq.crossover(table, "Reformer", "full").first_faster is None
    with pytest.raises(ValueError, match="no model 'other'"):
        longseq.step_timings(table, "other")


def test_the_scaling_figure_labels_its_log_axes_without_overlap():
    rt = device.setup("cpu", "fp32", 0)
    config = reformer().config
    builders = {
        "Reformer": lambda n: longseq.reformer_at_length(config, n),
        "full attention": lambda n: longseq.full_attention_twin(
            longseq.reformer_at_length(config, n).config
        ),
    }
    table = longseq.scaling_table(builders, [128, 256, 512, 1024], rt, vocab_size=60, repeats=2)
    fig = longseq.plot_scaling(table)
    assert figure_check.problems(fig) == []
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert labels == ["128", "256", "512", "1024"]
    plt.close(fig)


def test_decade_ticks_cover_the_range_in_one_two_five_steps():
    assert longseq.decade_ticks(0.006, 0.3) == [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5]
    assert longseq.decade_ticks(1.2, 84) == [1, 2, 5, 10, 20, 50, 100]


def test_saved_activation_bytes_counts_each_storage_once():
    x = torch.randn(256, 256, requires_grad=True)
    _, nbytes = longseq.saved_activation_bytes(lambda: (x * x).sum())
    assert nbytes == 256 * 256 * 4  # x saved twice for x * x, one storage


def test_attention_matrix_same_from_upstream_and_patched_outputs():
    model = longformer(windows=(8, 8), slots=4).eval()
    ids = torch.randint(3, 60, (1, 32), generator=torch.Generator().manual_seed(2))
    global_mask = torch.zeros_like(ids)
    global_mask[0, [0, 5]] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["global_attention_mask"] = global_mask
    maps = []
    for names in [(), ("longformer_sliding_window", "longformer_static_global")]:
        with patching.applied(*names), torch.no_grad():
            out = model(**batch, output_attentions=True)
        index = batch["global_attention_mask"][0].nonzero().flatten().tolist()
        maps.append(
            longseq.longformer_attention_matrix(
                out.attentions[0][0, 0], out.global_attentions[0][0, 0], index, 8
            )
        )
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-6)
    np.testing.assert_allclose(maps[0].sum(1), 1.0, atol=1e-5)
    assert maps[0][10, 30] == 0 and maps[0][10, 5] > 0  # outside the window / a global key


def test_global_on_tokens_marks_the_given_ids():
    def collate(examples):
        return {"input_ids": torch.stack([e["input_ids"] for e in examples])}

    wrapped = longseq.GlobalOnTokens(collate, (0,))
    batch = wrapped([{"input_ids": torch.tensor([0, 7, 8, 0, 9])}])
    assert batch["global_attention_mask"].tolist() == [[1, 0, 0, 1, 0]]


def test_set_hash_seed_fixes_every_lsh_layer():
    model = reformer(hash_seed=None)
    assert longseq.set_hash_seed(model, 5) == 2
    assert {m.hash_seed for m in model.modules() if type(m).__name__ == "LSHSelfAttention"} == {5}


def test_unigram_perplexity_carries_its_standard_error_by_the_delta_method():
    unigram = longseq.Unigram(np.array([0.0, 1.0, 2.0, 5.0, 0.0]))
    labels = torch.tensor([[-100, 2, 3, -100], [3, -100, 1, 3]])
    got = longseq.unigram_perplexity([{"labels": labels}], unigram)
    nll = -unigram.log_probs()[[2, 3, 3, 1, 3]]
    assert got.value == pytest.approx(math.exp(nll.mean()))
    assert got.standard_error == pytest.approx(
        math.exp(nll.mean()) * nll.std(ddof=1) / math.sqrt(5)
    )
    assert got.n == 5 and got.kind == "perplexity"


def test_bucket_and_window_knobs_are_checked_with_a_clear_message():
    class Tok:
        pad_token_id, bos_token_id, eos_token_id = 1, 0, 2

        def __len__(self):
            return 10

    shape = {"axial_pos_shape": [8, 16]}
    with pytest.raises(ValueError, match="num_buckets must be an even number >= 2"):
        longseq.reformer_config({**shape, "num_buckets": 5}, Tok(), 128)
    with pytest.raises(ValueError, match="num_buckets must be an even number"):
        longseq.reformer_config({**shape, "num_buckets": [4, 3]}, Tok(), 128)
    assert longseq.reformer_config({**shape, "num_buckets": [4, 8]}, Tok(), 128).num_buckets == [
        4,
        8,
    ]
    with pytest.raises(ValueError, match="attention_window must be an even number >= 2"):
        longseq.longformer_config({"attention_window": 33}, Tok(), 128)


def test_the_patched_longformer_is_captured_as_one_graph():
    model = longformer()
    batch = {"input_ids": torch.randint(3, 60, (2, 32)), "labels": torch.zeros(2, 32)}
    batch["global_attention_mask"] = torch.zeros(2, 32, dtype=torch.long)
    batch["global_attention_mask"][:, 0] = 1
    with patching.applied("longformer_sliding_window", "longformer_static_global"):
        got = longseq.compile_whole(model.train(), batch)
    assert got["max_abs_diff"] < 1e-5 and got["seconds"] > 0
    assert model.training  # left as it was
