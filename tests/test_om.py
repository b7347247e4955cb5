"""Notebook 02's OM flow (nbzoo.export.om, albert.convert_om / om_predict) through the stand-in
atc, npu-smi and ais_bench of nbzoo.export.cann_standins (test tooling: CANN cannot be installed
here). The stand-ins accept only the seed's command lines and write ais_bench's output layout."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nbzoo.data import albert_preprocess
from nbzoo.export import albert, cann_standins, om
from tests.test_export_onnx import features, tiny_albert

# shared/seeds beside the checkout (/work/main) or beside the folder of worktrees (/work/wt/x)
SEED_FILE = next(
    (
        p / "shared" / "seeds" / "002_albert.md"
        for p in Path(__file__).resolve().parents[2:4]
        if (p / "shared" / "seeds" / "002_albert.md").exists()
    ),
    Path("shared/seeds/002_albert.md"),
)
SAMPLES = 40  # the bs-32 run ends on a padded batch of 8


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    return cann_standins.write(tmp_path_factory.mktemp("cann"))


@pytest.fixture
def on_path(standins, monkeypatch):
    env = standins.env()
    monkeypatch.setenv("PATH", env["PATH"])
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    monkeypatch.syspath_prepend(str(standins.python))
    sys.modules.pop("ais_bench", None)
    return standins


def _preprocessed(folder: Path, seq: int) -> Path:
    """The seed's layout (one 1 × seq int64 file per sample and input, label.npy)."""
    feats = features(SAMPLES, seq, seed=seq)
    for name in albert_preprocess.INPUT_NAMES:
        (folder / name).mkdir(parents=True)
        for i in range(SAMPLES):
            np.save(folder / name / f"{i}.npy", feats[name][i : i + 1])
    np.save(folder / "label.npy", np.arange(SAMPLES, dtype=np.int64) % 2)
    return folder


@pytest.fixture(scope="module")
def flow(standins, tmp_path_factory):
    """The seed's two OM shapes converted and run in a work folder, as notebook 02 does."""
    mp = pytest.MonkeyPatch()
    env = standins.env()
    mp.setenv("PATH", env["PATH"])
    mp.setenv("PYTHONPATH", env["PYTHONPATH"])
    work = tmp_path_factory.mktemp("work")
    model = tiny_albert(max_positions=128)  # the seed's seq 128
    runs = {}
    try:
        for seq, bs in ((128, 32), (16, 64)):
            data = _preprocessed(work / f"preprocessed_data_seq{seq}", seq)
            feats, _ = albert_preprocess.load_features(data)
            albert.export_static(model, feats, work / "outputs", bs)
            converted = albert.convert_om(work, seq, bs)
            logits, stats, run = albert.om_predict(work, converted, SAMPLES)
            runs[seq, bs] = (converted, feats, logits, stats, run)
    finally:
        mp.undo()
    return model, work, runs


def test_the_standins_recorded_argv_equal_the_seeds_atc_and_ais_bench_lines(standins, flow):
    atc_calls = standins.calls("atc")
    # the seed's lines, its ${chip_name} being what its npu-smi example shows (910A)
    assert atc_calls[0]["argv"] == shlex.split(
        cann_standins.SEED_ATC_SEQ128_BS32.replace("${chip_name}", "Ascend910A")
    )
    assert atc_calls[1]["argv"] == shlex.split(
        cann_standins.SEED_ATC_SEQ16_BS64.replace("${chip_name}", "Ascend910A")
    )
    bench = standins.calls("ais_bench")[0]["argv"]
    assert bench[0] == sys.executable  # `python3` in the seed: this interpreter here
    assert bench[1:] == shlex.split(cann_standins.SEED_AIS_BENCH_SEQ128_BS32)[1:]
    assert standins.calls("npu-smi")[0]["argv"] == ["npu-smi", "info"]
    converted = flow[2][128, 32][0]
    assert converted.atc.ran and converted.om == "outputs/albert_seq128_bs32.om"


@pytest.mark.skipif(not SEED_FILE.exists(), reason="shared/seeds not beside the checkout")
def test_the_standins_lines_are_the_seeds_verbatim():
    text = SEED_FILE.read_text(encoding="utf-8")
    for line in (cann_standins.SEED_ATC_SEQ128_BS32, cann_standins.SEED_ATC_SEQ16_BS64):
        assert line in text
    assert cann_standins.SEED_AIS_BENCH_SEQ128_BS32 in " ".join(text.split())
    assert cann_standins.SEED_NPU_SMI.splitlines()[4].strip() in text


def test_the_om_scores_what_pytorch_computes(flow):
    model, _, runs = flow
    for (_seq, bs), (_, feats, logits, stats, run) in runs.items():
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in feats.items()}).logits.numpy()
        np.testing.assert_allclose(logits, ref, atol=1e-4)
        assert stats["count"] == -(-SAMPLES // bs) and stats["p50"] > 0
        assert run.throughput == pytest.approx(1000 * bs / run.summary["NPU_compute_time"]["mean"])


def test_ais_bench_layout_one_file_per_sample_and_the_summary_beside(flow):
    _, work, runs = flow
    out = work / "results" / "seq128_bs32"
    written = sorted(p.name for p in out.iterdir() if p.name != ".nbzoo-owned")  # nbzoo's marker
    assert written == sorted(f"{i}_0.npy" for i in range(SAMPLES))
    summary = json.loads((work / "results" / "seq128_bs32_summary.json").read_text())
    assert len(summary["filesinfo"]) == SAMPLES  # the padded rows of the last batch: not written
    first = summary["filesinfo"]["0"]
    assert first["infiles"][0] == "./preprocessed_data_seq128/input_ids/0.npy"
    assert first["outfiles"] == ["results/seq128_bs32/0_0.npy"]
    assert np.load(out / "0_0.npy").shape == (1, 2)


def test_a_sample_missing_from_ais_bench_output_is_named(flow, tmp_path):
    run = flow[2][128, 32][4]
    summary = json.loads(json.dumps(run.summary))
    del summary["filesinfo"]["7"]
    broken = om.AisBenchRun(run.command, run.cwd, run.output_dir, summary)
    with pytest.raises(om.OmError, match="no output for sample 7"):
        om.read_outputs(broken, SAMPLES)
    (tmp_path / "x_summary.json").write_text("{}")
    with pytest.raises(om.OmError, match="NPU_compute_time"):
        om.read_summary(tmp_path / "x_summary.json")


def test_the_standin_atc_refuses_a_line_that_is_not_the_seeds(on_path, flow):
    work = flow[1]
    argv = cann_standins.seed_atc_argv(128, 32, chip="Ascend910A") + ["--log=debug"]
    done = subprocess.run(argv, cwd=work, capture_output=True, text=True)
    assert done.returncode == 2 and "differ from the seed's ATC line" in done.stderr
    wrong = [a.replace("--log=error", "--log=info") for a in argv[:-1]]
    done = subprocess.run(wrong, cwd=work, capture_output=True, text=True)
    assert done.returncode == 2 and "'--log=info' vs the seed's '--log=error'" in done.stderr


def test_the_standin_ais_bench_refuses_flags_the_seed_does_not_use(on_path, flow):
    argv = [sys.executable, *shlex.split(cann_standins.SEED_AIS_BENCH_SEQ128_BS32)[1:]]
    argv += ["--loop", "5"]
    done = subprocess.run(argv, cwd=flow[1], capture_output=True, text=True)
    assert done.returncode != 0 and "--loop" in done.stderr


def test_tools_are_told_apart_standins_cann_and_absent(on_path, tmp_path, monkeypatch):
    tools = om.find_tools()
    assert {t.kind for t in tools.values()} == {"stand-in"}
    assert om.flow_kind(tools) == "stand-ins" and "test tooling" in tools["atc"].describe()
    real = tmp_path / "atc"
    real.write_text("#!/bin/sh\nexit 0\n")
    real.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{on_path.bin}")
    assert om.find_tools()["atc"].kind == "CANN" and om.flow_kind(om.find_tools()) == "mixed"
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(on_path.python)])
    sys.modules.pop("ais_bench", None)
    tools = om.find_tools()
    assert tools["atc"].kind == "absent" and om.flow_kind(tools) == "skipped"


def test_the_sweep_scores_the_om_beside_pytorch_and_onnx(on_path, flow, tmp_path):
    model, work, runs = flow
    feats = runs[16, 64][1]
    stages = albert.build_stages(model, feats, tmp_path / "onnx", int8=False, show_progress=False)
    table = albert.sweep(
        model,
        stages.paths,
        {s: work / f"preprocessed_data_seq{s}" for s in (16, 128)},
        [8],
        tmp_path / "results",
        om_models=[r[0] for r in runs.values()],
        work=work,
        seq_lengths=[16],
        show_progress=False,
    )
    got = {key: list(rows.stage) for key, rows in table.groupby(["seq", "batch"])}
    assert got == {
        (16, 8): ["pytorch_eager", "onnx", "onnx_sim", "onnx_opt"],
        (16, 64): ["pytorch_eager", "onnx_opt", "om"],
        (128, 32): ["pytorch_eager", "onnx_opt", "om"],
    }
    oms = table[table.stage == "om"]
    assert (oms["agreement with PyTorch"] == 1.0).all()
    assert (oms["max |Δlogit| vs PyTorch"] < 1e-4).all()
    assert oms.backend.str.contains("stand-in").all()
    for _, row in table.iterrows():
        lo, hi = row["samples/s IQR"]
        assert lo <= row["samples/s"] <= hi
