"""nbzoo's performance path: the same training step as the notebooks, made fast.

What it changes, and why each is safe (same loss, same gradients):

- **bf16 autocast with fp32 master weights**: parameters and optimizer state stay fp32, matrix
  products run in bf16 (``rt.autocast()``); no loss scaler is needed for bf16.
- **fused AdamW** (``torch.optim.AdamW(fused=True)``) on CUDA: one kernel per step instead of
  one per tensor group.
- **no all-ones attention mask** (:func:`prepare_batch`): a padding mask without padding is
  dropped on the host before the model sees it. Under ``torch.compile`` transformers cannot
  look inside the mask and always materialises it, which keeps SDPA off its flash kernel.
- **masked-LM logits only at labelled positions** (patches ``bert_pretraining_sparse_mlm_perf``
  and ``longformer_sparse_mlm_perf``): the vocabulary projection and its cross-entropy run on
  the ~15 % of positions that carry a label, not on every token. With a static
  ``mlm_budget`` the selected count is fixed, so shapes stay static for compile / CUDA graphs.
- **Longformer sliding-window attention through fused SDPA** (``longformer_chunked_sdpa_perf``)
  instead of transformers' chunked fp32 matmuls, dropout included.
- **Reformer without the reversible-residual autograd function** (``reformer_plain_residual_perf``):
  same forward arithmetic, ordinary autograd, so ``torch.compile`` sees one graph (the stock
  path breaks the graph at every layer's RNG re-seeding) and CUDA graphs can remove the launch
  overhead that bounds Reformer's many small kernels.
- **torch.compile** with static shapes (``dynamic=False``), optionally CUDA graphs
  (``compile_mode="reduce-overhead"``).

Each change that touches model code is a runtime patch in ``patches/`` with an equivalence test
(tests/test_perf_patches.py). Notebook ``perf`` presets and ``nbzoo bench`` call the functions
below; :func:`measure_training_throughput` reports samples/s, MFU and peak memory.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from nbzoo import metrics, patching
from nbzoo.device import Runtime, accelerator_name

IGNORE_INDEX = -100
Batch = dict[str, Any]
LossFn = Callable[[torch.nn.Module, Batch], torch.Tensor]


@dataclass(frozen=True)
class PerfConfig:
    """Knobs of the perf path. The defaults are what ``nbzoo bench`` measures."""

    compile: bool = True
    compile_mode: str | None = None  # None: inductor default; "reduce-overhead": + CUDA graphs
    fused_optimizer: bool = True
    drop_full_attention_mask: bool = True
    patches: tuple[str, ...] | None = None  # None: patches_for(model)
    mlm_budget: int | None = None  # static number of labelled positions per batch (None: dynamic)
    attn_implementation: str = "sdpa"  # where the model supports it

    def with_(self, **changes: Any) -> PerfConfig:
        return replace(self, **changes)


def patches_for(model: torch.nn.Module) -> tuple[str, ...]:
    """The perf patches that apply to this model's class."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    name = type(model).__name__
    found: list[str] = []
    if name == "BertForPreTraining":
        found.append("bert_pretraining_sparse_mlm_perf")
    if name == "LongformerForMaskedLM":
        found.append("longformer_sparse_mlm_perf")
    if model_type == "longformer":
        found.append("longformer_chunked_sdpa_perf")
    if model_type == "reformer":
        found += ["reformer_plain_residual_perf", "reformer_int_chunk_len_perf"]
    return tuple(found)


def supports_sdpa(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "_supports_sdpa", False))


def set_attention(model: torch.nn.Module, implementation: str = "sdpa") -> str:
    """Switch a transformers model to ``implementation`` where it has one; return what it uses.

    Models without an attention-interface (Longformer, Reformer) keep their own attention and
    report ``"own"``."""
    if not supports_sdpa(model):
        return "own"
    model.set_attn_implementation(implementation)
    return model.config._attn_implementation


@dataclass
class PerfModel:
    """A model prepared for the perf path: ``module`` is what to call (compiled or not)."""

    model: torch.nn.Module
    module: Callable[..., Any]
    config: PerfConfig
    patches: tuple[str, ...]
    attention: str
    features: list[str] = field(default_factory=list)


def apply_patches(names: tuple[str, ...], rt: Runtime) -> list[str]:
    """Apply perf patches (process-wide, listed by ``describe()``); return the applied ones."""
    return [n for n in names if patching.apply(n, device_kind=rt.kind)]


def undo_patches(names: tuple[str, ...] | list[str]) -> None:
    for n in reversed(list(names)):
        patching.undo(n)


def enable(model: torch.nn.Module, rt: Runtime, cfg: PerfConfig | None = None) -> PerfModel:
    """Put ``model`` on the perf path: SDPA attention, the model's perf patches, the static
    masked-LM budget and ``torch.compile``. The patches stay applied until :func:`disable`.

    ``model`` must already be on ``rt.device``; call the returned ``.module`` in the training
    step (``make_step`` does)."""
    cfg = cfg or PerfConfig()
    features = [f"{rt.precision} autocast, fp32 master weights"]
    attention = set_attention(model, cfg.attn_implementation)
    if attention != "own":
        features.append(f"attention={attention}")
    names = cfg.patches if cfg.patches is not None else patches_for(model)
    applied = tuple(apply_patches(names, rt))
    features += [f"patch:{n}" for n in applied]
    is_decoder = bool(getattr(getattr(model, "config", None), "is_decoder", False))
    if is_decoder and getattr(model, "loss_type", "") is None:
        # transformers then falls back to ForCausalLM on every call, through a warning that
        # torch.compile cannot trace (a graph break per step); name the same loss up front.
        model.loss_type = "ForCausalLM"
        features.append("loss_type=ForCausalLM (upstream's fallback, named)")
    # Read by the sparse masked-LM patches; a plain attribute, so dynamo treats it as a constant.
    model._nbzoo_mlm_budget = cfg.mlm_budget
    if cfg.mlm_budget is not None and any("sparse_mlm" in n for n in applied):
        features.append(f"static mlm budget={cfg.mlm_budget}")
    if cfg.drop_full_attention_mask:
        features.append("all-ones attention masks dropped")
    if cfg.fused_optimizer and rt.kind == "cuda":
        features.append("fused AdamW")
    module: Callable[..., Any] = model
    if cfg.compile:
        module = torch.compile(model, mode=cfg.compile_mode, dynamic=False)
        features.append(f"torch.compile(mode={cfg.compile_mode or 'default'})")
    return PerfModel(model, module, cfg, applied, attention, features)


def disable(perf: PerfModel) -> None:
    """Undo the patches :func:`enable` applied."""
    undo_patches(perf.patches)


@contextlib.contextmanager
def enabled(
    model: torch.nn.Module, rt: Runtime, cfg: PerfConfig | None = None
) -> Iterator[PerfModel]:
    perf = enable(model, rt, cfg)
    try:
        yield perf
    finally:
        disable(perf)


def make_optimizer(
    model: torch.nn.Module,
    rt: Runtime,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-6,
    fused: bool = True,
) -> torch.optim.AdamW:
    """AdamW over the fp32 parameters; fused on CUDA. No weight decay on biases and LayerNorms."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = {"lr": lr, "betas": betas, "eps": eps}
    if fused and rt.kind == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def prepare_batch(batch: Mapping[str, Any], rt: Runtime, drop_full_mask: bool = True) -> Batch:
    """Move a batch to the device; drop an ``attention_mask`` that masks nothing.

    Checked on the host tensor (before the copy), so it costs no device synchronisation when
    the collator produces CPU tensors."""
    out = dict(batch)
    mask = out.get("attention_mask")
    if drop_full_mask and torch.is_tensor(mask) and bool(mask.all()):
        del out["attention_mask"]
    return rt.to_device(out)


def labelled_positions(
    hidden: torch.Tensor, labels: torch.Tensor, budget: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states and labels of the positions whose label is not -100, flattened.

    With ``budget=None`` the count is data-dependent (boolean indexing). With an int, exactly
    ``budget`` rows come back: the labelled ones first (in order), then unlabelled ones whose
    label stays -100 so that cross-entropy ignores them. A batch with more labelled positions
    than the budget fails a device-side assertion rather than silently dropping labels."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = labels.reshape(-1).to(hidden.device)
    is_labelled = flat_y != IGNORE_INDEX
    if budget is None:
        return flat_h[is_labelled], flat_y[is_labelled]
    budget = min(budget, flat_y.numel())
    torch._assert_async(is_labelled.sum() <= budget, "more labelled positions than mlm_budget")
    # A stable sort of the "unlabelled" flags puts labelled positions first, in order.
    order = torch.argsort((~is_labelled).to(torch.int8), stable=True)[:budget]
    return flat_h.index_select(0, order), flat_y.index_select(0, order)


def mlm_budget(batch_size: int, seq_len: int, fraction: float = 0.15, multiple: int = 8) -> int:
    """A static budget for ``labelled_positions``: ``round(fraction * seq_len)`` per sequence
    (the bench's masking), rounded up to a multiple of 8 for tensor-core friendly shapes."""
    per_seq = int(round(fraction * seq_len))
    total = batch_size * per_seq
    return -(-total // multiple) * multiple


def _default_loss(model: Callable[..., Any], batch: Batch) -> torch.Tensor:
    out = model(**batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def make_step(
    module: Callable[..., Any],
    optimizer: torch.optim.Optimizer,
    rt: Runtime,
    loss_fn: LossFn | None = None,
) -> Callable[[Batch], torch.Tensor]:
    """One training step (forward + backward + optimizer) that returns the detached loss
    without synchronising."""
    loss_fn = loss_fn or _default_loss

    mark_step = getattr(torch.compiler, "cudagraph_mark_step_begin", None)

    def step(batch: Batch) -> torch.Tensor:
        if mark_step is not None:
            mark_step()  # a new iteration for CUDA graph trees (a no-op without them)
        with rt.autocast():
            loss = loss_fn(module, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # a copy: under CUDA graphs the next replay overwrites the graph's output memory
        return loss.detach().clone()

    return step


def count_step_flops(
    model: torch.nn.Module, batch: Batch, rt: Runtime, loss_fn: LossFn | None = None
) -> int:
    """FLOPs of one forward + backward, counted with ``torch.utils.flop_counter`` (matrix
    products and attention; elementwise work and the optimizer count as zero). Runs eagerly,
    leaves no gradients behind."""
    from torch.utils.flop_counter import FlopCounterMode

    loss_fn = loss_fn or _default_loss
    counter = FlopCounterMode(display=False)
    # We need the total only. The per-module tracker hooks every module's inputs for the
    # backward pass and fails on Reformer's reversible layers (tensors made to require grad
    # inside a custom backward), so it is replaced by one that files everything as "Global".
    if hasattr(counter, "mod_tracker"):
        counter.mod_tracker = _GlobalOnly()
    with counter:
        with rt.autocast():
            loss = loss_fn(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


class _GlobalOnly:
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def batch_size_of(batch: Batch) -> int:
    for value in batch.values():
        if torch.is_tensor(value) and value.ndim >= 1:
            return int(value.shape[0])
    raise ValueError("batch has no tensor to take the batch size from")


def measure_training_throughput(
    model: Callable[..., Any],
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    rt: Runtime,
    steps: int = 20,
    warmup: int = 3,
    loss_fn: LossFn | None = None,
    flops_per_step: float | None = None,
) -> dict[str, Any]:
    """Train ``steps`` timed steps on one fixed batch after ``warmup`` untimed ones (the first
    of which compiles). Returns samples/s and step time (median of the timed steps, each
    synchronised: CUDA events on a GPU, a host clock otherwise), the first step's loss, peak
    device memory and, when ``flops_per_step`` is given, MFU over the device's bf16 peak
    (None where the peak is unknown, e.g. on a CPU).

    ``model`` is what the step calls: ``PerfModel.module`` for the perf path, or any module."""
    if steps < 1 or warmup < 1:
        raise ValueError(f"steps and warmup must be >= 1; got steps={steps}, warmup={warmup}")
    step = make_step(model, optimizer, rt, loss_fn)
    rt.reset_peak_memory()
    tick = time.perf_counter()
    first_loss = step(batch)
    first_loss = float(first_loss)  # synchronises
    first_step_seconds = time.perf_counter() - tick
    for _ in range(warmup - 1):
        step(batch)
    rt.synchronize()
    times: list[float] = []
    losses: list[torch.Tensor] = []
    if rt.kind == "cuda":
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            for _ in range(steps)
        ]
        for start, end in events:
            start.record()
            losses.append(step(batch))
            end.record()
        rt.synchronize()
        times = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for _ in range(steps):
            tick = time.perf_counter()
            losses.append(step(batch))
            rt.synchronize()
            times.append(time.perf_counter() - tick)
    median = statistics.median(times)
    samples = batch_size_of(batch)
    name = accelerator_name(rt)
    return {
        "samples_per_second": metrics.samples_per_second(samples, median),
        "step_seconds": median,
        "step_seconds_min": min(times),
        "step_seconds_max": max(times),
        "first_step_seconds": first_step_seconds,
        "first_loss": first_loss,
        "last_loss": float(losses[-1]),
        "finite": bool(all(torch.isfinite(x).item() for x in losses)),
        "peak_memory_bytes": rt.peak_memory_bytes(),
        "flops_per_step": flops_per_step,
        "mfu": metrics.mfu(flops_per_step, median, name) if flops_per_step else None,
        "device_name": name,
        "batch_size": samples,
        "steps": steps,
        "warmup": warmup,
    }


def run_perf_preset(
    model: torch.nn.Module,
    batch: Mapping[str, Any],
    rt: Runtime,
    cfg: PerfConfig | None = None,
    steps: int = 20,
    warmup: int = 3,
    lr: float = 1e-4,
    loss_fn: LossFn | None = None,
) -> dict[str, Any]:
    """What a notebook's ``perf`` preset calls: train ``model`` (already on ``rt.device``) on one
    fixed ``batch`` (CPU tensors) through the perf path and report its throughput.

    FLOPs are counted once on the upstream model (before the patches, as ``nbzoo bench`` does),
    so MFU credits the perf path with the work it avoids. Returns the dict of
    :func:`measure_training_throughput` plus ``features`` and ``patches``; the patches are undone
    on return. The model's weights are trained by the measured steps."""
    cfg = cfg or PerfConfig()
    on_device = prepare_batch(batch, rt, drop_full_mask=False)
    set_attention(model, cfg.attn_implementation)
    flops = count_step_flops(model, on_device, rt, loss_fn)
    handle = enable(model, rt, cfg)
    try:
        step_batch = prepare_batch(batch, rt, cfg.drop_full_attention_mask)
        optimizer = make_optimizer(model, rt, lr=lr, fused=cfg.fused_optimizer)
        result = measure_training_throughput(
            handle.module, step_batch, optimizer, rt, steps, warmup, loss_fn, flops
        )
    finally:
        disable(handle)
    return {**result, "features": handle.features, "patches": list(handle.patches)}
