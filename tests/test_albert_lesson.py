"""nbzoo.export.albert_lesson, notebook 02's lesson: the benchmark's table, figure and verdicts,
the int8 verdict's exact bounds and paired accuracy comparison, the fusion costs, the checks and
a summary that says what ran."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest
from scipy.stats import binom

from nbzoo import metrics
from nbzoo.export import albert, albert_lesson
from nbzoo.export.albert import TORCH, Benchmark
from tests.figure_check import problems
from tests.test_export_onnx import features, tiny_albert

matplotlib.use("Agg")


def bench_of(samples: dict[str, list[float]], load=(0.1, 0.1, 0.1)) -> Benchmark:
    return Benchmark(
        samples,
        seq_len=128,
        batch_size=32,
        batches_per_round=2,
        threads=1,
        spinning=False,
        load_before=load,
        load_after=load,
    )


SEPARATED = {
    TORCH: [100, 102, 98, 101, 99, 100, 103],
    "onnx": [200, 205, 195, 199, 201, 202, 198],
    "onnx_sim": [150, 152, 148, 151, 149, 150, 153],
    "onnx_opt": [101, 99, 102, 98, 100, 97, 104],
    "onnx_int8": [50, 52, 48, 51, 49, 50, 53],
}


def test_the_benchmark_table_words_each_model_against_pytorch_from_the_spread():
    table = albert_lesson.benchmark_table(bench_of(SEPARATED))
    verdict = table["against PyTorch"]
    assert verdict[albert_lesson.label("onnx")] == "faster"
    assert verdict[albert_lesson.label("onnx_int8")] == "slower"
    assert verdict[albert_lesson.label("onnx_opt")] == "no clear difference"
    assert table.loc[albert_lesson.label("onnx"), "samples/s (median)"] == 200
    assert table.loc[albert_lesson.label("onnx"), "× PyTorch (median of rounds)"] == 2.0


def test_the_verdicts_compare_each_stage_with_the_one_before_and_the_fastest_with_pytorch():
    found = albert_lesson.benchmark_verdicts(bench_of(SEPARATED))
    texts = [v.text for v in found]
    assert len(found) == 4  # plain vs PyTorch, sim vs plain, opt vs plain, int8 vs opt
    assert texts[0].startswith("plain ONNX ahead of PyTorch eager")
    assert texts[2].startswith("plain ONNX ahead of optimized ONNX (fused)")
    assert all("seq 128 × batch 32, 1 CPU thread" in t for t in texts)


def test_too_few_rounds_are_not_compared_at_all():
    few = bench_of({k: v[:2] for k, v in SEPARATED.items()})
    assert albert_lesson.benchmark_verdicts(few) == []
    table = albert_lesson.benchmark_table(few)
    assert set(table["against PyTorch"].iloc[1:]) == {"not compared (2 rounds)"}
    assert "not compared" in albert_lesson.load_sentence(few)
    one = bench_of({k: v[:1] for k, v in SEPARATED.items()})
    assert (
        albert_lesson.benchmark_table(one)["against PyTorch"].iloc[-1] == "not compared (1 round)"
    )


def test_the_benchmark_figure_is_readable_and_names_its_shape():
    fig = albert_lesson.benchmark_figure(bench_of(SEPARATED))
    assert problems(fig) == []
    ax = fig.axes[0]
    assert "seq 128 × batch 32, 1 CPU thread:" in ax.get_title()  # "thread", not "threads"
    assert [t.get_text() for t in ax.get_yticklabels()][-1] == "PyTorch eager"
    matplotlib.pyplot.close(fig)


def test_the_load_sentence_says_busy_or_idle():
    assert "busy" in albert_lesson.load_sentence(bench_of(SEPARATED, load=(40.0, 40.0, 40.0)))
    assert "idle" in albert_lesson.load_sentence(bench_of(SEPARATED, load=(0.0, 0.0, 0.0)))


def test_the_machine_table_names_the_cpu_the_int8_kernels_and_the_load():
    table = albert_lesson.machine(1, bench_of(SEPARATED, load=(1.5, 2.0, 2.0)))[""]
    assert table["threads (PyTorch and ONNX Runtime each)"] == 1
    assert table["ONNX Runtime's int8 matrix products use"]
    assert table["load average (1 min) before / after the benchmark"].startswith("1.50 / 1.50")


@pytest.mark.parametrize("n", [6, 64, 256, 872])
@pytest.mark.parametrize("share", [0.5, 0.97, 1.0])
def test_clopper_pearson_bounds_leave_exactly_the_asked_chance_outside(n, share):
    k = round(share * n)
    lower, upper = metrics.proportion_bounds(k, n, 0.999)
    assert 0.0 <= lower <= k / n <= upper <= 1.0
    if k > 0:  # seeing k or more when the truth is the lower bound: 0.1 % exactly
        assert binom.sf(k - 1, n, lower) == pytest.approx(0.001, rel=1e-6)
    if k < n:  # seeing k or fewer when the truth is the upper bound: 0.1 %
        assert binom.cdf(k, n, upper) == pytest.approx(0.001, rel=1e-6)


def test_showing_99_percent_agreement_takes_688_sentences_without_one_change():
    assert albert_lesson.sentences_needed(0.99, 0.999) == 688
    assert metrics.proportion_bounds(688, 688)[0] >= 0.99
    assert metrics.proportion_bounds(687, 687)[0] < 0.99
    with pytest.raises(ValueError, match="successes"):
        metrics.proportion_bounds(5, 4)


def sweep_table(labels, torch_pred, int8_pred) -> pd.DataFrame:
    rows = []
    for stage, pred in [(TORCH, torch_pred), ("onnx_int8", int8_pred)]:
        rows.append({"stage": stage, "seq": 32, "batch": 8, "predictions": np.asarray(pred)})
    return pd.DataFrame(rows)


def int8_of(labels, torch_pred, int8_pred, paths) -> albert_lesson.Int8Verdict:
    table = sweep_table(labels, torch_pred, int8_pred)
    return albert_lesson.int8_verdict(table, np.asarray(labels), 32, 8, paths)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return albert.build_stages(
        tiny_albert(), features(16, 12), tmp_path_factory.mktemp("onnx"), show_progress=False
    )


def test_one_changed_sentence_of_64_does_not_reject_the_int8_model(stages):
    """The browser test's 64 sentences: one changed prediction left 0.984 agreement, which a
    fixed 0.99 threshold rejected; 64 sentences cannot tell 98.4 % from 99 %."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 64)
    torch_pred = labels.copy()
    torch_pred[:4] ^= 1  # PyTorch gets 60 of 64 right
    int8_pred = torch_pred.copy()
    int8_pred[10] ^= 1  # int8 changes one answer, to a wrong one
    verdict = int8_of(labels, torch_pred, int8_pred, stages.paths)
    assert verdict.agree == 63 and not verdict.shown_below and not verdict.shown_above
    assert not verdict.accuracy.significant and verdict.accepted
    assert "too few sentences to tell" in verdict.lines()[0] and "688" in verdict.lines()[0]


def test_an_int8_model_that_changes_many_answers_is_rejected(stages):
    labels = np.tile([0, 1], 128)
    int8_pred = labels.copy()
    int8_pred[:12] ^= 1  # 12 of 256 answers changed, every one to a wrong one
    verdict = int8_of(labels, labels, int8_pred, stages.paths)
    assert verdict.shown_below and verdict.accuracy_lost and not verdict.accepted
    assert "fewer than 99%" in verdict.failures


def test_agreement_is_shown_once_the_sentences_are_enough(stages):
    labels = np.tile([0, 1], 400)
    verdict = int8_of(labels, labels, labels, stages.paths)
    assert verdict.shown_above and verdict.accepted
    assert "shown to agree on at least 99%" in verdict.lines()[0]


def test_the_int8_sizes_table_shows_the_int8_file_smaller(stages):
    labels = np.tile([0, 1], 8)
    sizes = int8_of(labels, labels, labels, stages.paths).sizes
    int8, opt = albert_lesson.label("onnx_int8"), albert_lesson.label("onnx_opt")
    assert sizes.loc[int8, "file (KiB)"] < sizes.loc[opt, "file (KiB)"]
    assert sizes.loc[int8, "weights (KiB)"] < 0.5 * sizes.loc[opt, "weights (KiB)"]


def test_fusion_costs_count_the_kernels_and_profile_the_large_batch(stages):
    small = albert.batches(features(4, 8), 1)[0]
    large = albert.batches(features(8, 12), 8)[0]
    costs = albert_lesson.fusion_costs(stages.paths, small, large, small_calls=5, large_calls=2)
    kernels = costs.table["kernels per batch"]
    assert kernels[albert_lesson.label("onnx_opt")] < kernels[albert_lesson.label("onnx")]
    assert list(costs.table.columns)[1:] == [
        "CPU ms per batch, seq 8 × batch 1",
        "CPU ms per batch, seq 12 × batch 8",
    ]
    assert "Attention" in costs.kernels.index
    assert costs.kernels.loc["Attention", albert_lesson.label("onnx")] == 0.0
    assert costs.sentences[0].startswith("On one sentence (seq 8 × batch 1)")


def test_a_profile_counts_each_kernel_at_its_fastest_run_and_leaves_the_warm_up_out():
    """A kernel the scheduler interrupted in one run (3 ms) counts with its clean run (1 ms)."""
    from nbzoo.export import profile

    def run(dur):
        return {"cat": "Session", "name": "model_run", "dur": dur}

    def kernel(op, dur):
        return {"cat": "Node", "name": f"n_{op}_kernel_time", "dur": dur, "args": {"op_name": op}}

    events = [kernel("MatMul", 500), kernel("MatMul", 500), kernel("Add", 50), run(2000)]
    for first, second in ((1000, 3000), (3000, 1000), (2000, 2000)):
        events += [kernel("MatMul", first), kernel("MatMul", second), kernel("Add", 100)]
        events += [run(first + second + 200)]
    found = profile.summarize(events, "m.onnx", skip=1)  # the 500 µs warm-up is left out
    assert found.runs == 3 and found.kernels_per_run == 3
    assert found.op_ms == {"MatMul": 2.0, "Add": 0.1} and found.op_calls == {"MatMul": 2, "Add": 1}
    assert found.run_ms == pytest.approx(4.2)


def test_the_correctness_checks_hold_to_float32_rounding_and_fail_beyond():
    good = {"max_abs_logit_diff": 3e-6, "accuracy_onnx": 0.9, "accuracy_torch": 0.9}
    assert albert_lesson.correctness(good)["holds"].all()
    bad = good | {"max_abs_logit_diff": 2e-3}
    assert not albert_lesson.correctness(bad)["holds"].all()
    with_om = good | {"om_max_abs_logit_diff": 1e-6}
    assert len(albert_lesson.correctness(with_om, "stand-ins")) == 3


def test_the_scores_hold_the_om_only_where_it_ran():
    rows = [
        {"stage": s, "seq": 32, "batch": 8, "accuracy": 0.9, "agreement with PyTorch": 1.0}
        | {"max |Δlogit| vs PyTorch": 1e-6}
        for s in (TORCH, "onnx", "onnx_sim", "onnx_opt", "onnx_int8")
    ]
    table = pd.DataFrame(rows)
    assert "accuracy_om" not in albert_lesson.scores(table, 32, 8)
    om = rows[0] | {"stage": "om", "seq": 128, "batch": 32, "accuracy": 0.8}
    found = albert_lesson.scores(pd.concat([table, pd.DataFrame([om])]), 32, 8)
    assert found["accuracy_om"] == 0.8


class _Atc:
    command, message = "atc ...", "done"


class _Om:
    def __init__(self, om):
        self.seq, self.batch, self.atc, self.om = 128, 32, _Atc(), om


@pytest.mark.parametrize(
    ("flow", "said", "unsaid"),
    [
        ("skipped", "was skipped", "ran them"),
        ("stand-ins", "stand-ins", "CANN's ATC converted"),
        ("cann", "CANN's ATC converted 1 of 1", "stand-ins"),
    ],
)
def test_the_summary_says_what_ran_of_the_om_step(stages, flow, said, unsaid):
    labels = np.tile([0, 1], 8)
    int8 = int8_of(labels, labels, labels, stages.paths)
    lines = albert_lesson.summary_lines(
        found={"max_abs_logit_diff": 2e-6},
        stages=stages,
        bench=bench_of(SEPARATED),
        int8=int8,
        om_flow=flow,
        om_models=[_Om(None if flow == "skipped" else "outputs/albert_seq128_bs32.om")],
        n_sentences=16,
        eval_seq=32,
    )
    om_line = lines[-1]
    assert said in om_line and unsaid not in om_line
    assert any(
        line.startswith("On this CPU at seq 128 × batch 32, 1 CPU thread, plain ONNX has")
        for line in lines
    )
