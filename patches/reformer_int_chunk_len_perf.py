"""Compile-friendliness: Reformer's least common multiple of chunk lengths as a Python int.

Upstream ``_get_least_common_mult_chunk_len`` returns ``numpy.lcm(...)``, a NumPy integer;
``ReformerModel.forward`` then branches on ``seq_len % lcm != 0``, a NumPy bool that
``torch.compile`` cannot specialise on, so every step breaks the graph there. ``math.lcm`` gives the
same number as a Python int.
"""

from __future__ import annotations

import math

from nbzoo import patching

NAME = "reformer_int_chunk_len_perf"


def least_common_mult_chunk_len(config) -> int:
    attn_types = config.attn_layers
    attn_types_set = set(attn_types)
    if len(attn_types_set) == 1 and attn_types[0] == "lsh":
        return int(config.lsh_attn_chunk_length)
    if len(attn_types_set) == 1 and attn_types[0] == "local":
        return int(config.local_attn_chunk_length)
    if len(attn_types_set) == 2 and attn_types_set == {"lsh", "local"}:
        return math.lcm(int(config.lsh_attn_chunk_length), int(config.local_attn_chunk_length))
    # anything else: upstream raises its own error
    return patching.original(NAME)(config)


PATCH = patching.Patch(
    name=NAME,
    target="transformers.models.reformer.modeling_reformer:_get_least_common_mult_chunk_len",
    replacement=least_common_mult_chunk_len,
    requires={"transformers": ">=5.24,<5.25", "torch": ">=2.13,<2.14"},
    reason="compile: a Python int instead of a NumPy integer removes a graph break per step",
)
