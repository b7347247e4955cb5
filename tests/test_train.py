import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nbzoo import device
from nbzoo.train import (
    TrainConfig,
    epoch_batches,
    find_checkpoint,
    fit,
    save_checkpoint,
    step_shares,
    steps_per_epoch,
)

JOBS = Path(__file__).parent / "jobs"


def toy_data(n=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x.sum(1) > 0).long()
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def toy_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))


def loss_fn(m, batch):
    return torch.nn.functional.cross_entropy(m(batch["x"]), batch["labels"])


def test_training_lowers_the_loss_and_reports_throughput():
    rt = device.Runtime("cpu", "fp32")
    model = toy_model()
    result = fit(
        model,
        toy_data(),
        torch.optim.SGD(model.parameters(), lr=0.5),
        rt,
        TrainConfig(epochs=5, batch_size=16),
        loss_fn=loss_fn,
    )
    first = sum(h["loss"] for h in result.history[:8]) / 8
    last = sum(h["loss"] for h in result.history[-8:]) / 8
    assert last < 0.5 * first
    assert result.steps == 5 * 8 and result.samples == 5 * 128 and result.samples_per_second > 0


def test_gradient_accumulation_matches_one_large_batch():
    rt = device.Runtime("cpu", "fp32")
    a, b = toy_model(), toy_model()
    fit(
        a,
        toy_data(),
        torch.optim.SGD(a.parameters(), lr=0.1),
        rt,
        TrainConfig(epochs=1, batch_size=32),
        loss_fn=loss_fn,
    )
    fit(
        b,
        toy_data(),
        torch.optim.SGD(b.parameters(), lr=0.1),
        rt,
        TrainConfig(epochs=1, batch_size=8, grad_accum=4),
        loss_fn=loss_fn,
    )
    for p, q in zip(a.parameters(), b.parameters(), strict=False):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_accumulated_micro_batches_of_unequal_size_weigh_by_their_sentences():
    """20 sentences as micro-batches of 8, 8 and 4 (grad_accum 3) take the step of one batch of 20:
    the loss is the mean over the 20 sentences, not the mean of the three micro-batches' means
    (which would count each of the last 4 sentences twice as much)."""
    rt = device.Runtime("cpu", "fp32")
    whole, accumulated = toy_model(), toy_model()
    data = toy_data(20)
    one = fit(whole, data, torch.optim.SGD(whole.parameters(), lr=0.5), rt,
              TrainConfig(epochs=1, batch_size=20), loss_fn=loss_fn)  # fmt: skip
    three = fit(accumulated, data, torch.optim.SGD(accumulated.parameters(), lr=0.5), rt,
                TrainConfig(epochs=1, batch_size=8, grad_accum=3), loss_fn=loss_fn)  # fmt: skip
    assert one.steps == three.steps == 1
    assert three.history[0]["loss"] == pytest.approx(one.history[0]["loss"], rel=1e-6)
    for p, q in zip(whole.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def two_term_loss(m, batch):
    """A loss of two means over different things: the labelled rows (``keep``) and all rows."""
    logits = m(batch["x"])
    keep = batch["keep"]
    picked = torch.nn.functional.cross_entropy(logits[keep], batch["labels"][keep], reduction="sum")
    return {"picked": picked / keep.sum(), "all": logits.pow(2).mean()}


def two_term_counts(batch):
    return {"picked": int(batch["keep"].sum()), "all": len(batch["x"])}


def test_a_loss_of_several_means_weighs_each_term_by_its_own_items():
    """Masked-LM + NSP: each term is averaged over the step's own items (masked tokens, samples),
    whatever the micro-batch they fall in."""
    rt = device.Runtime("cpu", "fp32")
    data = [
        {**item, "keep": torch.tensor(i % 3 == 0 or i < 4)} for i, item in enumerate(toy_data(24))
    ]
    whole, accumulated = toy_model(), toy_model()
    one = fit(whole, data, torch.optim.SGD(whole.parameters(), lr=0.5), rt,
              TrainConfig(epochs=1, batch_size=24), loss_fn=two_term_loss,
              loss_counts=two_term_counts)  # fmt: skip
    four = fit(accumulated, data, torch.optim.SGD(accumulated.parameters(), lr=0.5), rt,
               TrainConfig(epochs=1, batch_size=6, grad_accum=4), loss_fn=two_term_loss,
               loss_counts=two_term_counts)  # fmt: skip
    assert four.history[0]["loss"] == pytest.approx(one.history[0]["loss"], rel=1e-6)
    for p, q in zip(whole.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_one_micro_batch_on_one_process_weighs_exactly_one():
    assert step_shares([{"loss": 7, "mlm": 3.0}]) == [{"loss": 1.0, "mlm": 1.0}]
    assert step_shares([{"t": 3}, {"t": 1}]) == [{"t": 0.75}, {"t": 0.25}]
    assert step_shares([{"t": 0}, {"t": 0}]) == [{"t": 0.0}, {"t": 0.0}]


def test_the_optimizer_steps_of_an_epoch_count_the_global_batch():
    assert steps_per_epoch(100, batch_size=8) == 13
    assert steps_per_epoch(100, batch_size=8, world_size=2, grad_accum=3) == 3
    assert steps_per_epoch(96, batch_size=12, world_size=1, grad_accum=8) == 1


def test_evaluation_runs_each_epoch_and_every_n_steps():
    rt = device.Runtime("cpu", "fp32")
    model = toy_model()
    calls = []
    result = fit(
        model,
        toy_data(64),
        torch.optim.SGD(model.parameters(), lr=0.1),
        rt,
        TrainConfig(epochs=2, batch_size=16, eval_every=3),
        loss_fn=loss_fn,
        eval_fn=lambda m: calls.append(m.training) or {"score": 1.0},
    )
    assert [e["step"] for e in result.evals] == [3, 4, 6, 8]
    assert calls == [False] * 4 and model.training


def test_epoch_batches_shard_like_distributed_sampler():
    full = epoch_batches(10, 3, seed=1, epoch=0)
    r0 = epoch_batches(10, 3, seed=1, epoch=0, rank=0, world_size=2)
    r1 = epoch_batches(10, 3, seed=1, epoch=0, rank=1, world_size=2)
    assert sorted(i for b in full for i in b) == list(range(10))
    assert sum(map(len, r0)) == sum(map(len, r1)) == 5
    assert epoch_batches(10, 3, seed=1, epoch=1) != full


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path, capsys):
    rt = device.Runtime("cpu", "fp32")
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fit(
        model,
        toy_data(32),
        opt,
        rt,
        TrainConfig(epochs=1, batch_size=16, checkpoint_dir=tmp_path, run_id="a"),
        loss_fn=loss_fn,
    )
    result = fit(
        model,
        toy_data(32),
        opt,
        rt,
        TrainConfig(epochs=1, batch_size=16, checkpoint_dir=tmp_path, run_id="b"),
        loss_fn=loss_fn,
    )
    assert result.resumed_from_step is None and result.steps == 2
    assert "belongs to another configuration" in capsys.readouterr().out


def test_a_save_that_died_between_renames_is_recovered(tmp_path):
    rt = device.Runtime("cpu", "fp32")
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    from nbzoo.train import TrainState

    save_checkpoint(tmp_path, model, opt, None, rt.grad_scaler(), TrainState(step=7))
    (tmp_path / "last").rename(tmp_path / ".old")  # the moment between the two renames
    (tmp_path / ".tmp-123").mkdir()  # and a half-written folder of a later save
    assert find_checkpoint(tmp_path) == tmp_path / ".old"


def run_job(*args, timeout=240):
    return subprocess.run(
        [sys.executable, str(JOBS / "glue_job.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    whole = run_job(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr
    killed = run_job(
        tmp_path / "killed", 7
    )  # SIGKILL in the first epoch, after the step-6 checkpoint
    assert killed.returncode == -9
    resumed = run_job(tmp_path / "killed")
    assert resumed.returncode == 0, resumed.stderr
    a, b = json.loads(whole.stdout.splitlines()[-1]), json.loads(resumed.stdout.splitlines()[-1])
    assert b["resumed_from"] == 6 and a["resumed_from"] is None
    assert a["steps"] == b["steps"] == 20
    assert a["metrics"] == b["metrics"]
    assert a["digest"] == b["digest"]  # bit-identical weights


@pytest.mark.slow
def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(JOBS / "ddp_job.py"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["digest"] == r1["digest"]
    assert r0["samples"] == 3 * 256  # each epoch covers the data once across both ranks
    assert sum(r0["losses"][-6:]) < 0.8 * sum(r0["losses"][:6])


def entries(folder) -> list[str]:
    """What a checkpoint folder holds, but nbzoo's marker (nbzoo.safe_write)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".nbzoo-owned")


def two_checkpoints(tmp_path):
    """A finished 2-epoch run: ``last`` at step 4, ``previous`` at step 2."""
    rt = device.Runtime("cpu", "fp32")
    model = toy_model()
    cfg = TrainConfig(epochs=2, batch_size=16, checkpoint_dir=tmp_path, run_id="a")
    fit(model, toy_data(32), torch.optim.SGD(model.parameters(), lr=0.1), rt, cfg, loss_fn=loss_fn)
    return rt, cfg


def rerun(rt, cfg):
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return fit(model, toy_data(32), opt, rt, cfg, loss_fn=loss_fn)


@pytest.mark.parametrize("victim", ["model.safetensors", "trainer_state.pt"])
def test_a_truncated_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
    tmp_path, capsys, victim
):
    rt, cfg = two_checkpoints(tmp_path)
    assert entries(tmp_path) == ["last", "previous"]
    broken = tmp_path / "last" / victim
    data = broken.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    result = rerun(rt, cfg)
    out = capsys.readouterr().out
    assert f"checkpoint {tmp_path / 'last'} is broken: {victim}" in out
    assert result.resumed_from_step == 2 and result.steps == 4  # from previous, to the end
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("broken-last-")]
    assert len(aside) == 1 and (aside[0] / victim).read_bytes() == data[: len(data) // 2]
    # and the next rerun finds an intact checkpoint at the end of the run: nothing left to do
    assert rerun(rt, cfg).resumed_from_step == 4


def test_a_full_disk_leaves_no_temporary_folder_and_the_last_checkpoint_intact(
    tmp_path, monkeypatch
):
    from nbzoo import train
    from nbzoo.train import TrainState

    rt = device.Runtime("cpu", "fp32")
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, model, opt, None, rt.grad_scaler(), TrainState(step=3))
    before = (tmp_path / "last" / "trainer_state.pt").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train.torch, "save", disk_full)
    for _ in range(3):
        with pytest.raises(OSError, match="No space left"):
            save_checkpoint(tmp_path, model, opt, None, rt.grad_scaler(), TrainState(step=5))
    assert entries(tmp_path) == ["last"]
    assert (tmp_path / "last" / "trainer_state.pt").read_bytes() == before


def test_temporary_folders_of_dead_saves_are_cleaned(tmp_path):
    from nbzoo.train import TrainState

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    rt = device.Runtime("cpu", "fp32")
    model = toy_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    save_checkpoint(tmp_path, model, opt, None, rt.grad_scaler(), TrainState(step=1))
    dead = tmp_path / f".next.nbzoo-tmp-{gone.stdout.strip()}-0a1b2c3d"  # a save killed mid-way
    (dead / "half").mkdir(parents=True)
    save_checkpoint(tmp_path, model, opt, None, rt.grad_scaler(), TrainState(step=2))
    assert entries(tmp_path) == ["last", "previous"]
