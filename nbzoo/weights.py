"""Checks on weights read from a checkpoint, so that a bad file stops with its name instead of
giving NaN metrics or scoring a classifier nobody trained.

- :func:`check_finite`: every weight finite (a run that diverged saves NaN weights, which then
  score as some number -- argmax of NaN logits is class 0 -- or as NaN);
- :func:`check_head`: the task's head is in the file (transformers initialises a missing head at
  random and only logs it; ``mode = eval`` would then score random weights);
- :func:`read_safetensors_keys` / :func:`pretrained`: a truncated or foreign safetensors file,
  or a folder transformers cannot read, named in the error with what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch


class UnusableCheckpoint(ValueError):
    """A checkpoint that cannot serve: unreadable, without the task's head, or not finite."""


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> tuple[str, int, int] | None:
    """(name, non-finite count, size) of the first floating-point tensor holding NaN or ±inf."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            return name, bad, tensor.numel()
    return None


def check_finite(model: torch.nn.Module, source: str | os.PathLike) -> None:
    """Raise :class:`UnusableCheckpoint` naming ``source`` and the first weight that holds NaN or an
    infinity (the run that wrote it diverged)."""
    found = first_non_finite(model.state_dict().items())
    if found is not None:
        name, bad, size = found
        raise UnusableCheckpoint(
            f"{source}: weight {name} holds {bad} NaN or infinite values of {size}: the run that "
            "wrote this checkpoint diverged; its metrics would be meaningless"
        )


def check_head(
    source: str | os.PathLike, missing: Iterable[str], heads: Mapping[str, str], purpose: str
) -> None:
    """Raise :class:`UnusableCheckpoint` when a key of a head (``heads``: key prefix -> what the
    head is, e.g. ``{"classifier.": "the SST-2 classifier"}``) is among ``missing``: the model
    would hold that head freshly initialised, at random."""
    missing = sorted(missing)
    for prefix, what in heads.items():
        lacking = [k for k in missing if k.startswith(prefix)]
        if lacking:
            shown = ", ".join(lacking[:4]) + (", ..." if len(lacking) > 4 else "")
            raise UnusableCheckpoint(
                f"{source}: no {what} in this checkpoint (missing {shown}); {purpose}"
            )


def read_safetensors_keys(file: str | os.PathLike) -> list[str]:
    """The tensor names of a safetensors file; a truncated or foreign file raises
    :class:`UnusableCheckpoint` naming it (safetensors' own error names no file)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return list(handle.keys())
    except (SafetensorError, OSError) as exc:
        raise UnusableCheckpoint(f"{file}: {unreadable(file, exc)}") from None


def unreadable(file: str | os.PathLike, exc: BaseException) -> str:
    """What is wrong with a safetensors file that would not open, in words."""
    size = Path(file).stat().st_size if Path(file).is_file() else None
    why = str(exc).strip() or type(exc).__name__
    if "incomplete metadata" in why or "not fully covered" in why:
        return (
            f"not a complete safetensors file ({why}; {size} bytes): it was cut short, e.g. by "
            "an interrupted copy or download; copy or save it again"
        )
    return f"not a readable safetensors file ({why})"


def pretrained(cls: Any, folder: str | os.PathLike, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
    """``cls.from_pretrained(folder, output_loading_info=True)``: (model, loading info), a
    damaged weights file named with what is wrong with it."""
    folder = Path(folder)
    for file in sorted(folder.glob("*.safetensors")):
        read_safetensors_keys(file)
    try:
        return cls.from_pretrained(folder, output_loading_info=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnusableCheckpoint(f"{folder}: {cls.__name__} cannot load it ({first})") from None
