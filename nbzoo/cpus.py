"""How many CPUs this process may use (no torch: the CLI and the demo scheduler read it too)."""

from __future__ import annotations

import os


def count() -> int:
    """The CPUs in this process's affinity mask (all of them where there is no such mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def share() -> int:
    """The CPUs this process may use: ``$NBZOO_CPUS`` where ``nbzoo demo`` set it (its share of
    the machine, beside the other notebooks it runs), else :func:`count`."""
    given = os.environ.get("NBZOO_CPUS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    return count()


def cpuinfo(path: str | os.PathLike = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """The first CPU's name (x86 ``model name``; ARM ``Model`` or ``Hardware``) and feature flags
    (x86 ``flags``, ARM ``Features``) from ``/proc/cpuinfo``; ``("", set())`` where it cannot be
    read (not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return "", set()
    model, flags = "", None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model", "Hardware") and not model:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:
            flags = set(value.split())
        if model and flags is not None:
            break
    return model, flags or set()
