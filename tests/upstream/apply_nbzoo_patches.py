"""pytest plugin: apply the nbzoo patches named in ``NBZOO_UPSTREAM_PATCHES`` (comma-separated)
before transformers' own tests run, and refuse to run when one of them does not apply.

It also starts every test from a random state of its own that is the same in every run:
transformers' model tests draw their inputs (``ids_tensor``, ``random_attention_mask``) from an
unseeded ``random.Random()`` in test_modeling_common, so without this the unpatched and the
patched runs would test different inputs, and a test that fails on some inputs (Longformer's
``test_inputs_embeds_matches_input_ids`` when a row's whole window is masked, for one) would
look like a failure the patches bring."""

from __future__ import annotations

import os
import random
import sys
import zlib


def pytest_configure(config):
    from nbzoo import patching

    names = [n for n in os.environ.get("NBZOO_UPSTREAM_PATCHES", "").split(",") if n]
    for name in names:
        if not patching.apply(name):
            raise RuntimeError(f"patch {name} did not apply on this device")
    config.nbzoo_patches = names


def pytest_report_header(config):
    return f"nbzoo patches applied: {', '.join(config.nbzoo_patches) or 'none'}"


def seed_of(nodeid: str) -> int:
    """A seed of the test's id alone (not of Python's salted str hash)."""
    return zlib.crc32(nodeid.encode())


def pytest_runtest_setup(item):
    import numpy as np
    import torch

    seed = seed_of(item.nodeid)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    for name, module in list(sys.modules.items()):
        if name.endswith("test_modeling_common") and isinstance(
            getattr(module, "global_rng", None), random.Random
        ):
            module.global_rng.seed(seed)
