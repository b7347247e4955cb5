"""pytest plugin: apply the nbzoo patches named in ``NBZOO_UPSTREAM_PATCHES`` (comma-separated)
before transformers' own tests run, and refuse to run when one of them does not apply."""

from __future__ import annotations

import os


def pytest_configure(config):
    from nbzoo import patching

    names = [n for n in os.environ.get("NBZOO_UPSTREAM_PATCHES", "").split(",") if n]
    for name in names:
        if not patching.apply(name):
            raise RuntimeError(f"patch {name} did not apply on this device")
    config.nbzoo_patches = names


def pytest_report_header(config):
    return f"nbzoo patches applied: {', '.join(config.nbzoo_patches) or 'none'}"
