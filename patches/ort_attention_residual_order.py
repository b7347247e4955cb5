"""Export blocker: ONNX Runtime's BERT attention fusion misses ALBERT's first layer.

``FusionAttention.fuse`` starts at the Add (or SkipLayerNormalization) that closes an attention
block, ``LayerNorm(residual + dense(attention))``, and looks for the attention output among that
node's inputs by taking the *first* input that is an Add. In BERT the residual comes from a
LayerNorm, so the first Add is the attention's output projection. In ALBERT the first layer's
residual is ``embedding_hidden_mapping_in`` (a Linear, exported as MatMul + Add), so the matcher
walks into the embedding projection, fails, and leaves that layer's attention unfused.

The replacement calls upstream unchanged; only when upstream fused nothing at a node whose first
two inputs are the two summands (Add, or SkipLayerNormalization's ``input`` and ``skip``, which it
adds before normalising) does it swap those two inputs and ask upstream once more, restoring the
order if that fails too. Swapping the operands of a sum changes no value, so the fused graph
computes what the unfused one does (tests/test_export_onnx.py checks both against PyTorch).
"""

from __future__ import annotations

import onnxruntime.transformers  # noqa: F401  (puts ORT's fusion modules on sys.path, as ORT does)

from nbzoo import patching

NAME = "ort_attention_residual_order"

_SUMS = ("Add", "SkipLayerNormalization")


def fuse(self, node, input_name_to_nodes, output_name_to_node):
    upstream = patching.original(NAME)
    before = len(self.nodes_to_add)
    upstream(self, node, input_name_to_nodes, output_name_to_node)
    if len(self.nodes_to_add) != before:
        return
    summed = node
    if node.op_type == "LayerNormalization":
        summed = self.model.match_parent(node, "Add", 0)
    if summed is None or summed.op_type not in _SUMS or len(summed.input) < 2:
        return
    first, second = summed.input[0], summed.input[1]
    summed.input[0], summed.input[1] = second, first
    upstream(self, node, input_name_to_nodes, output_name_to_node)
    if len(self.nodes_to_add) == before:
        summed.input[0], summed.input[1] = first, second


PATCH = patching.Patch(
    name=NAME,
    # ORT's fusion modules import each other as top-level modules (``from fusion_attention
    # import FusionAttention``), so the class to patch is the one in ``fusion_attention``.
    target="fusion_attention:FusionAttention.fuse",
    replacement=fuse,
    requires={"onnxruntime": ">=1.32,<1.33"},
    reason="ORT's attention fusion misses ALBERT's first layer (its residual is a Linear output)",
)
