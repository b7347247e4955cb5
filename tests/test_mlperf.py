"""MLPerf BERT TFRecords: byte-level framing, the Example schema, the eval split and sample shards."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from nbzoo.data import mlperf
from tests.conftest import TINY_BERT, bench_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SPEC = mlperf.SampleSpec(vocab_size=40, seq_length=24, max_predictions=4)
SPEC_DEMO_PREDICTIONS = 5  # the demo preset's sample_spec max_predictions


def _samples(n, seed=0):
    arrays = mlperf.generate_samples(SPEC, n, seed)
    return [{k: v[i] for k, v in arrays.items()} for i in range(n)]


def test_crc32c_is_castagnoli_and_masked_as_tfrecord_specifies():
    import crc32c

    assert crc32c.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    crc = crc32c.crc32c(b"abc")
    rotated = ((crc >> 15) | (crc << 17)) & 0xFFFFFFFF
    assert mlperf.masked_crc32c(b"abc") == (rotated + 0xA282EAD8) & 0xFFFFFFFF


def test_written_shards_read_back_identically(tmp_path):
    samples = _samples(30)
    path = mlperf.write_shard(tmp_path / mlperf.shard_name(0, 1), samples)
    back = mlperf.read_shard(path)
    assert len(back) == 30
    for a, b in zip(samples, back, strict=True):
        assert set(a) == set(b) == set(mlperf.FEATURES)
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), b[k])
            assert b[k].dtype == (np.float32 if k == "masked_lm_weights" else np.int64)
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left nothing behind


def _varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number, payload):  # length-delimited protobuf field
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def test_a_record_built_by_hand_from_the_spec_is_read(tmp_path):
    """tf.train.Example encoded byte by byte (protobuf wire format: Example.features = 1,
    Features.feature = 1 (map entries key = 1, value = 2), Feature.float_list = 2 / int64_list = 3,
    packed values = 1), then framed as TFRecord specifies."""
    values = {
        "input_ids": [2, 7, 4, 3, 0, 0],
        "input_mask": [1, 1, 1, 1, 0, 0],
        "segment_ids": [0, 0, 1, 1, 0, 0],
        "masked_lm_positions": [2, 0],
        "masked_lm_ids": [300, 0],  # 300 needs a two-byte varint
        "masked_lm_weights": [1.0, 0.0],
        "next_sentence_labels": [1],
    }
    entries = b""
    for name, vals in sorted(values.items()):  # deterministic serialization: keys in order
        if name == "masked_lm_weights":
            feature = _field(2, _field(1, struct.pack(f"<{len(vals)}f", *vals)))
        else:
            feature = _field(3, _field(1, b"".join(_varint(v) for v in vals)))
        entries += _field(1, _field(1, name.encode()) + _field(2, feature))
    example = _field(1, entries)
    length = struct.pack("<Q", len(example))

    def masked(data):
        import crc32c

        c = crc32c.crc32c(data)
        return struct.pack("<I", ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF)

    path = tmp_path / "part-00000-of-00001.tfrecord"
    path.write_bytes((length + masked(length) + example + masked(example)) * 2)
    records = mlperf.read_shard(path)
    assert len(records) == 2
    for name, vals in values.items():
        np.testing.assert_array_equal(records[1][name], np.asarray(vals))
    # and our writer produces exactly those bytes
    assert (
        mlperf.frame(mlperf.encode_example(records[0]))
        == path.read_bytes()[: len(path.read_bytes()) // 2]
    )


@pytest.mark.parametrize("where", ["data", "length", "data crc"])
def test_a_flipped_byte_is_rejected_with_file_and_offset(tmp_path, where):
    path = mlperf.write_shard(tmp_path / mlperf.shard_name(0, 1), _samples(5))
    offsets = mlperf.record_offsets(path)
    raw = bytearray(path.read_bytes())
    start = int(offsets[3])
    (length,) = struct.unpack("<Q", raw[start : start + 8])
    pos = {"data": start + 12 + length // 2, "length": start + 1, "data crc": start + 12 + length}[
        where
    ]
    raw[pos] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(mlperf.TFRecordError) as err:
        mlperf.read_shard(path)
    msg = str(err.value)
    assert str(path) in msg and f"byte offset {start}" in msg and "checksum" in msg
    if where != "length":  # the offset index reads headers only; the data check comes on access
        ds = mlperf.PretrainingShards([path])
        ds[2]
        with pytest.raises(mlperf.TFRecordError, match=f"byte offset {start}"):
            ds[3]


def test_truncated_file_and_wrong_lengths_name_the_problem(tmp_path):
    path = mlperf.write_shard(tmp_path / mlperf.shard_name(0, 1), _samples(3))
    raw = path.read_bytes()
    path.write_bytes(raw[:-7])
    with pytest.raises(mlperf.TFRecordError, match="runs past the end"):
        mlperf.read_shard(path)
    bad = _samples(2)
    bad[1]["masked_lm_ids"] = bad[1]["masked_lm_ids"][:-1]
    path2 = mlperf.write_shard(tmp_path / "x" / mlperf.shard_name(0, 1), bad)
    with pytest.raises(mlperf.TFRecordError, match="'masked_lm_ids' has 3 values, expected 4"):
        mlperf.read_shard(path2)


def test_eval_split_is_the_first_samples_in_shard_order_and_train_the_rest(tmp_path):
    paths = mlperf.generate_sample_shards(tmp_path, 50, 12, SPEC, seed=3)
    assert [p.name for p in paths][-1] == "part-00004-of-00005.tfrecord"
    assert (tmp_path / "vocab.txt").read_text().split("\n")[:5] == list(mlperf.SPECIAL_TOKENS)
    everything = [s for p in paths for s in mlperf.read_shard(p)]
    ev = mlperf.eval_split(tmp_path, samples=20)
    tr = mlperf.train_split(tmp_path, skip=20, limit=25, in_memory=True)
    assert len(ev) == 20 and len(tr) == 25
    np.testing.assert_array_equal(ev[13]["input_ids"], everything[13]["input_ids"])  # 2nd shard
    np.testing.assert_array_equal(tr[0]["input_ids"], everything[20]["input_ids"])
    np.testing.assert_array_equal(tr[24]["masked_lm_ids"], everything[44]["masked_lm_ids"])
    batch = mlperf.collate([tr[0], tr[1]])
    assert batch["input_ids"].shape == (2, 24) and batch["masked_lm_weights"].dtype == torch.float32
    with pytest.raises(ValueError, match="outside the 50 samples"):
        mlperf.PretrainingShards(tmp_path, 40, 60)
    (tmp_path / "part-00000-of-00007.tfrecord").write_bytes(b"")
    with pytest.raises(mlperf.TFRecordError, match="disagree on the shard count"):
        mlperf.list_shards(tmp_path)


def test_the_seeds_evaluation_samples_are_trained_on_too_and_held_out_is_an_option(tmp_path):
    """The seed trains on all 9,600,000 samples and evaluates on the first 10,000 of them
    (eval_split = in_training); held_out leaves those out of training."""
    from nbzoo import presets, pretraining

    mlperf.generate_sample_shards(tmp_path, 50, 12, SPEC, seed=3)
    cfg = presets.Config(
        preset="full", data_dir=str(tmp_path), eval_samples=20, train_samples=0, model_config={}
    )
    seed_train, seed_eval = pretraining.load_data(
        presets.Config({**cfg, "eval_split": "in_training"})
    )
    assert len(seed_train) == 50 and len(seed_eval) == 20
    np.testing.assert_array_equal(seed_train[0]["input_ids"], seed_eval[0]["input_ids"])
    held = presets.Config({**cfg, "eval_split": "held_out"})
    held_train, held_eval = pretraining.load_data(held)
    assert len(held_train) == 30 and len(held_eval) == 20
    np.testing.assert_array_equal(held_train[0]["input_ids"], seed_train[20]["input_ids"])
    with pytest.raises(ValueError, match="eval_split must be one of in_training, held_out"):
        pretraining.load_data(presets.Config({**cfg, "eval_split": "test"}))


def test_a_gap_in_a_shard_set_is_refused_naming_the_missing_shard(tmp_path):
    for index in (0, 2):
        mlperf.write_shard(tmp_path / mlperf.shard_name(index, 4), _samples(2, seed=index))
    with pytest.raises(
        mlperf.TFRecordError, match=r"shard part-00001-of-00004\.tfrecord is missing"
    ):
        mlperf.list_shards(tmp_path)
    with pytest.raises(mlperf.TFRecordError, match="part-00001-of-00004"):
        mlperf.eval_split(tmp_path, samples=2)
    mlperf.write_shard(tmp_path / mlperf.shard_name(1, 4), _samples(2, seed=1))
    assert [p.name[5:10] for p in mlperf.list_shards(tmp_path)] == ["00000", "00001", "00002"]
    (tmp_path / mlperf.shard_name(0, 4)).unlink()
    with pytest.raises(mlperf.TFRecordError, match="part-00000-of-00004.tfrecord is missing"):
        mlperf.list_shards(tmp_path)


def test_a_missing_shard_folder_says_where_the_seeds_data_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="mlperf/training/tree/master/language_model"):
        mlperf.list_shards(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="create_pretraining_data.py"):
        mlperf.list_shards(tmp_path)


def test_sample_language_follows_the_reference_cuts_and_masks():
    a = mlperf.generate_samples(SPEC, 400, seed=1)
    b = mlperf.generate_samples(SPEC, 400, seed=1)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])  # deterministic
    ids, mask, seg = a["input_ids"], a["input_mask"], a["segment_ids"]
    assert (ids[:, 0] == mlperf.CLS).all() and ((ids == mlperf.SEP).sum(1) >= 1).all()
    assert ((ids == mlperf.PAD) == (mask == 0)).all() and (seg <= mask).all()
    w = a["masked_lm_weights"] > 0
    pos, lab = a["masked_lm_positions"], a["masked_lm_ids"]
    assert (w.sum(1) >= 1).all() and (lab[w] >= len(mlperf.SPECIAL_TOKENS)).all()
    rows = np.repeat(np.arange(400)[:, None], SPEC.max_predictions, 1)
    shown = ids[rows[w], pos[w]]
    frac_mask = (shown == mlperf.MASK).mean()
    frac_same = (shown == lab[w]).mean()
    assert 0.7 < frac_mask < 0.9 and 0.05 < frac_same < 0.2  # 80 / 10 / 10
    assert 0.4 < a["next_sentence_labels"].mean() < 0.6


# --- the pretraining loss, evaluation and comparison metrics (nbzoo.pretraining) ----------------


def test_gathered_mlperf_loss_and_accuracy_match_transformers_on_full_sequences():
    from nbzoo import device, metrics, pretraining

    model = pretraining.build_model(TINY_BERT, seed=0).eval()
    rows = _samples(6)
    batch = mlperf.collate(rows)
    labels = torch.full_like(batch["input_ids"], -100)
    for i in range(len(rows)):
        w = batch["masked_lm_weights"][i] > 0
        labels[i, batch["masked_lm_positions"][i][w]] = batch["masked_lm_ids"][i][w]
    with torch.no_grad():
        ours = pretraining.pretraining_loss(model, batch)
        hf = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["input_mask"],
            token_type_ids=batch["segment_ids"],
            labels=labels,
            next_sentence_label=batch["next_sentence_labels"].flatten(),
        )
    torch.testing.assert_close(ours, hf.loss, rtol=1e-4, atol=1e-5)
    rt = device.setup("cpu", "fp32", seed=0)
    ev = pretraining.evaluate(model, rows, rt, batch_size=4)
    expected = metrics.masked_token_accuracy(hf.prediction_logits.numpy(), labels.numpy())
    assert ev["mlm_accuracy"] == pytest.approx(expected)


def test_baseline_steps_to_target_and_the_comparison_metrics():
    from nbzoo import optimizer_comparison, pretraining

    arrays = {
        "masked_lm_ids": np.array([[7, 7, 9], [7, 3, 0]]),
        "masked_lm_weights": np.array([[1, 1, 1], [1, 1, 0]], np.float32),
    }
    assert pretraining.baseline_accuracy(arrays) == (0.6, 7)
    evals = [{"step": s, "mlm_accuracy": a} for s, a in [(0, 0.1), (10, 0.3), (20, 0.5)]]
    assert optimizer_comparison.steps_to_target(evals, 0.3) == 10
    assert optimizer_comparison.steps_to_target(evals, 0.6) is None

    def run(kind, accs, ms):
        return pretraining.Run(
            kind,
            0.1,
            None,
            [{"step": i + 1, "loss": 1.0, "seconds": ms} for i in range(20)],
            [{"step": s, "mlm_accuracy": a} for s, a in zip((0, 10, 20), accs, strict=True)],
            20,
            20 * ms,
        )

    best = {
        "thor": run("thor", (0.1, 0.5, 0.6), 1.2),
        "sgd": run("sgd", (0.1, 0.2, 0.4), 1.0),
        "adamw": run("adamw", (0.1, 0.3, 0.7), 1.0),
    }
    m = optimizer_comparison.comparison_metrics(best, baseline=0.25)
    assert (
        m["target_accuracy"] == 0.4
        and m["steps_to_target_thor"] == 10
        and m["steps_to_target_sgd"] == 20
    )
    assert m["thor_step_time_ratio"] == pytest.approx(1.2)
    assert optimizer_comparison.best_runs(list(best.values()))["adamw"].final_accuracy == 0.7


def test_paired_step_times_alternate_thor_and_adamw_and_feed_the_ratio():
    from nbzoo import device, optimizer_comparison, presets, pretraining

    cfg = presets.Config(presets.load("06_bert_thor")["demo"])
    cfg.update(model_config=TINY_BERT, batch_size=4, frequency=2, stats_every=1, seed=0)
    rt = device.setup("cpu", "fp32", seed=0)

    def run(kind, damping=None):
        return pretraining.Run(kind, 0.01, damping, [], [], 0, 0.0)

    best = {"thor": run("thor", 0.01), "adamw": run("adamw")}
    paired = optimizer_comparison.paired_step_times(cfg, rt, _samples(10), best, steps=6)
    assert paired["steps"] == 6 and paired["thor_ms"] > 0 and paired["adamw_ms"] > 0
    assert paired["ratio"] == pytest.approx(paired["thor_ms"] / paired["adamw_ms"])
    assert paired["thor_ms_iqr"] >= 0 and paired["adamw_ms_iqr"] >= 0  # the medians' spread
    for kind in ("thor", "adamw"):  # every timed step, from which the medians come
        steps = paired[f"{kind}_step_ms"]
        assert len(steps) == 6 and paired[f"{kind}_ms"] == pytest.approx(
            float(np.median(steps[paired["skipped"] :]))
        )

    def timed(kind, ms):
        r = run(kind)
        r.history = [{"step": 1, "loss": 1.0, "seconds": ms}] * 3
        r.evals = [{"step": 0, "mlm_accuracy": 0.1}]
        return r

    grid = {"thor": timed("thor", 2.0), "sgd": timed("sgd", 1.0), "adamw": timed("adamw", 1.0)}
    m = optimizer_comparison.comparison_metrics(grid, 0.1, {"ratio": 1.1})
    assert m["thor_step_time_ratio"] == 1.1 and m["thor_step_time_ratio_sequential"] == 2.0
    # over whole refresh periods (every 3rd THOR step also inverts) where the timing spans two
    thor_ms, adamw_ms = [1.0, 1.0, 4.0] * 4, [1.0] * 12
    paired = {"ratio": 1.0, "thor_step_ms": thor_ms, "adamw_step_ms": adamw_ms, "skipped": 0}
    m = optimizer_comparison.comparison_metrics(grid, 0.1, paired, frequency=3)
    assert m["thor_step_time_ratio"] == pytest.approx(2.0)
    assert m["thor_step_time_ratio_each_step"] == 1.0


def test_a_grid_trained_in_parallel_processes_equals_the_sequential_grid(tmp_path, capsys):
    from nbzoo import device, optimizer_comparison, presets, pretraining

    variants = _thor_variants_bench()
    cfg = variants.variant_config(
        variants.demo_config("demo"),
        {
            "data_dir": str(tmp_path / "shards"),
            "num_samples": 240,
            "samples_per_shard": 120,
            "eval_samples": 40,
            "max_steps": 6,
            "eval_every": 3,
            "eval_batch_size": 40,
            "grid": {
                "thor": [{"lr": 0.02, "damping": 0.007035}],
                "sgd": [{"lr": 0.1}],
                "adamw": [{"lr": 0.003}],
            },
        },
    )
    rt = device.setup("cpu", "fp32", seed=0)
    pretraining.prepare_data(cfg)
    train_data, eval_data = pretraining.load_data(cfg)

    def workers(n):
        return presets.Config({**cfg, "grid_workers": n})

    assert optimizer_comparison.grid_workers(workers(0), rt) >= 1
    assert optimizer_comparison.grid_workers(workers(3), rt) == 3
    gpu = device.Runtime(kind="cuda", precision="bf16")
    assert optimizer_comparison.grid_workers(workers(3), gpu) == 1
    one = optimizer_comparison.run_grid(workers(1), rt, train_data, eval_data)
    two = optimizer_comparison.run_grid(workers(2), rt, train_data, eval_data)
    assert "training 3 grid points, 2 at a time" in capsys.readouterr().out
    assert [r.label for r in two] == [r.label for r in one]
    for a, b in zip(one, two, strict=True):
        assert b.evals == a.evals
        assert [h["loss"] for h in b.history] == [h["loss"] for h in a.history]
        assert b.refresh_log == a.refresh_log
        assert b.predictions == a.predictions and len(a.predictions) > 0
        assert b.preconditioner == a.preconditioner
    assert [bool(r.preconditioner) for r in one] == [True, False, False]  # THOR's only


def _thor_variants_bench():
    return bench_script("thor_variants")


def test_thor_variants_bench_changes_only_parameters_the_notebook_has():
    bench = _thor_variants_bench()
    cfg = bench.demo_config("demo")
    assert (cfg.preset, cfg.max_steps, cfg.device) == ("demo", 300, "cpu")
    for point, overrides in bench.VARIANTS.values():
        assert set(overrides) <= set(cfg)
        assert bench.variant_config(cfg, overrides) == {**cfg, **overrides}
        assert point["lr"] > 0 and point["damping"] > 0
    with pytest.raises(ValueError, match="unknown 06_bert_thor parameters: stat_decy"):
        bench.variant_config(cfg, {"stat_decy": 0.0})


def test_thor_variants_bench_runs_the_sgd_grid_and_the_variants(tmp_path):
    bench = _thor_variants_bench()
    small = {
        "data_dir": str(tmp_path / "shards"),
        "num_samples": 240,
        "samples_per_shard": 120,
        "eval_samples": 40,
        "max_steps": 6,
        "eval_every": 2,
        "eval_batch_size": 40,
    }
    names = ["THOR as in the preset", "issue's layer rule (LayerNorm, position table first-order)"]
    result = bench.run_variants("demo", names, small)
    sgd, *variants = result["rows"]
    assert (result["steps"], len(variants)) == (6, 2)
    assert sgd["variant"].startswith("SGD, the grid's best")
    assert result["target_accuracy"] == sgd["final_accuracy"]
    assert sgd["steps_to_target"] == result["steps_to_target_sgd"] <= 6
    assert [v["variant"] for v in variants] == names
    assert variants[1]["settings"]["thor_layernorm"] == "first_order"
    assert all(0.0 <= v["final_accuracy"] <= 1.0 and v["median_ms_per_step"] > 0 for v in variants)
    table = bench.markdown(result)
    assert table.count("\n| ") == 4  # header + SGD + two variants


def test_thor_variant_effect_bench_trains_the_thor_grid_both_ways(tmp_path):
    bench = bench_script("thor_variant_effect")
    small = {
        "data_dir": str(tmp_path / "shards"),
        "num_samples": 240,
        "samples_per_shard": 120,
        "eval_samples": 40,
        "max_steps": 4,
        "eval_every": 2,
        "eval_batch_size": 40,
        "grid_workers": 1,
        "grid": {"thor": [{"lr": 0.02, "damping": 0.007035}], "sgd": [{"lr": 0.1}]},
    }
    result = bench.measure("demo", small)
    rows = {r["thor_variant"]: r for r in result["rows"]}
    assert set(rows) == {"mindspore", "nbzoo"}
    for row in rows.values():
        p, n = row["final MLM accuracy"], row["masked tokens evaluated"]
        assert 0 < n <= 40 * SPEC_DEMO_PREDICTIONS
        assert row["standard error"] == pytest.approx((p * (1 - p) / n) ** 0.5)
        assert row["best grid point"] == "thor lr 0.02, damping 0.007035"
    assert bench.markdown(result).count("\n| ") == 3  # header + two variants


def test_thor_gpu_check_runs_the_full_preset_path_through_torchrun(tmp_path):
    """The GPU check at toy size on the CPU: the full preset's settings, the torchrun entry point,
    one run per optimizer, the alternating timing, the record and its report."""
    check = bench_script("thor_gpu_check")
    cfg = check.check_config("cpu", 120, 2400, tmp_path / "shards", tiny=False)
    assert (cfg.preset, cfg.batch_size, cfg.frequency, cfg.model_config) == ("full", 12, 100, {})
    assert cfg.sample_spec == check.MLPERF_SHAPE and cfg.checkpoint_dir == ""
    record_path = tmp_path / "record.json"
    argv = ["--tiny", "--device", "cpu", "--steps", "4", "--paired-steps", "4"]
    argv += ["--samples", "200", "--workdir", str(tmp_path / "work"), "--json", str(record_path)]
    assert check.main(argv) == 0
    record = json.loads(record_path.read_text())
    assert [r["optimizer"] for r in record["runs"]] == ["thor", "sgd", "adamw"]
    assert all(r["steps"] == 4 and r["finite_loss"] for r in record["runs"])
    thor = record["runs"][0]
    assert thor["refreshes"] == 1 and thor["inversions"] > 0 and thor["failed_inversions"] == 0
    assert record["paired"]["steps"] == 4 and record["paired"]["ratio"] > 0
    report = check.markdown(record, source="record.json")
    assert report.count("\n| ") == 4  # header + three optimizers
    assert f"**{record['paired']['ratio']:.2f}**" in report
    readme = tmp_path / "README.md"
    start, end = check.MARKERS
    readme.write_text(f"intro\n{start}\nold\n{end}\n")
    from nbzoo import bench

    bench.update_readme(readme, report, check.MARKERS)
    assert "old" not in readme.read_text() and report in readme.read_text()
