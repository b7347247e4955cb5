"""Preset parameter sets, one TOML file per notebook: ``<notebook-stem>.toml`` with tables
``[demo]``, ``[full]`` and (where it applies) ``[perf]``.

A notebook's parameters cell lists every knob. Knobs left at ``None`` take the preset's value;
anything set explicitly (in the cell, or by papermill / ``nbzoo run -p``) wins. Keys a preset
names that the notebook does not declare are rejected, so the two cannot drift apart.

``domains.toml`` declares what each knob admits (``epochs >= 1``, ``task`` one of ...): the CLI
checks ``-p`` values against it before a kernel starts, and :func:`resolve` checks every value
(preset, cell or papermill's) against it and against the cell's type annotation.
"""

from __future__ import annotations

import math
import tomllib
import types
from collections.abc import Mapping
from importlib import resources
from typing import Any, Union, get_args, get_origin

# Knobs every notebook declares that no preset sets; resolve() carries them into the config.
COMMON = ("device", "precision", "seed", "output_dir")
# Knobs of every training notebook (nbzoo.launch and the backends' train / evaluate): a preset may
# set them (full_8p sets devices = 8); left at None in the notebook and unset by the preset they
# take these values.
TRAINING_DEFAULTS = {
    "devices": 1,  # processes on this machine under torchrun, one per device (1: no torchrun)
    "grad_accum": 1,  # micro-batches per optimizer step
    "nnodes": 1,  # machines
    "node_rank": 0,  # this machine's index (node 0 writes the results)
    "master_addr": "127.0.0.1",  # node 0's address (several machines)
    "master_port": 29500,  # a free port on node 0 (several machines)
    "rendezvous_timeout": 300,  # seconds the machines wait for each other (several machines)
    "mode": "train",  # train | eval (evaluate init_checkpoint, or this preset's own checkpoint)
    "init_checkpoint": "",  # a checkpoint to start from (train) or to evaluate (eval)
}


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


def _read_toml(name: str) -> dict[str, dict[str, Any]]:
    try:
        text = resources.files(__package__).joinpath(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PresetError(f"no preset file nbzoo/presets/{name}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"nbzoo/presets/{name}: {exc}") from None


def load(stem: str) -> dict[str, dict[str, Any]]:
    """All preset tables of one notebook."""
    return _read_toml(f"{stem}.toml")


DOMAINS_FILE = "domains.toml"
_BOUNDS = (("min", ">="), ("max", "<="), ("above", ">"), ("below", "<"))


def domains(stem: str) -> dict[str, dict[str, Any]]:
    """What each knob of one notebook admits: ``[common]`` merged with the notebook's table."""
    tables = _read_toml(DOMAINS_FILE)
    return {**tables.get("common", {}), **tables.get(stem, {})}


def describe(domain: Mapping[str, Any]) -> str:
    """``{"min": 1}`` → ``>= 1``; ``{"choices": [...]}`` → ``one of a, b``."""
    parts = [f"{sign} {domain[key]}" for key, sign in _BOUNDS if key in domain]
    if "choices" in domain:
        parts.append("one of " + ", ".join(map(str, domain["choices"])))
    return " and ".join(parts)


def non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    """The first NaN or infinity in ``value`` (a number, or a dict / list holding numbers) and
    where it is (``""``: the value itself, ``"['lr']"``: inside it); None where all are finite.
    ``1e999`` parses as inf, and a learning rate of inf passes ``> 0`` and trains to NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return where, value
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        if (found := non_finite(item, f"{where}[{key!r}]")) is not None:
            return found
    return None


def in_domain(value: Any, domain: Mapping[str, Any]) -> bool:
    if value is None:  # None: "take the preset's value", not a value of its own
        return True
    if non_finite(value) is not None:
        return False
    if "choices" in domain and value not in domain["choices"]:
        return False
    checks = {
        "min": lambda v, b: v >= b,
        "max": lambda v, b: v <= b,
        "above": lambda v, b: v > b,
        "below": lambda v, b: v < b,
    }
    bounds = [(checks[key], domain[key]) for key, _ in _BOUNDS if key in domain]
    if bounds and (isinstance(value, bool) or not isinstance(value, int | float)):
        return False
    return all(check(value, bound) for check, bound in bounds)


def check_domain(stem: str, name: str, value: Any) -> None:
    """Raise :class:`PresetError` naming the knob and its domain when ``value`` is outside it,
    or when it holds NaN or an infinity (every knob, declared in domains.toml or not)."""
    if (found := non_finite(value)) is not None:
        where, bad = found
        raise PresetError(
            f"parameter {name} must be a finite number, got {value!r}"
            if not where
            else f"parameter {name} must hold finite numbers only: {name}{where} is {bad!r}"
        )
    domain = domains(stem).get(name)
    if domain is not None and not in_domain(value, domain):
        raise PresetError(
            f"parameter {name} must be {describe(domain)} (nbzoo/presets/{DOMAINS_FILE}), "
            f"got {value!r}"
        )


def admits(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits a parameters cell's annotation (``int``, ``Optional[float]``, ...):
    bool is not an int, an int is a float; unknown annotations admit anything."""
    if get_origin(annotation) in (Union, types.UnionType):
        return any(admits(a, value) for a in get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(annotation, type):
        return isinstance(value, annotation)
    return True


def _check_type(name: str, value: Any, annotation: Any) -> None:
    if annotation is not None and not admits(annotation, value):
        wanted = annotation.__name__ if isinstance(annotation, type) else str(annotation)
        wanted = wanted.replace("typing.", "")
        raise PresetError(f"parameter {name} expects {wanted}, got {value!r}")


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
    annotations = namespace.get("__annotations__", {})
    cfg = Config(preset=preset)
    for key in COMMON:
        if key in namespace:
            _check_type(key, namespace[key], annotations.get(key))
            cfg[key] = namespace[key]
    for key, default in TRAINING_DEFAULTS.items():
        if key in namespace:
            given = namespace[key]
            _check_type(key, given, annotations.get(key))
            cfg[key] = given if given is not None else values.get(key, default)
    keys = {k for table in tables.values() for k in table} - set(TRAINING_DEFAULTS)
    for key in sorted(keys):
        given = namespace.get(key)
        if given is not None:
            _check_type(key, given, annotations.get(key))
            cfg[key] = given
        elif key in values:
            cfg[key] = values[key]
        else:
            raise PresetError(
                f"parameter {key!r} has no value: preset [{preset}] of {stem} leaves it unset"
            )
    for key, value in cfg.items():
        check_domain(stem, key, value)
    return cfg
