"""apex's O2 in plain torch: an fp16 model trained over fp32 master weights.

What apex's ``opt_level="O2"`` does (the seeds' NPU rows train ALBERT and RoBERTa at O2), and what
:class:`MasterWeights` does the same way:

* the model is cast to fp16, except batch norms (apex's ``keep_batchnorm_fp32``), buffers too;
* floating-point inputs of the model's forward are cast to fp16, its floating-point outputs to
  fp32 (so a loss computed outside the model is fp32);
* the optimizer steps on fp32 *master* copies of the parameters: fp16 gradients are copied into
  the masters' ``.grad``, unscaled and checked for overflow there (the GradScaler), and after each
  step the fp16 model is refreshed from the masters, so updates below fp16's resolution still
  accumulate;
* the loss is scaled dynamically (the Runtime's GradScaler).

torch has no such mode (autocast keeps fp32 weights: that is O1), and apex itself is a CUDA build,
deprecated upstream and not installable here; hence this module. Two choices differ from apex:
the masters are the parameters' own fp32 values (apex copies them back from the fp16 cast, losing
their low bits once), and evaluation, checkpoints and the model ``fit`` hands back use the fp32
masters, so that an evaluation-only run of a checkpoint reproduces a run's figures exactly.

``compute_dtype=torch.float32`` keeps everything above but the fp16 arithmetic: the model's
parameters are still the fp16 copies (its gradients fp16, scaled, overflowing as O2's do), and each
forward computes with fp32 copies of them, made at the forward's start. It is what a CPU without
fast fp16 matrix products runs for a preset's O2 (nbzoo.device.choose_precision): O2's code at
fp32's speed. The fp16 copies hold O2's rounding of the weights; the activations are fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

HALF = torch.float16


def cast_floats(obj: Any, dtype: torch.dtype) -> Any:
    """``obj`` with every floating-point tensor in it (nested lists, tuples, dicts, HF
    ModelOutputs) cast to ``dtype``; other values as they are. Mappings are updated in place."""
    if torch.is_tensor(obj):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, Mapping):
        if hasattr(obj, "__setitem__"):  # dict, and transformers' ModelOutput (an OrderedDict)
            for key in list(obj.keys()):
                obj[key] = cast_floats(obj[key], dtype)
            return obj
        return {k: cast_floats(v, dtype) for k, v in obj.items()}
    if isinstance(obj, list):
        return [cast_floats(v, dtype) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(cast_floats(v, dtype) for v in obj)
    return obj


class MasterWeights:
    """Switch ``model`` between its fp32 parameters (the masters, which ``optimizer`` holds) and
    fp16 copies that train; see the module's docstring.

    Build it while the model's parameters are the optimizer's (fp32), then :meth:`use_fp16`.
    A parameter tied to several modules gets one fp16 copy, so ties survive. ``compute_dtype``
    float32: the fp16 model computes with fp32 copies of its weights (see the module's
    docstring)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        compute_dtype: torch.dtype | None = None,
    ):
        if compute_dtype not in (None, HALF, torch.float32):
            raise ValueError(f"compute_dtype must be float16 or float32, got {compute_dtype}")
        self.model = model
        self.upcast = compute_dtype == torch.float32
        optimized = {p for group in optimizer.param_groups for p in group["params"]}
        wrong = sorted({str(p.dtype) for p in optimized if p.dtype != torch.float32})
        if wrong:
            raise ValueError(
                f"precision O2 keeps fp32 master weights: the optimizer's parameters must be "
                f"float32, got {', '.join(wrong)}"
            )
        self._slots: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
        self._buffers: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
        self._half: dict[torch.nn.Parameter, torch.nn.Parameter] = {}
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                continue  # apex O2 keeps batch norms in fp32
            for name, p in module._parameters.items():
                if p is None or not p.is_floating_point():
                    continue
                if p not in self._half:
                    self._half[p] = torch.nn.Parameter(
                        p.detach().to(HALF), requires_grad=p.requires_grad
                    )
                self._slots.append((module, name, p))
            for name, b in module._buffers.items():
                if b is not None and b.is_floating_point():
                    self._buffers.append((module, name, b))
        self.pairs = [(m, h) for m, h in self._half.items() if m in optimized]
        self._hooks: list[Any] = []
        self.fp16 = False

    @property
    def masters(self) -> list[torch.nn.Parameter]:
        return [m for m, _ in self.pairs]

    def use_fp16(self) -> None:
        """Put the fp16 copies (refreshed from the masters) into the model and cast its inputs
        and outputs."""
        if self.fp16:
            return
        self.masters_to_model()
        for module, name, p in self._slots:
            module._parameters[name] = self._half[p]
        if self.upcast:
            # buffers, inputs and outputs stay fp32; the weights are upcast at each forward
            self._hooks = [self.model.register_forward_pre_hook(self._upcast_weights)]
        else:
            for module, name, b in self._buffers:
                module._buffers[name] = b.to(HALF)
            self._hooks = [
                self.model.register_forward_pre_hook(_cast_inputs, with_kwargs=True),
                self.model.register_forward_hook(_cast_outputs),
            ]
        self.fp16 = True

    def _upcast_weights(self, module, args) -> None:
        """Put fp32 copies of the fp16 parameters where the model reads its weights, in the
        autograd graph (their gradients reach the fp16 parameters, in fp16). They stay after the
        forward, for a backward that re-runs layers (reversible ones, activation checkpointing) to
        read the same values, until :meth:`grads_to_masters` puts the fp16 parameters back.
        torch.func.functional_call swaps tensors in the same way but puts the parameters back
        when the forward returns, before such a backward."""
        upcast = {half: half.float() for half in self._half.values()}
        for owner, name, p in self._slots:
            owner._parameters[name] = upcast[self._half[p]]

    def use_masters(self) -> None:
        """Put the fp32 masters (and the original buffers) back into the model."""
        if not self.fp16:
            return
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        for module, name, p in self._slots:
            module._parameters[name] = p
        for module, name, b in self._buffers:
            module._buffers[name] = b
        self.fp16 = False

    @contextlib.contextmanager
    def fp32(self) -> Iterator[None]:
        """The model with its fp32 masters for the duration (evaluation, checkpoints)."""
        was_fp16 = self.fp16
        self.use_masters()
        try:
            yield
        finally:
            if was_fp16:
                self.use_fp16()

    @torch.no_grad()
    def grads_to_masters(self) -> None:
        """Move the fp16 gradients into the masters' ``.grad`` as fp32 (still scaled). The
        backward is over: with ``compute_dtype`` float32 the model holds its fp16 parameters
        again until the next forward."""
        if self.upcast and self.fp16:
            for module, name, p in self._slots:
                module._parameters[name] = self._half[p]
        for master, half in self.pairs:
            if half.grad is None:
                master.grad = None
            else:
                master.grad = half.grad.to(master.dtype)
                half.grad = None

    @torch.no_grad()
    def masters_to_model(self) -> None:
        """Copy the masters into the fp16 model (after an optimizer step)."""
        for master, half in self.pairs:
            half.copy_(master)


def _cast_inputs(module, args, kwargs):
    return cast_floats(args, HALF), cast_floats(kwargs, HALF)


def _cast_outputs(module, args, output):
    return cast_floats(output, torch.float32)
