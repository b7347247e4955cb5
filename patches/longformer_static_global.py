"""Longformer's encoder loop without the data-dependent ``.item()`` on global attention.

Why: upstream ``LongformerEncoder.forward`` asks ``is_index_global_attn.flatten().any().item()``
to decide, in Python, whether any token has global attention. That host sync is a graph break
under ``torch.compile`` and is frozen into a constant by ONNX tracing. With the
``longformer_sliding_window`` patch the attention layers no longer need the flag (global
attention runs through fixed slots), so the encoder passes it on as a tensor and never reads it.

Upstream attention still works under this patch in eager mode (it reads the tensor flag with
``bool()``), so the two patches can be applied and undone independently. Apply both for ONNX
export and ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

from transformers.models.longformer.modeling_longformer import LongformerBaseModelOutput

from nbzoo.patching import Patch


def forward(
    self,
    hidden_states,
    attention_mask=None,
    padding_len=0,
    output_attentions=False,
    output_hidden_states=False,
    return_dict=True,
):
    """Upstream's loop, with the global-attention flag kept a tensor."""
    is_index_masked = attention_mask < 0
    is_index_global_attn = attention_mask > 0
    is_global_attn = is_index_global_attn.flatten().any()  # a tensor: no host sync

    all_hidden_states = () if output_hidden_states else None
    all_attentions = () if output_attentions else None
    all_global_attentions = () if output_attentions else None

    for layer_module in self.layer:
        if output_hidden_states:
            all_hidden_states = all_hidden_states + (hidden_states,)
        layer_outputs = layer_module(
            hidden_states,
            attention_mask=attention_mask,
            is_index_masked=is_index_masked,
            is_index_global_attn=is_index_global_attn,
            is_global_attn=is_global_attn,
            output_attentions=output_attentions,
        )
        hidden_states = layer_outputs[0]
        if output_attentions:
            all_attentions = all_attentions + (layer_outputs[1].transpose(1, 2),)
            if len(layer_outputs) > 2:  # global attention probabilities were returned
                all_global_attentions = all_global_attentions + (layer_outputs[2].transpose(2, 3),)

    if output_hidden_states:
        all_hidden_states = all_hidden_states + (hidden_states,)

    # unpad: the caller expects the length of input_ids
    hidden_states = hidden_states[:, : hidden_states.shape[1] - padding_len]
    if output_hidden_states:
        all_hidden_states = tuple(
            state[:, : state.shape[1] - padding_len] for state in all_hidden_states
        )
    if output_attentions:
        all_attentions = tuple(
            state[:, :, : state.shape[2] - padding_len, :] for state in all_attentions
        )
        if not all_global_attentions:
            all_global_attentions = None

    if not return_dict:
        return tuple(
            v
            for v in [hidden_states, all_hidden_states, all_attentions, all_global_attentions]
            if v is not None
        )
    return LongformerBaseModelOutput(
        last_hidden_state=hidden_states,
        hidden_states=all_hidden_states,
        attentions=all_attentions,
        global_attentions=all_global_attentions,
    )


PATCH = Patch(
    name="longformer_static_global",
    target="transformers.models.longformer.modeling_longformer:LongformerEncoder.forward",
    replacement=forward,
    requires={"transformers": ">=5.24,<5.25"},
    reason=(
        "no .item() host sync on global attention in the encoder loop: torch.compile without "
        "graph breaks, ONNX export without a frozen global-attention flag"
    ),
)
