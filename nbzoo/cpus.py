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
