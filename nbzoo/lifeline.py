"""Ties the processes of a launched run to the process that launched it, so that stopping a
run stops all of it: a kernel interrupted, restarted or killed, ``nbzoo run`` stopped by Ctrl-C
or SIGTERM, ``make rehearse`` under ``timeout``.

The chain: notebook (kernel) -> torchrun -> one rank per device. torchrun starts every rank in a
session of its own, so no signal to a process group reaches them all; and a kernel killed with
SIGKILL runs no cleanup at all. Each link therefore watches its own parent:

- torchrun runs as ``python -m nbzoo.lifeline torch.distributed.run ...``, which asks Linux for
  SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``) before handing over to torchrun:
  torchrun's own SIGTERM handler then stops its ranks;
- every rank (``nbzoo.launch.main``) asks for SIGKILL when torchrun dies: a torchrun that was
  itself killed cannot stop them.

Why the kernel's death signal and not a thread polling the parent's pid: the kernel delivers it
at once and costs nothing while the run lasts, and nothing in the dying process needs to run.
(``preexec_fn`` could set it too, but is unsafe in a process with threads, which a kernel is.)
The race where the parent dies before the child asks is closed by comparing ``getppid()`` with
the parent's pid, passed down in :data:`PARENT_ENV`. Where ``prctl`` does not exist (not Linux)
this does nothing, and :func:`stop_group` on the normal exit paths remains.

:func:`stop_group` is the launcher's side, for every exit path it sees (an exception,
KeyboardInterrupt): SIGTERM to torchrun's process group, then SIGKILL after a grace period.
:func:`signals_as_interrupt` turns SIGTERM into KeyboardInterrupt in ``nbzoo run`` and the
rehearsal, so that a ``kill`` or ``timeout`` takes the same path as Ctrl-C: papermill shuts the
kernel down, whose death then stops torchrun and its ranks.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator

PARENT_ENV = "NBZOO_LIFELINE_PARENT"  # the pid a child should die with
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
GRACE_SECONDS = 5.0  # torchrun's SIGTERM handler stops its ranks within this (they do no cleanup)


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent exits; True where it could.
    With ``parent`` (the pid the parent had when it started us): if that is no longer our parent,
    it died before we asked, and ``sig`` comes at once."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):  # not Linux
        return False
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)
    return True


def parent_from_environment() -> int | None:
    """The pid :func:`child_environment` named as the one to die with, if any."""
    value = os.environ.get(PARENT_ENV, "")
    return int(value) if value.isdigit() else None


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with this process named as the parent to die with."""
    return {**(os.environ if env is None else env), PARENT_ENV: str(os.getpid())}


def stop_group(proc: subprocess.Popen, grace: float = GRACE_SECONDS) -> None:
    """Stop ``proc`` (started with ``start_new_session=True``) and its process group: SIGTERM,
    then SIGKILL if it has not exited after ``grace`` seconds. Nothing where it already ended."""
    if proc.poll() is not None:  # reaped: its group id may belong to someone else by now
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGHUP) received: stop as Ctrl-C stops."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def signals_as_interrupt(on_stop: Callable[[], None] | None = None) -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`Terminated` (a KeyboardInterrupt) in
    the main thread, so that ``finally`` blocks and papermill's kernel shutdown run; SIGINT
    (Ctrl-C) raises KeyboardInterrupt as always, unless it is ignored (a background job). Each
    runs ``on_stop`` first."""

    def raise_terminated(signum, _frame):
        if on_stop is not None:
            on_stop()
        raise Terminated(signum)

    def raise_interrupt(_signum, _frame):
        if on_stop is not None:
            on_stop()
        raise KeyboardInterrupt

    wanted = {signal.SIGTERM: raise_terminated, signal.SIGHUP: raise_terminated}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        wanted[signal.SIGINT] = raise_interrupt
    saved = {sig: signal.signal(sig, handler) for sig, handler in wanted.items()}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> None:
    """``python -m nbzoo.lifeline MODULE ARGS...``: run ``python -m MODULE ARGS...`` in this
    process, which gets SIGTERM when its parent dies; its own children get this pid as theirs."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: python -m nbzoo.lifeline MODULE [ARGS...]")
    die_with_parent(signal.SIGTERM, parent_from_environment())
    os.environ[PARENT_ENV] = str(os.getpid())  # torchrun's ranks die with torchrun
    sys.argv = [argv[0], *argv[1:]]
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
