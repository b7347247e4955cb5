"""`nbzoo bench --quick --device cpu`: every case runs stock and nbzoo's perf path on small shapes
and writes a complete record; the table is generated from those records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from nbzoo import bench
from tests.conftest import bench_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_PATCHES = {
    "albert_base_cls": [],
    "roberta_base_cls": [],
    "bert_large_pretrain_128": ["bert_pretraining_sparse_mlm_perf"],
    "bert_large_pretrain_512": ["bert_pretraining_sparse_mlm_perf"],
    "longformer_base_mlm_4096": ["longformer_sparse_mlm_perf", "longformer_chunked_sdpa_perf"],
    "reformer_lm_4096": ["reformer_plain_residual_perf", "reformer_int_chunk_len_perf"],
}


def nbzoo(*args, results):
    env = {**os.environ, "NBZOO_RESULTS": str(results), "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "nbzoo.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    proc = nbzoo("bench", "--quick", "--device", "cpu", "--steps", "2", results=results)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, results / "bench" / "quick"


def test_quick_bench_writes_a_complete_record_per_case(quick_run):
    proc, folder = quick_run
    assert sorted(p.stem for p in folder.glob("*.json")) == sorted(bench.CASES)
    for name in bench.CASES:
        assert f"] {name}: stock " in proc.stdout  # one progress line per case
        record = json.loads((folder / f"{name}.json").read_text())
        assert record["case"] == name and record["quick"] is True
        assert record["device"] == "cpu" and record["device_name"]
        assert record["versions"]["torch"] and record["versions"]["transformers"]
        assert record["batch_size"] >= 2 and record["seq_len"] >= 32
        assert record["flops_per_step"] > 0
        for path in ("stock", "nbzoo"):
            r = record[path]
            assert r["samples_per_second"] > 0 and r["step_seconds"] > 0
            assert r["samples_per_second"] == pytest.approx(
                record["batch_size"] / r["step_seconds"]
            )
            assert r["mfu"] is None  # no bf16 peak is known for a CPU
            assert "peak_memory_bytes" in r and r["finite"] is True
        assert record["ratio"] == pytest.approx(
            record["nbzoo"]["samples_per_second"] / record["stock"]["samples_per_second"]
        )
        assert record["nbzoo"]["patches"] == EXPECTED_PATCHES[name]
        assert record["stock"]["candidates"] and "mode" in record["stock"]
        # same weights, batch and loss semantics: the first losses agree (bf16)
        assert 0 <= record["loss_rel_diff"] <= 1e-2, record["loss_rel_diff"]
        assert 0 <= record["loss_rel_diff_no_dropout"] <= 1e-2
        assert record["meets_goal"] is None  # not judged off a GPU
    assert "| case | device |" in proc.stdout  # the table at the end


def test_table_is_generated_from_the_records(quick_run, tmp_path):
    _, folder = quick_run
    text = bench.render_table(folder)
    for name in bench.CASES:
        assert f"| {name} |" in text
    record = json.loads((folder / "reformer_lm_4096.json").read_text())
    assert f"{record['ratio']:.2f}×" in text
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{bench.README_START}\nold\n{bench.README_END}\nend\n")
    bench.update_readme(readme, text)
    content = readme.read_text()
    assert "old" not in content and text in content and content.endswith("end\n")
    assert "no GPU run" in bench.render_table(tmp_path / "empty")


def test_unknown_case_is_a_usage_error(capsys):
    args = bench.build_parser().parse_args(["nope", "--quick", "--device", "cpu"])
    assert bench.main(args) == 2
    err = capsys.readouterr().err
    assert "unknown case 'nope'" in err and "albert_base_cls" in err


@pytest.mark.parametrize("case", ["albert_base_cls", "albert_base_sst2"])
@pytest.mark.parametrize(
    "device, message",
    [("npu", "device='npu' but no usable Ascend NPU"), ("tpu", "device must be one of")],
)
def test_a_device_that_cannot_be_had_is_one_line(case, device, message, capsys):
    args = bench.build_parser().parse_args([case, "--quick", "--device", device])
    assert bench.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"nbzoo bench: {message}") and len(err.splitlines()) == 1, err


def test_the_committed_readme_shows_the_committed_gpu_records():
    """bench/README.md's tables are generated from results/bench/*.json, and kept in step."""
    from pathlib import Path

    readme = (Path(ROOT) / "bench" / "README.md").read_text(encoding="utf-8")
    assert bench.render_table(Path(ROOT) / "results" / "bench") in readme
    check = bench_script("thor_gpu_check")
    record = json.loads((Path(ROOT) / check.RECORD).read_text(encoding="utf-8"))
    assert check.markdown(record) in readme


def test_measuring_order_and_a_pinned_sdpa_kernel_change_no_path_s_arithmetic(one_torch_thread):
    """--order and --sdpa only reorder and pin what is measured: each path's first training loss
    is the same whichever runs first, and the math kernel gives the same loss as the default."""
    from nbzoo.device import setup

    rt = setup("cpu", "bf16", seed=0)
    case = bench.CASES["albert_base_cls"]
    first = bench.run_case(case, rt, 1, 1, quick=True, compile_=False)
    swapped = bench.run_case(case, rt, 1, 1, quick=True, compile_=False, order="nbzoo-first")
    pinned = bench.run_case(case, rt, 1, 1, quick=True, compile_=False, sdpa="math")
    assert (swapped["order"], pinned["sdpa_backend"]) == ("nbzoo-first", "math")
    for path in ("stock", "nbzoo"):
        assert swapped[path]["first_loss"] == first[path]["first_loss"]
        assert pinned[path]["first_loss"] == pytest.approx(first[path]["first_loss"], rel=1e-2)
    with pytest.raises(ValueError, match="order must be one of"):
        bench.run_case(case, rt, 1, 1, quick=True, compile_=False, order="random")
    with pytest.raises(ValueError, match="SDPA backend must be one of"):
        bench.sdpa_backend("fastest")
