"""Reformer's LSH hashing with seedable rotations that leave torch's global generator alone.

Why: upstream ``LSHSelfAttention._hash_vectors`` draws its random rotations with
``torch.randn`` and, when ``config.hash_seed`` is set, first calls ``torch.manual_seed(hash_seed)``
— reseeding the *global* generator in every forward pass, so that dropout masks, data shuffling
and masking that draw from it afterwards repeat from step to step. And the rotations are an
``aten::randn`` inside the graph, which an ONNX export turns into a RandomNormal node: the
exported model hashes differently from PyTorch on every run.

How: with a ``hash_seed`` the rotations come from a private CPU ``torch.Generator`` seeded with
it — the very numbers upstream draws after ``torch.manual_seed(hash_seed)`` on the CPU — computed
once per shape and kept on the layer, so every forward, ``torch.compile`` and ONNX export see
the same constant. Without a ``hash_seed`` nothing changes: fresh rotations from the global
generator on every call (the paper's training behaviour, reproducible through
``nbzoo.device.setup(seed=...)``). The rest of the function is upstream's.

Difference, stated: on CUDA / NPU upstream draws seeded rotations from the device's generator,
so its numbers differ from the CPU's; here they are the CPU's numbers on every device (a model
hashes the same way wherever it runs, and as its ONNX export does).
"""

from __future__ import annotations

import torch

from nbzoo.patching import Patch


def rotations(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype):
    """The random rotations of one hashing call (see the module docstring)."""
    if self.hash_seed is None:
        return torch.randn(shape, device=device, dtype=dtype)
    cache = self.__dict__.setdefault("_nbzoo_rotations", {})
    key = (tuple(shape), str(device), dtype, int(self.hash_seed))
    if key not in cache:
        # drawn outside any trace, so that an exporter records the numbers, not the drawing
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            generator = torch.Generator().manual_seed(int(self.hash_seed))
            cache[key] = torch.randn(shape, generator=generator, dtype=dtype).to(device)
        finally:
            torch._C._set_tracing_state(state)
    return cache[key]


def _hash_vectors(self, vectors, num_hashes, attention_mask, increase_num_buckets=False):
    """Upstream's ``LSHSelfAttention._hash_vectors`` with the rotations from :func:`rotations`."""
    batch_size = vectors.shape[0]

    # See https://huggingface.co/papers/1509.02897: a different random rotation per hash round.
    if isinstance(self.num_buckets, int):
        assert self.num_buckets % 2 == 0, (
            f"There should be an even number of buckets, but `self.num_buckets`: {self.num_buckets}"
        )
        rotation_size = self.num_buckets
        num_buckets = self.num_buckets
    else:
        # Factorize the hash if self.num_buckets is a list or tuple
        rotation_size, num_buckets = 0, 1
        for bucket_factor in self.num_buckets:
            assert bucket_factor % 2 == 0, (
                f"The number of buckets should be even, but `num_bucket`: {bucket_factor}"
            )
            rotation_size = rotation_size + bucket_factor
            num_buckets = num_buckets * bucket_factor

    vectors = vectors.detach()
    # shapes from the config (plain ints, also while tracing); upstream: vectors.shape[-1]
    rotations_shape = (
        self.num_attention_heads,
        self.attention_head_size,
        num_hashes,
        rotation_size // 2,
    )
    random_rotations = rotations(self, rotations_shape, vectors.device, vectors.dtype)
    # Batch_Size x Num_Attn_Heads x Num_Hashes x Seq_Len x Num_Buckets/2
    rotated_vectors = torch.einsum("bmtd,mdhr->bmhtr", vectors, random_rotations)

    if isinstance(self.num_buckets, int) or len(self.num_buckets) == 1:
        rotated_vectors = torch.cat([rotated_vectors, -rotated_vectors], dim=-1)
        buckets = torch.argmax(rotated_vectors, dim=-1)
    else:
        buckets, cur_sum, cur_product = None, 0, 1
        for bucket_factor in self.num_buckets:
            rotated_vectors_factor = rotated_vectors[..., cur_sum : cur_sum + (bucket_factor // 2)]
            cur_sum = cur_sum + bucket_factor // 2
            rotated_vectors_factor = torch.cat(
                [rotated_vectors_factor, -rotated_vectors_factor], dim=-1
            )
            if buckets is None:
                buckets = torch.argmax(rotated_vectors_factor, dim=-1)
            else:
                buckets = buckets + (cur_product * torch.argmax(rotated_vectors_factor, dim=-1))
            cur_product = cur_product * bucket_factor

    if attention_mask is not None and (
        attention_mask.sum().item() < batch_size * attention_mask.shape[-1]
    ):
        # add an extra bucket for padding tokens only
        num_buckets = num_buckets + 1
        buckets_mask = attention_mask.to(torch.bool)[:, None, None, :].expand(buckets.shape)
        buckets = torch.where(
            buckets_mask,
            buckets,
            torch.tensor(num_buckets - 1, dtype=torch.long, device=buckets.device),
        )
    elif increase_num_buckets:
        num_buckets = num_buckets + 1

    # offsets so that bucket numbers from different hashing rounds don't overlap
    offsets = torch.arange(num_hashes, device=vectors.device)
    offsets = (offsets * num_buckets).view((1, 1, -1, 1))
    offsets = offsets.expand((batch_size, self.num_attention_heads) + offsets.shape[-2:])
    return (buckets + offsets).flatten(start_dim=2, end_dim=3)


PATCH = Patch(
    name="reformer_lsh_seeded",
    target="transformers.models.reformer.modeling_reformer:LSHSelfAttention._hash_vectors",
    replacement=_hash_vectors,
    requires={"transformers": ">=5.24,<5.25"},
    reason=(
        "seeded LSH rotations from a private generator, fixed per layer: deterministic runs "
        "without reseeding torch's global RNG, and constant rotations in ONNX exports"
    ),
)
