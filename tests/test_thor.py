"""THOR against the mathematics: each preconditioned step is compared with the damped natural-gradient
step computed explicitly -- factors gathered here from autograd, the Fisher approximation built as a
dense Kronecker product and solved as one linear system."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
import warnings
from itertools import chain

import pytest
import torch
from torch import nn

from nbzoo import device
from nbzoo.optim import thor as thor_module
from nbzoo.optim.thor import THOR, VARIANTS, PolySchedule
from nbzoo.train import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("one_torch_thread")


DAMPING = 0.04  # λ; each factor gets √λ = 0.2
NBZOO = VARIANTS["nbzoo"]  # biases folded, the tied weight's Kronecker sum, running statistics
MINDSPORE = VARIANTS["mindspore"]  # THOR's defaults
B, T, V, H = 6, 5, 9, 5


class TinyLM(nn.Module):
    """Embedding → Linear → tanh → Linear → (LayerNorm) → decoder, the decoder optionally tied."""

    def __init__(self, tied: bool = True, layernorm: bool = False, hidden: int = 4):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.lin = nn.Linear(H, hidden)
        self.proj = nn.Linear(hidden, H)
        self.norm = nn.LayerNorm(H) if layernorm else nn.Identity()
        self.dec = nn.Linear(H, V)
        if tied:
            self.dec.weight = self.emb.weight
        self.saved: dict[str, torch.Tensor] = {}

    def forward(self, ids):
        e = self.emb(ids)
        y = self.lin(e)
        z = self.norm(self.proj(torch.tanh(y)))
        logits = self.dec(z)
        for name, t in (("e", e), ("y", y), ("z", z), ("logits", logits)):
            if t.requires_grad:
                t.retain_grad()
            self.saved[name] = t
        return logits


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V - 2, (B, T), generator=g)  # the last two tokens never occur
    targets = torch.randint(0, V, (B, T), generator=g)
    return ids, targets


def _loss(model, ids, targets):
    return nn.functional.cross_entropy(model(ids).reshape(-1, V), targets.reshape(-1))


def _one_step(model, block_size=1000, **kw):
    """One THOR step with lr 1, no momentum / decay / clipping; returns (direction per parameter
    name, the gradients, the optimizer). nbzoo's variant unless ``kw`` says otherwise."""
    kw = {**NBZOO, **kw}
    opt = THOR(
        model,
        lr=1.0,
        damping=DAMPING,
        momentum=0.0,
        weight_decay=0.0,
        frequency=1,
        stats_every=1,
        clip_norm=None,
        block_size=block_size,
        **kw,
    )
    ids, targets = _batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _loss(model, ids, targets).backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    after = dict(model.named_parameters())
    return {n: before[n] - after[n].detach() for n in before}, grads, opt


def _with_ones(x):
    x = x.reshape(-1, x.shape[-1])
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _second_moment(rows, scale):
    rows = rows.reshape(-1, rows.shape[-1])
    return scale * rows.t() @ rows / rows.shape[0]


def _solve(fisher, grad):
    return torch.linalg.solve(fisher, grad.reshape(-1)).reshape(grad.shape)


def _eye(n):
    return torch.eye(n, dtype=torch.float64)


def _blockdiag_mask(n, b):
    idx = torch.arange(n) // b
    return (idx[:, None] == idx[None, :]).double()


def test_linear_step_is_the_dense_natural_gradient():
    torch.manual_seed(0)
    model = TinyLM(tied=False).double()
    d, grads, _ = _one_step(model)
    r = math.sqrt(DAMPING)
    a = _second_moment(_with_ones(model.saved["e"].detach()), 1.0)
    g = _second_moment(model.saved["y"].grad, B**2)
    fisher = torch.kron(g + r * _eye(4), a + r * _eye(H + 1))
    grad = torch.cat([grads["lin.weight"], grads["lin.bias"][:, None]], dim=1)
    expected = _solve(fisher, grad)
    got = torch.cat([d["lin.weight"], d["lin.bias"][:, None]], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)
    assert not torch.allclose(got, grad)  # preconditioning changed the gradient


def test_embedding_step_uses_a_diagonal_a_of_token_counts():
    torch.manual_seed(1)
    model = TinyLM(tied=False).double()
    d, grads, opt = _one_step(model)
    ids, _ = _batch()
    counts = torch.bincount(ids.reshape(-1), minlength=V).double() / B
    emb_use = next(u for grp in opt.groups for u in grp.uses if u.name == "emb")
    assert emb_use.row.diagonal
    torch.testing.assert_close(emb_use.row.value, counts)
    r = math.sqrt(DAMPING)
    g = _second_moment(model.saved["e"].grad, B**2)
    fisher = torch.kron(torch.diag(counts) + r * _eye(V), g + r * _eye(H))
    expected = _solve(fisher, grads["emb.weight"])
    torch.testing.assert_close(d["emb.weight"], expected, rtol=1e-5, atol=1e-10)
    assert torch.all(d["emb.weight"][V - 2 :] == 0)  # tokens absent from the batch do not move


def test_tied_decoder_step_inverts_the_sum_of_both_kronecker_products():
    torch.manual_seed(2)
    model = TinyLM(tied=True).double()
    d, grads, opt = _one_step(model)
    shared = [grp for grp in opt.groups if len(grp.uses) == 2]
    assert len(shared) == 1 and shared[0].bias is model.dec.bias
    ids, _ = _batch()
    r = math.sqrt(DAMPING)
    counts = torch.bincount(ids.reshape(-1), minlength=V).double() / B
    g_emb = torch.zeros(H + 1, H + 1, dtype=torch.float64)  # the bias column: untouched by emb
    g_emb[:H, :H] = _second_moment(model.saved["e"].grad, B**2)
    a_dec = _second_moment(_with_ones(model.saved["z"].detach()), 1.0)
    g_dec = _second_moment(model.saved["logits"].grad, B**2)
    fisher = torch.kron(torch.diag(counts) + r * _eye(V), g_emb + r * _eye(H + 1)) + torch.kron(
        g_dec + r * _eye(V), a_dec + r * _eye(H + 1)
    )
    grad = torch.cat([grads["emb.weight"], grads["dec.bias"][:, None]], dim=1)
    expected = _solve(fisher, grad)
    got = torch.cat([d["emb.weight"], d["dec.bias"][:, None]], dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-10)


def test_mindspore_variant_leaves_biases_first_order():
    """MindSpore's DenseThor gathers A over the inputs alone (no constant 1) and adds the bias
    after the THOR matmul: the bias takes the plain gradient."""
    torch.manual_seed(0)
    model = TinyLM(tied=False).double()
    d, grads, opt = _one_step(model, **MINDSPORE)
    r = math.sqrt(DAMPING)
    a = _second_moment(model.saved["e"].detach(), 1.0)
    g = _second_moment(model.saved["y"].grad, B**2)
    expected = _solve(torch.kron(g + r * _eye(4), a + r * _eye(H)), grads["lin.weight"])
    torch.testing.assert_close(d["lin.weight"], expected, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(d["lin.bias"], grads["lin.bias"])
    table = {row["parameter"]: row["update"] for row in opt.layer_table()}
    assert table["lin.bias"].startswith("first-order")


def test_mindspore_variant_preconditions_the_tied_weight_with_the_embedding_factors_alone():
    """BERT's MLM decoder is a plain matmul with the embedding table in MindSpore's bert_thor: the
    summed gradient of the shared weight goes through the embedding's A and G, the decoder
    gathers nothing and its bias is first-order."""
    torch.manual_seed(2)
    model = TinyLM(tied=True).double()
    d, grads, opt = _one_step(model, **MINDSPORE)
    assert all(len(grp.uses) == 1 for grp in opt.groups)
    assert not any(u.name == "dec" for grp in opt.groups for u in grp.uses)
    ids, _ = _batch()
    r = math.sqrt(DAMPING)
    counts = torch.bincount(ids.reshape(-1), minlength=V).double() / B
    g_emb = _second_moment(model.saved["e"].grad, B**2)
    fisher = torch.kron(torch.diag(counts) + r * _eye(V), g_emb + r * _eye(H))
    expected = _solve(fisher, grads["emb.weight"])  # both layers' gradient, summed by autograd
    torch.testing.assert_close(d["emb.weight"], expected, rtol=1e-5, atol=1e-10)
    torch.testing.assert_close(d["dec.bias"], grads["dec.bias"])
    table = {row["parameter"]: row["update"] for row in opt.layer_table()}
    assert "the embedding's factors alone" in table["emb.weight"]


def test_mindspore_variant_takes_each_refresh_steps_own_statistics():
    """A and G are gathered at refresh steps only (0, f, 2f, ...) and replace the previous ones:
    no running average."""
    torch.manual_seed(4)
    model = TinyLM(tied=False).double()
    opt = THOR(model, lr=0.05, damping=DAMPING, frequency=3)
    lin = next(g for g in opt.groups if g.uses[0].name == "lin").uses[0]
    values = []
    for k in range(7):
        ids, targets = _batch(k)
        opt.zero_grad()
        _loss(model, ids, targets).backward()
        assert (lin.col.sum is not None) == (k % 3 == 0), k
        opt.step()
        values.append(lin.col.value.clone())
        if k % 3 == 0:
            own = _second_moment(model.saved["e"].detach(), 1.0)
            torch.testing.assert_close(lin.col.value[0], own)
    assert torch.equal(values[1], values[0]) and torch.equal(values[5], values[3])
    assert [r["step"] for r in opt.refresh_log] == [0, 3, 6]


@pytest.mark.parametrize("variant", ["mindspore", "nbzoo"])
def test_the_statistics_of_a_step_gather_over_all_its_micro_batches(variant):
    """grad_accum: two half-batches, each loss weighted 1/2 (as nbzoo.train.fit weighs equal
    micro-batches), then one step(), give the factors and the update of the whole batch; the
    step count (refreshes, schedules) counts step() calls."""
    ids, targets = _batch(3)
    runs = []
    for halves in (1, 2):
        torch.manual_seed(9)
        model = TinyLM(tied=True).double()
        opt = THOR(model, lr=0.1, damping=DAMPING, frequency=2, stats_every=1, **VARIANTS[variant])
        for part in range(halves):
            rows = slice(part * B // halves, (part + 1) * B // halves)
            (_loss(model, ids[rows], targets[rows]) / halves).backward()
        opt.step()
        runs.append((model, opt))
    (whole, one), (accumulated, two) = runs
    assert one.steps == two.steps == 1 and one.refresh_log == two.refresh_log
    for f, h in zip(_factors(one), _factors(two), strict=True):
        torch.testing.assert_close(f.value, h.value, rtol=1e-10, atol=1e-12)
    for p, q in zip(whole.parameters(), accumulated.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)
    assert (one._batch, two._batch) == (B, B // 2)  # LayerNorm's rule: the per-device batch


def test_layers_of_one_shape_are_preconditioned_in_one_batch_with_the_same_arithmetic(monkeypatch):
    torch.manual_seed(0)
    layers = [nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6, bias=False)]
    model = nn.Sequential(*layers, nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3))
    # blocks of 4: a 6 × 7 gradient (bias folded) is cut into padded blocks on both sides
    opt = THOR(model, lr=0.1, damping=DAMPING, frequency=1, stats_every=1, block_size=4, **NBZOO)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    # the three 6 × 6 layers with a bias share a shape; the one without and the 3 × 6 head do not
    (groups, rows, cols), *others = opt._stacks()
    assert not others and [opt._names[g.weight] for g in groups] == [
        "0.weight",
        "2.weight",
        "6.weight",
    ]
    assert rows.shape == (3, 2, 4, 4) and cols.shape == (3, 2, 4, 4)
    assert groups[1].inverse["row"].data_ptr() == rows[1].data_ptr()  # a view, not a copy
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    batched = dict(chain.from_iterable(opt._preconditioned(DAMPING)))
    one_by_one = {}
    for g in opt.groups:
        one_by_one.update(g.split(opt._precondition(g)))
    assert batched.keys() == one_by_one.keys() and len(batched) == 9  # 5 weights, 4 biases
    for p, d in one_by_one.items():
        assert torch.equal(batched[p], d), opt._names[p]
    # at most STACK_GROUPS layers per product: two stacked, the third one on its own
    monkeypatch.setattr(thor_module, "STACK_GROUPS", 2)
    opt._stacked = None
    assert [len(groups) for groups, _, _ in opt._stacks()] == [2]
    chunked = dict(chain.from_iterable(opt._preconditioned(DAMPING)))
    assert all(torch.equal(chunked[p], d) for p, d in one_by_one.items())


def _factors(opt):
    return [f for g in opt.groups for u in g.uses for f in (u.row, u.col)]


def test_between_steps_thor_holds_the_momentum_the_running_factors_and_one_inverse_each():
    """Nothing twice: a gathering step's sums are let go once folded into the running averages,
    the inverses are views into their stacks, the state dict refers to the state."""
    torch.manual_seed(0)
    layers = [nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)]
    model = nn.Sequential(*layers)
    opt = THOR(model, lr=0.1, damping=DAMPING, frequency=2, stats_every=2, block_size=4, **NBZOO)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    for step in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        gathered = [f.sum is not None for f in _factors(opt)]
        assert all(gathered) if step % 2 == 0 else not any(gathered), step
        opt.step()
        assert all(f.sum is None for f in _factors(opt))
    held: dict[int, int] = {}
    for t in [v for state in opt.state.values() for v in state.values()]:
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for t in [f.value for f in _factors(opt)] + [v for g in opt.groups for v in g.inverse.values()]:
        held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    momentum = sum(p.numel() * p.element_size() for p in model.parameters())
    values = sum(f.value.nbytes for f in _factors(opt))  # an inverse has its factor's blocks
    assert sum(held.values()) == momentum + 2 * values
    saved = opt.state_dict()["thor"]["groups"][0]
    assert saved["factors"][0]["row"] is opt.groups[0].uses[0].row.value
    assert saved["inverse"]["col"] is opt.groups[0].inverse["col"]


def test_a_step_applies_each_batch_of_directions_before_it_computes_the_next(monkeypatch):
    """At most one batch of preconditioned directions exists at a time, never a direction for
    every parameter at once (for BERT-Large a second copy of the gradients, 1.3 GB)."""
    import weakref

    torch.manual_seed(0)
    layers = [m for _ in range(4) for m in (nn.Linear(6, 6), nn.Tanh())]
    model = nn.Sequential(*layers, nn.Linear(6, 3))
    opt = THOR(model, lr=0.1, damping=DAMPING, frequency=1, stats_every=1, block_size=4, **NBZOO)
    monkeypatch.setattr(thor_module, "STACK_GROUPS", 2)  # the four 6 × 6 layers: two batches
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    made, batches = [], []

    def base(t):
        return weakref.ref(t if t._base is None else t._base)

    def checked(compute):
        def wrapper(*args):
            assert all(r() is None for r in made), "an applied batch of directions is still held"
            out = compute(*args)
            directions = [d for _, d in out] if isinstance(out, list) else [out]
            made.extend(base(d) for d in directions)
            return out

        return wrapper

    def recording_update(params, dirs, lr):
        batches.append(len(params))
        update(params, dirs, lr)

    update = opt._update
    monkeypatch.setattr(opt, "_update", recording_update)
    monkeypatch.setattr(opt, "_precondition_stack", checked(opt._precondition_stack))
    monkeypatch.setattr(opt, "_precondition", checked(opt._precondition))
    for _ in range(2):  # the first step inverts, the second preconditions with the stacks
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        batches.clear()
        opt.step()
    assert batches == [4, 4, 2, 0]  # two stacks of 2 weights + biases, the head, no first-order


def test_block_split_keeps_only_the_diagonal_blocks():
    torch.manual_seed(3)
    model = TinyLM(tied=False, hidden=7).double()  # lin: 7 × (5+1); proj: 5 × (7+1)
    d, grads, opt = _one_step(model, block_size=4)
    proj = next(grp for grp in opt.groups if grp.uses[0].name == "proj")
    assert (proj.uses[0].row.nb, proj.uses[0].col.nb) == (2, 2)  # 5 → 4+1, 8 → 4+4
    r = math.sqrt(DAMPING)
    a = _second_moment(_with_ones(torch.tanh(model.saved["y"]).detach()), 1.0)
    g = _second_moment(model.saved["z"].grad, B**2)
    a_blocks, g_blocks = a * _blockdiag_mask(8, 4), g * _blockdiag_mask(H, 4)
    fisher = torch.kron(g_blocks + r * _eye(H), a_blocks + r * _eye(8))
    grad = torch.cat([grads["proj.weight"], grads["proj.bias"][:, None]], dim=1)
    got = torch.cat([d["proj.weight"], d["proj.bias"][:, None]], dim=1)
    torch.testing.assert_close(got, _solve(fisher, grad), rtol=1e-5, atol=1e-10)
    whole = _solve(torch.kron(g + r * _eye(H), a + r * _eye(8)), grad)
    assert (got - whole).abs().max() > 1e-3  # the split is a real approximation


def _run(model, opt, steps, seed=0):
    snapshots = []
    for k in range(steps):
        ids, targets = _batch(seed + k)
        opt.zero_grad()
        _loss(model, ids, targets).backward()
        opt.step()
        grp = next(g for g in opt.groups if g.uses[0].name == "lin")
        snapshots.append({k: v.clone() for k, v in grp.inverse.items()})
    return snapshots


def test_inverses_refresh_every_frequency_steps_and_stats_every_stats_every():
    torch.manual_seed(4)
    model = TinyLM(tied=False).double()
    opt = THOR(
        model, lr=0.05, damping=DAMPING, frequency=4, stats_every=2, trace_threshold=0.0, **NBZOO
    )
    snaps = _run(model, opt, 9)
    changed = [k for k in range(1, 9) if not torch.equal(snaps[k]["col"], snaps[k - 1]["col"])]
    assert changed == [4, 8]
    assert [r["step"] for r in opt.refresh_log] == [0, 4, 8]
    with pytest.raises(ValueError, match="divide frequency"):
        THOR(model, frequency=10, stats_every=3, statistics="running")


def test_trace_rule_skips_layers_whose_fisher_trace_did_not_move():
    torch.manual_seed(5)
    model = TinyLM(tied=False).double()
    opt = THOR(model, lr=0.05, damping=DAMPING, frequency=2, stats_every=1, trace_threshold=1e9)
    snaps = _run(model, opt, 5)
    assert all(torch.equal(s["col"], snaps[0]["col"]) for s in snaps)
    n = len(opt.groups)  # emb, lin, proj, dec
    assert n == 4
    assert [r["refreshed"] for r in opt.refresh_log] == [n, 0, 0]
    assert [r["skipped"] for r in opt.refresh_log] == [0, n, n]


def test_a_failed_inversion_keeps_the_previous_inverse_and_the_run_goes_on():
    torch.manual_seed(5)
    model = TinyLM(tied=False).double()
    # running statistics: a broken factor stays until the next gathering (MindSpore's variant
    # replaces it at every refresh)
    opt = THOR(model, lr=0.05, damping=DAMPING, frequency=2, stats_every=1, **NBZOO)
    snaps = _run(model, opt, 2)
    lin = next(g for g in opt.groups if g.uses[0].name == "lin")
    lin.uses[0].col.value.fill_(float("inf"))  # what a diverging run leaves behind
    with pytest.warns(RuntimeWarning, match="inverting lin failed"):
        more = _run(model, opt, 1)  # step 2 refreshes
    assert opt.refresh_log[-1] == {"step": 2, "refreshed": 3, "skipped": 0, "failed": 1}
    assert torch.equal(more[0]["col"], snaps[-1]["col"])  # lin keeps its step-0 inverse
    lin.uses[0].col.value.copy_(-torch.eye(lin.uses[0].col.b))  # finite, not positive definite
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lin has warned already: now it is only counted
        _run(model, opt, 2)
    assert opt.refresh_log[-1]["failed"] == 1
    proj = next(g for g in opt.groups if g.uses[0].name == "proj")
    proj.uses[0].row.value.copy_(-torch.eye(proj.uses[0].row.b))
    with pytest.warns(RuntimeWarning, match="inverting proj failed.*not positive-definite"):
        _run(model, opt, 2)
    assert opt.refresh_log[-1]["failed"] == 2


def test_first_order_counterpart_is_momentum_sgd_with_the_same_schedule():
    torch.manual_seed(6)
    a, b = TinyLM(tied=False).double(), TinyLM(tied=False).double()
    b.load_state_dict(a.state_dict())
    sched = PolySchedule(0.1, 1e-3, 2.0, 10)
    thor = THOR(a, lr=sched, precondition=False, weight_decay=0.0, clip_norm=None)
    sgd = torch.optim.SGD(b.parameters(), lr=1.0, momentum=0.9)
    lam = torch.optim.lr_scheduler.LambdaLR(sgd, sched)
    for k in range(6):
        ids, targets = _batch(k)
        for m, opt in ((a, thor), (b, sgd)):
            opt.zero_grad()
            _loss(m, ids, targets).backward()
            opt.step()
        lam.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)
    assert all("first-order" in row["update"] for row in thor.layer_table())


def test_layernorm_rules_and_layer_table():
    torch.manual_seed(8)
    model = TinyLM(tied=True, layernorm=True).double()
    d, grads, opt = _one_step(model)  # layernorm="diagonal" (MindSpore's rule)
    g = grads["norm.weight"]
    torch.testing.assert_close(d["norm.weight"], g / (g.square() / B + math.sqrt(DAMPING)))
    table = {row["parameter"]: row["update"] for row in opt.layer_table()}
    assert table["norm.weight"].startswith("LayerNorm: diagonal")
    assert "shared weight" in table["emb.weight"] and "folded" in table["dec.bias"]
    torch.manual_seed(8)
    model = TinyLM(tied=True, layernorm=True).double()
    d, grads, opt = _one_step(model, layernorm="first_order", first_order=("emb",))
    torch.testing.assert_close(d["norm.weight"], grads["norm.weight"])
    table = {row["parameter"]: row["update"] for row in opt.layer_table()}
    assert table["norm.weight"].startswith("first-order")
    assert table["emb.weight"].startswith("THOR: linear dec")  # the decoder alone: emb left out


def test_update_clipping():
    torch.manual_seed(7)
    model = TinyLM(tied=True, layernorm=True)
    opt = THOR(model, lr=1.0, damping=DAMPING, momentum=0.0, clip_norm=0.01, weight_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    ids, targets = _batch()
    _loss(model, ids, targets).backward()
    opt.step()
    for p0, p in zip(before, model.parameters(), strict=True):
        assert torch.linalg.vector_norm(p0 - p) <= 0.01 * (1 + 1e-5)


# --- training-loop level: resume and DDP ---------------------------------------------------------


class _Seq(torch.utils.data.Dataset):
    def __init__(self, n=48):
        g = torch.Generator().manual_seed(11)
        self.ids = torch.randint(0, V, (n, T), generator=g)
        self.targets = (self.ids * 3 + 1) % V

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"ids": self.ids[i], "targets": self.targets[i]}


def _fit_loss(model, batch):
    return _loss(model, batch["ids"], batch["targets"])


def _make(seed=0):
    torch.manual_seed(seed)
    model = TinyLM(tied=True, layernorm=True)
    opt = THOR(
        model,
        lr=PolySchedule(0.05, 1e-4, 2.0, 40),
        damping=PolySchedule(0.05, 1e-4, 4.0, 40),
        frequency=4,
        stats_every=2,
    )
    return model, opt


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    rt = device.setup("cpu", "fp32", seed=0)
    cfg = dict(epochs=2, batch_size=8, max_steps=11, log_every=100, run_id="thor-resume")
    model, opt = _make()
    fit(model, _Seq(), opt, rt, TrainConfig(**cfg), loss_fn=_fit_loss)

    class Killed(Exception):
        pass

    def kill_at_5(step, loss, state):
        if step == 5:
            raise Killed

    ckpt = tmp_path / "ckpt"
    model2, opt2 = _make()
    with pytest.raises(Killed):
        fit(
            model2,
            _Seq(),
            opt2,
            rt,
            TrainConfig(**cfg, checkpoint_dir=ckpt, checkpoint_every=4),
            loss_fn=_fit_loss,
            callbacks=[kill_at_5],
        )
    model3, opt3 = _make(seed=123)  # different init: everything must come from the checkpoint
    result = fit(
        model3,
        _Seq(),
        opt3,
        rt,
        TrainConfig(**cfg, checkpoint_dir=ckpt, checkpoint_every=4),
        loss_fn=_fit_loss,
    )
    assert result.resumed_from_step == 4  # mid-epoch, between two refreshes
    for (name, p), q in zip(model.named_parameters(), model3.parameters(), strict=True):
        assert torch.equal(p, q), name
    for g, h in zip(opt.groups, opt3.groups, strict=True):
        for k in g.inverse:
            assert torch.equal(g.inverse[k], h.inverse[k])
    assert opt3.steps == opt.steps == 11


DDP_JOB = """
import hashlib, json, sys
import torch
sys.path.insert(0, {root!r})
from tests.test_thor import _make, _Seq, _fit_loss
from nbzoo import device
from nbzoo.train import TrainConfig, fit
rt = device.setup("cpu", "fp32", seed=0)
model, opt = _make()
fit(model, _Seq(64), opt, rt, TrainConfig(epochs=3, batch_size=4, max_steps=9), loss_fn=_fit_loss)
def digest(tensors):
    return hashlib.sha256(b"".join(t.detach().contiguous().numpy().tobytes() for t in tensors)).hexdigest()
factors = [f.value for g in opt.groups for u in g.uses for f in (u.row, u.col)]
inverses = [v for g in opt.groups for v in g.inverse.values()]
with open(sys.argv[1] + f"/rank{{rt.rank}}.json", "w") as f:
    json.dump({{"weights": digest(model.parameters()), "factors": digest(factors),
               "inverses": digest(inverses), "refreshes": opt.refresh_log}}, f)
"""


@pytest.mark.slow
def test_two_gloo_ranks_end_with_identical_factors_and_weights(tmp_path):
    root = str(device.__file__).rsplit("/nbzoo/", 1)[0]
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(DDP_JOB.format(root=root)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        str(script),
        str(tmp_path),
    ]
    done = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=root,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0 == r1
    assert [r["step"] for r in r0["refreshes"]] == [0, 4, 8]  # the last step refreshed
