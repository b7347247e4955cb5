"""Precision as the seeds use it: O1 (fp16 autocast, dynamic loss scaling), O2 (an fp16 model over
fp32 master weights, apex's meaning), on the CPU through the same code path as on a GPU or NPU."""

import pytest
import torch

from nbzoo import amp, device
from nbzoo.train import TrainConfig, find_checkpoint, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return [{"x": x[i], "labels": (x[i].sum() > 0).long()} for i in range(n)]


def model_(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 2))


def loss_fn(m, batch):
    return torch.nn.functional.cross_entropy(m(batch["x"]), batch["labels"])


def test_o2_trains_an_fp16_model_while_the_optimizer_steps_fp32_masters():
    rt = device.Runtime("cpu", device.resolve_precision("O2", "cpu"))
    model = model_()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []

    def look(step, loss, state):
        seen.append(
            (
                {p.dtype for p in model.parameters()},
                {p.dtype for g in optimizer.param_groups for p in g["params"]},
            )
        )

    result = fit(
        model, data(), optimizer, rt, TrainConfig(epochs=1, batch_size=16), loss_fn=loss_fn,
        callbacks=[look],
    )  # fmt: skip
    assert result.steps == 4 and result.final_loss == result.final_loss  # not NaN
    assert seen == [({torch.float16}, {torch.float32})] * 4
    # the model handed back is fp32 again, holding the masters themselves
    masters = optimizer.param_groups[0]["params"]
    assert all(p is m for p, m in zip(model.parameters(), masters, strict=True))


@pytest.mark.parametrize("precision", ["O2", device.O2_FP32_COMPUTE])
def test_o2_masters_accumulate_updates_below_fp16_resolution(precision):
    """Each step moves the weights by 1e-4, under half of fp16's spacing at 1.0 (2**-10 ≈ 9.8e-4):
    an fp16 weight alone would never move; the fp32 masters add the steps up."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    rows = [{"x": torch.ones(1), "y": torch.ones(1)} for _ in range(40)]

    def constant_gradient(m, batch):  # d loss / d w = 1 exactly
        return m(batch["x"]).sum()

    rt = device.Runtime("cpu", precision, loss_scale=False)
    fit(
        layer, rows, torch.optim.SGD(layer.parameters(), lr=1e-4), rt,
        TrainConfig(epochs=1, batch_size=1), loss_fn=constant_gradient,
    )  # fmt: skip
    assert layer.weight.dtype == torch.float32
    assert layer.weight.item() == pytest.approx(1.0 - 40 * 1e-4, abs=1e-6)
    # the same steps on the fp16 weight itself are lost to rounding
    half = torch.ones(1, dtype=torch.float16)
    for _ in range(40):
        half -= torch.tensor(1e-4, dtype=torch.float16)
    assert half.item() == 1.0


def test_o2_keeps_tied_weights_tied_and_batch_norms_fp32():
    model = torch.nn.Sequential(
        torch.nn.Embedding(10, 4), torch.nn.BatchNorm1d(3), torch.nn.Linear(4, 10)
    )
    model[2].weight = model[0].weight
    masters = amp.MasterWeights(model, torch.optim.SGD(model.parameters(), lr=0.1))
    masters.use_fp16()
    assert model[0].weight is model[2].weight and model[0].weight.dtype == torch.float16
    assert model[1].weight.dtype == torch.float32 and model[1].running_mean.dtype == torch.float32
    masters.use_masters()
    assert model[0].weight is model[2].weight and model[0].weight.dtype == torch.float32


def test_o2_casts_inputs_to_fp16_and_outputs_to_fp32():
    model = torch.nn.Linear(3, 2)
    masters = amp.MasterWeights(model, torch.optim.SGD(model.parameters(), lr=0.1))
    masters.use_fp16()
    out = model(torch.randn(4, 3))  # an fp32 input into an fp16 layer
    assert out.dtype == torch.float32
    masters.use_masters()
    assert model(torch.randn(4, 3)).dtype == torch.float32


@pytest.mark.parametrize("precision", ["O2", device.O2_FP32_COMPUTE])
def test_o2_checkpoints_hold_the_fp32_masters_and_resume_exactly(tmp_path, precision):
    rt = device.Runtime("cpu", precision)

    def run(max_steps, folder):
        model = model_()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        cfg = TrainConfig(
            epochs=2, batch_size=16, max_steps=max_steps, checkpoint_dir=folder,
            checkpoint_every=3, run_id="o2",
        )  # fmt: skip
        return model, fit(model, data(), opt, rt, cfg, loss_fn=loss_fn)

    whole, _ = run(None, tmp_path / "a")
    run(3, tmp_path / "b")  # stops after 3 steps, checkpoint written
    from safetensors.torch import load_file

    saved = load_file(find_checkpoint(tmp_path / "b") / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.float32}
    resumed, result = run(None, tmp_path / "b")
    assert result.resumed_from_step == 3
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_o2_fp32_compute_computes_in_fp32_with_the_fp16_weights_and_fp16_gradients():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    masters = amp.MasterWeights(model, optimizer, compute_dtype=torch.float32)
    master_weight = model.weight
    masters.use_fp16()
    seen = {}

    def look(module, args, out):
        seen.update(x=args[0].dtype, w=module.weight.dtype, out=out.dtype)
        seen["weight"] = module.weight.detach().clone()

    model.register_forward_hook(look)
    model(torch.randn(4, 3)).sum().backward()
    assert (seen["x"], seen["w"], seen["out"]) == (torch.float32,) * 3
    # the values it computes with are the fp16 weights, upcast
    assert torch.equal(seen["weight"], master_weight.detach().half().float())
    assert not torch.equal(seen["weight"], master_weight.detach())
    assert {half.grad.dtype for _, half in masters.pairs} == {torch.float16}
    masters.grads_to_masters()
    assert {m.grad.dtype for m in masters.masters} == {torch.float32}
    masters.use_masters()
    assert model.weight is master_weight


def test_o2_fp32_compute_keeps_the_fp32_weights_for_a_backward_that_reruns_a_layer():
    """Activation checkpointing (and Reformer's reversible layers) run a layer's forward again
    inside the backward: it reads the same fp32 weights as the forward did."""

    class Checkpointed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(6, 6)
            self.head = torch.nn.Linear(6, 2)

        def forward(self, x):
            x = torch.utils.checkpoint.checkpoint(self.inner, x, use_reentrant=False)
            return self.head(torch.tanh(x))

    torch.manual_seed(0)
    model = Checkpointed()
    rt = device.Runtime("cpu", device.O2_FP32_COMPUTE)
    result = fit(
        model, data(32), torch.optim.SGD(model.parameters(), lr=0.1), rt,
        TrainConfig(epochs=1, batch_size=16), loss_fn=loss_fn,
    )  # fmt: skip
    assert result.steps == 2 and all(h["loss"] == h["loss"] for h in result.history)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_o2_is_refused_with_thor():
    from nbzoo.optim.thor import THOR

    model = model_()
    opt = THOR(model, lr=0.01, damping=0.03)
    with pytest.raises(ValueError, match="O2 is not available with THOR"):
        fit(model, data(), opt, device.Runtime("cpu", "O2"), TrainConfig(), loss_fn=loss_fn)
    opt.remove_hooks()


def test_o1_autocasts_to_fp16_on_the_cpu_and_scales_the_loss():
    rt = device.Runtime("cpu", device.resolve_precision("O1", "cpu"))
    assert rt.precision == "fp16"
    with rt.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float16
    scaler = rt.grad_scaler()
    assert scaler.is_enabled() and scaler.get_scale() == 2.0**16


@pytest.mark.parametrize("precision", ["fp16", "O2", device.O2_FP32_COMPUTE])
def test_an_overflow_skips_the_step_and_lowers_the_scale(precision):
    """Dynamic loss scaling: a step whose gradients overflow changes no weight and halves the
    scale; the steps around it train normally."""
    model = model_()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def overflow_on_the_second_step(m, batch):
        calls.append(1)
        loss = loss_fn(m, batch)
        return loss * 1e30 if len(calls) == 2 else loss  # finite in fp32, inf once in fp16

    rt = device.Runtime("cpu", precision)
    scalers = []
    make = rt.grad_scaler
    rt.grad_scaler = lambda: scalers.append(make()) or scalers[-1]  # type: ignore[method-assign]
    scales, weights = [], []

    def look(step, loss, state):
        scales.append(scalers[0].get_scale())
        weights.append([p.detach().float().clone() for p in model.parameters()])

    fit(
        model, data(48), torch.optim.SGD(model.parameters(), lr=0.1), rt,
        TrainConfig(epochs=1, batch_size=16), loss_fn=overflow_on_the_second_step,
        callbacks=[look],
    )  # fmt: skip
    assert scales == [2.0**16, 2.0**15, 2.0**15]
    assert any(not torch.equal(a, b) for a, b in zip(weights[0], before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(weights[1], weights[0], strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(weights[2], weights[1], strict=True))


def test_no_loss_scaling_when_the_seed_turns_it_off():
    assert not device.Runtime("cpu", "fp16", loss_scale=False).grad_scaler().is_enabled()
    assert not device.Runtime("cpu", "bf16").grad_scaler().is_enabled()
    assert not device.Runtime("cpu", "fp32").grad_scaler().is_enabled()
    assert device.Runtime("cpu", "O2").grad_scaler().is_enabled()
    assert device.Runtime("cpu", device.O2_FP32_COMPUTE).grad_scaler().is_enabled()
    # where a CPU took a faster path for O2 or fp16, the loss is scaled as the level asks
    for path, asked in ((device.O2_FP32_COMPUTE, "O2"), ("bf16", "fp16"), ("fp32", "fp16")):
        assert device.Runtime("cpu", path, precision_asked=asked).grad_scaler().is_enabled()


@pytest.mark.parametrize("loss_scale", [True, False])
def test_thor_trains_under_fp16_with_and_without_loss_scaling(loss_scale):
    """06 follows the seed's enable_lossscale: false; with scaling on, THOR gathers G from
    unscaled gradients (its attached scaler). Both learn the toy task on the CPU."""
    from nbzoo.optim.thor import THOR

    model = model_()
    opt = THOR(model, lr=0.05, damping=0.03, frequency=2, stats_every=1)
    rt = device.Runtime("cpu", "fp16", loss_scale=loss_scale)
    try:
        result = fit(
            model, data(128), opt, rt, TrainConfig(epochs=3, batch_size=16), loss_fn=loss_fn
        )
    finally:
        opt.remove_hooks()
    assert (opt.grad_scaler is not None) and opt.grad_scaler.is_enabled() == loss_scale
    losses = [h["loss"] for h in result.history]
    assert all(loss == loss for loss in losses)  # no NaN
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
