"""Preset parameter sets, one TOML file per notebook: ``<notebook-stem>.toml`` with tables
``[demo]``, ``[full]`` and (where it applies) ``[perf]``.

A notebook's parameters cell lists every knob. Knobs left at ``None`` take the preset's value;
anything set explicitly (in the cell, or by papermill / ``nbzoo run -p``) wins. Keys a preset
names that the notebook does not declare are rejected, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import Any

import tomllib

# Knobs every notebook declares that no preset sets; resolve() carries them into the config.
COMMON = ("device", "precision", "seed", "devices", "output_dir")


class PresetError(ValueError):
    pass


class Config(dict):
    """A dict of resolved parameters with attribute access (``cfg.epochs``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(
                f"no parameter {name!r}; known: {', '.join(sorted(self))}"
            ) from None


def load(stem: str) -> dict[str, dict[str, Any]]:
    """All preset tables of one notebook."""
    try:
        text = resources.files(__package__).joinpath(f"{stem}.toml").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PresetError(f"no preset file nbzoo/presets/{stem}.toml") from None
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"nbzoo/presets/{stem}.toml: {exc}") from None
    return tables


def names(stem: str) -> list[str]:
    return list(load(stem))


def resolve(stem: str, preset: str, namespace: Mapping[str, Any]) -> Config:
    """Merge a preset with the notebook's parameters (``globals()`` in a notebook)."""
    tables = load(stem)
    if preset not in tables:
        raise PresetError(
            f"unknown preset {preset!r} for {stem}; choose one of: {', '.join(tables)}"
        )
    values = tables[preset]
    unknown = sorted(k for k in values if k not in namespace)
    if unknown:
        raise PresetError(
            f"nbzoo/presets/{stem}.toml [{preset}] sets {', '.join(unknown)}, "
            "which the notebook's parameters cell does not declare"
        )
    cfg = Config(preset=preset)
    cfg.update({k: namespace[k] for k in COMMON if k in namespace})
    keys = {k for table in tables.values() for k in table}
    for key in sorted(keys):
        given = namespace.get(key)
        if given is not None:
            cfg[key] = given
        elif key in values:
            cfg[key] = values[key]
        else:
            raise PresetError(
                f"parameter {key!r} has no value: preset [{preset}] of {stem} leaves it unset"
            )
    return cfg
