"""Reformer inference without the custom reversible autograd function.

Why: upstream ``ReformerEncoder.forward`` always runs its layers through
``_ReversibleFunction.apply``, a ``torch.autograd.Function`` whose backward recomputes each
layer's inputs from its outputs (reversible residuals: activation memory independent of depth).
Inference needs no backward, but exporters and compilers still meet the custom Function: ONNX
export records it as an opaque ``PythonOp`` or has to inline it, and its Python-side lists of
hidden states and buckets are invisible to graph capture.

How: the module-level name ``_ReversibleFunction``, which the encoder looks up at call time, is
replaced by a stand-in with the same ``apply``. When a backward pass is possible (gradients
enabled and the layers in training mode — upstream's backward refuses anything else) it hands
over to the original Function. Otherwise it runs the Function's own ``forward`` as a plain
Python call, with a context object that only records what ``forward`` stores on it: the same
code, the same numbers, no autograd node.
"""

from __future__ import annotations

import torch
from transformers.models.reformer import modeling_reformer

from nbzoo.patching import Patch

_UPSTREAM = modeling_reformer._ReversibleFunction


class _PlainContext:
    """Takes what ``_ReversibleFunction.forward`` saves for a backward pass that never comes."""

    def save_for_backward(self, *tensors: torch.Tensor) -> None:
        pass


class ReversibleOrPlain:
    """Stand-in for ``_ReversibleFunction``: reversible training, plain inference."""

    @staticmethod
    def apply(hidden_states, layers, *args):
        training = torch.is_grad_enabled() and layers.training
        exporting = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()
        if training and not exporting:
            return _UPSTREAM.apply(hidden_states, layers, *args)
        return _UPSTREAM.forward(_PlainContext(), hidden_states, layers, *args)


PATCH = Patch(
    name="reformer_inference_path",
    target="transformers.models.reformer.modeling_reformer:_ReversibleFunction",
    replacement=ReversibleOrPlain,
    requires={"transformers": ">=5.24,<5.25"},
    reason=(
        "inference (no grad, or eval mode) runs the reversible layers as plain calls instead of "
        "through the custom autograd Function, so the model exports to ONNX"
    ),
)
