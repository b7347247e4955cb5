"""A torchrun entry point (``tests.jobs.sleep_job:sleep``) for the stop tests: every rank says it is
up, then sleeps until it is stopped. Its command line carries the test's unique marker (the
launch folder's name), by which the test finds what is left of the run in /proc."""

from __future__ import annotations

import time


def sleep(cfg, rt, seconds: float = 600.0):
    print(f"rank {rt.rank} of {rt.world_size} is up", flush=True)
    time.sleep(seconds)
    return {"slept": seconds}
