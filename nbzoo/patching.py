"""Runtime patches of upstream libraries, kept in the top-level ``patches/`` folder.

The seeds replaced whole files inside transformers 4.28.1. We replace single attributes (a
function, a method) at run time instead. Each module in ``patches/`` defines ``PATCH``, a
:class:`Patch` (or ``PATCHES``, a list of them). A patch names the upstream versions it was
checked against and refuses to apply outside them; it can be undone; the active ones are listed
by ``nbzoo.device.describe()``.

Usage::

    from nbzoo import patching
    patching.apply("longformer_sliding_window")
    ...
    patching.undo("longformer_sliding_window")
    with patching.applied("reformer_lsh_seeded"): ...
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import Version


class PatchError(RuntimeError):
    """A patch cannot be applied (unknown name, unsupported version, wrong device)."""


@dataclass
class Patch:
    name: str
    target: str  # "package.module:Class.attribute" or "package.module:function"
    replacement: Any
    requires: dict[
        str, str
    ]  # distribution name -> version specifier, e.g. {"transformers": ">=4.40,<6"}
    reason: str
    devices: tuple[str, ...] | None = None  # apply only on these device kinds (None: any)
    # The replacement takes the target's own arguments through **kwargs: it shows the target's
    # signature (transformers reads a forward's signature to learn what a model accepts, e.g.
    # output_attentions through upstream's typed **kwargs).
    same_signature: bool = False
    _original: Any = field(default=None, repr=False)
    _applied: bool = field(default=False, repr=False)

    def _owner_and_attr(self) -> tuple[Any, str]:
        module_name, _, path = self.target.partition(":")
        owner: Any = importlib.import_module(module_name)
        *parents, attr = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        return owner, attr

    def check_versions(self) -> None:
        for dist, spec in self.requires.items():
            try:
                installed = metadata.version(dist)
            except metadata.PackageNotFoundError as exc:
                raise PatchError(
                    f"patch {self.name!r} needs {dist} {spec}, which is not installed"
                ) from exc
            if Version(installed) not in SpecifierSet(spec):
                raise PatchError(
                    f"patch {self.name!r} was checked against {dist} {spec}; installed is {installed}. "
                    "Re-run its equivalence test on this version and widen the range if it passes."
                )


_REGISTRY: dict[str, Patch] = {}
_ACTIVE: list[str] = []
_ALL_LOADED = False


def _register(module) -> None:
    found = getattr(module, "PATCHES", None) or [getattr(module, "PATCH", None)]
    for patch in found:
        if isinstance(patch, Patch):
            _REGISTRY.setdefault(patch.name, patch)


def _load_registry() -> dict[str, Patch]:
    global _ALL_LOADED
    if not _ALL_LOADED:
        import nbzoo_patches

        for info in pkgutil.iter_modules(nbzoo_patches.__path__):
            _register(importlib.import_module(f"nbzoo_patches.{info.name}"))
        _ALL_LOADED = True
    return _REGISTRY


def _load_module_of(name: str) -> None:
    """The module named after the patch, where there is one: using one patch imports its module
    only, not every patch's (and the model code each imports, about a CPU second per process)."""
    try:
        _register(importlib.import_module(f"nbzoo_patches.{name}"))
    except ModuleNotFoundError as exc:
        if exc.name != f"nbzoo_patches.{name}":
            raise


def available() -> list[str]:
    return sorted(_load_registry())


def get(name: str) -> Patch:
    if name not in _REGISTRY:
        _load_module_of(name)
    registry = _REGISTRY if name in _REGISTRY else _load_registry()
    if name not in registry:
        raise PatchError(
            f"unknown patch {name!r}; available: {', '.join(sorted(registry)) or 'none'}"
        )
    return registry[name]


def active() -> list[str]:
    return list(_ACTIVE)


def apply(name: str, device_kind: str | None = None) -> bool:
    """Apply a patch. Returns False (and changes nothing) when the patch is for other devices."""
    patch = get(name)
    if patch.devices is not None and device_kind not in patch.devices:
        return False
    if patch._applied:
        return True
    patch.check_versions()
    clash = [n for n in _ACTIVE if _REGISTRY[n].target == patch.target]
    if clash:
        # Stacking two replacements of one attribute would make undo order-dependent and leave
        # the first one silently bypassed.
        raise PatchError(
            f"patch {name!r} replaces {patch.target}, which active patch {clash[0]!r} already "
            f"replaces; undo {clash[0]!r} first"
        )
    owner, attr = patch._owner_and_attr()
    patch._original = (
        owner.__dict__[attr] if attr in getattr(owner, "__dict__", {}) else getattr(owner, attr)
    )
    if patch.same_signature:
        patch.replacement.__signature__ = inspect.signature(patch._original)
    setattr(owner, attr, patch.replacement)
    patch._applied = True
    _ACTIVE.append(name)
    return True


def undo(name: str) -> None:
    patch = get(name)
    if not patch._applied:
        return
    owner, attr = patch._owner_and_attr()
    setattr(owner, attr, patch._original)
    patch._applied = False
    _ACTIVE.remove(name)


@contextlib.contextmanager
def applied(*names: str, device_kind: str | None = None) -> Iterator[None]:
    """Apply patches for the duration of a block; patches already active stay active after it."""
    before = set(_ACTIVE)
    done = [n for n in names if n not in before and apply(n, device_kind)]
    try:
        yield
    finally:
        for n in reversed(done):
            undo(n)


def original(name: str) -> Callable[..., Any]:
    """The upstream object a patch replaced (useful inside a replacement that wraps it)."""
    patch = get(name)
    if patch._applied:
        return patch._original
    owner, attr = patch._owner_and_attr()
    return getattr(owner, attr)
