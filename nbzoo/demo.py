"""``nbzoo demo``: every notebook on the demo preset, several at a time.

The demo models are tiny: a second CPU thread buys a notebook little (01_albert_glue: 44 s on one
thread, 37 s on two, on a 2-core machine), while a second notebook running beside it doubles the
work done. So the demo runs ``jobs`` notebooks at once (default: one per CPU, at most four) with
``cpus // jobs`` threads each. 02's benchmark runs beside the others too: its demo preset times
PyTorch and ONNX Runtime on one thread each, in alternating rounds, which a neighbour on another
core slows alike. Each notebook runs in its own ``nbzoo run`` process, its log in
``results/<notebook>.log``. A notebook that fails does not stop the others; the notebooks that
need it are skipped, and the run ends non-zero naming both.

The thread count changes the last bits of floating-point sums, so figures from ``make demo``
match the committed notebooks (made by ``make notebooks``, the same scheduler) exactly, and a
plain ``nbzoo run`` with another thread count to within noise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nbzoo import safe_write

# What a notebook reads from another's demo run. 02 exports 01's demo checkpoint (it would train
# the same model itself otherwise: same result, twice the work); 00 tabulates everyone's results.
NEEDS: Mapping[str, tuple[str, ...]] = {"02_albert_inference": ("01_albert_glue",)}
SUMMARY_PREFIX = "00_"


def requirements(stems: Iterable[str]) -> dict[str, set[str]]:
    """For each notebook, the notebooks (among ``stems``) that must finish before it starts."""
    stems = list(stems)
    others = [s for s in stems if not s.startswith(SUMMARY_PREFIX)]
    needs = {}
    for stem in stems:
        wanted = others if stem.startswith(SUMMARY_PREFIX) else NEEDS.get(stem, ())
        needs[stem] = {s for s in wanted if s in stems and s != stem}
    return needs


def recorded_seconds(notebook: Path) -> float:
    """How long the notebook's last papermill run took (papermill stores it in the notebook's
    metadata; the committed notebooks come from ``make notebooks``), 0 when unknown."""
    try:
        metadata = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {})
        return float(metadata.get("papermill", {}).get("duration") or 0.0)
    except (OSError, ValueError):
        return 0.0


def critical_path(needs: Mapping[str, set[str]], seconds: Mapping[str, float]) -> dict[str, float]:
    """For each notebook, its own time plus the longest chain of notebooks waiting for it: starting
    the longest chains first keeps both workers busy to the end."""
    dependents = {s: [d for d, wanted in needs.items() if s in wanted] for s in needs}
    memo: dict[str, float] = {}

    def length(stem: str) -> float:
        if stem not in memo:
            memo[stem] = seconds.get(stem, 0.0) + max(map(length, dependents[stem]), default=0.0)
        return memo[stem]

    return {s: length(s) for s in needs}


@dataclass
class Outcome:
    stem: str
    status: str  # "ok", "failed" or "skipped"
    seconds: float = 0.0
    log: Path | None = None
    reason: str = ""
    cpu_seconds: float = 0.0  # user + system time of the notebook's processes (0 when unknown)


@dataclass
class _Forked:
    """A child forked from this process (what :func:`_finished` needs of a Popen)."""

    pid: int
    returncode: int | None = None


# ``python -m nbzoo.cli ...``, the command of every notebook of ``nbzoo demo``
CLI = [sys.executable, "-m", "nbzoo.cli"]


def start(
    argv: list[str], out, env: Mapping[str, str], entry: Callable[[list[str]], int] | None = None
) -> subprocess.Popen | _Forked:
    """Start ``argv`` with ``out`` as its stdout and stderr and ``env`` as its environment.

    ``python -m nbzoo.cli ...`` runs in a child forked from this process, with papermill, nbclient
    and nbzoo's CLI imported once, here: a fresh interpreter spends about 1.5 s of CPU importing
    them (1.2 s of it jsonschema building its IRI grammar), per notebook. ``entry`` is the CLI's
    ``main``, handed in by its caller (this module does not import the CLI that imports it).
    Anything else, without ``entry``, or where there is no fork, is a subprocess."""
    if entry is None or argv[: len(CLI)] != CLI or not hasattr(os, "fork"):
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env))
    import jupyter_client.kernelspec  # noqa: F401  (imported for the children)
    import papermill  # noqa: F401

    from nbzoo import presets  # noqa: F401

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return _Forked(pid)
    code = 1
    try:  # the child: never returns into the scheduler
        for fd in (1, 2):
            os.dup2(out.fileno(), fd)
        # Python's streams on those descriptors (the scheduler's may write elsewhere: pytest's)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update(env)
        code = entry(argv[len(CLI) :])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class _Running:
    stem: str
    process: subprocess.Popen | _Forked
    log: Path
    started: float = field(default_factory=time.perf_counter)


def run_all(
    stems: list[str],
    command: Callable[[str], list[str]],
    log_dir: Path,
    jobs: int,
    threads: int,
    seconds: Mapping[str, float] | None = None,
    report: Callable[[str], None] | None = None,
    env: Mapping[str, str] | None = None,
    entry: Callable[[list[str]], int] | None = None,
) -> list[Outcome]:
    """Run ``command(stem)`` for every stem, ``jobs`` at a time with ``threads`` threads each,
    respecting :data:`NEEDS`.

    Ready notebooks start longest chain first (:func:`critical_path` of ``seconds``, the expected
    time of each), ties in the order given. ``env``: variables added to every notebook's
    environment; ``entry``: the CLI's ``main``, run in a forked child for ``python -m nbzoo.cli``
    commands (:func:`start`)."""
    report = report or (lambda line: print(line, flush=True))
    needs = requirements(stems)
    chain = critical_path(needs, seconds or {})
    pending = sorted(stems, key=lambda s: (-chain[s], stems.index(s)))
    log_dir.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, Outcome] = {}
    running: list[_Running] = []
    while pending or running:
        for stem in list(pending):
            broken = [s for s in needs[stem] if s in outcomes and outcomes[s].status != "ok"]
            if broken:
                pending.remove(stem)
                outcomes[stem] = Outcome(stem, "skipped", reason=f"needs {', '.join(broken)}")
                report(f"[demo] {stem} skipped: it needs {', '.join(broken)}, which did not finish")
            elif len(running) < jobs and needs[stem] <= {
                s for s, o in outcomes.items() if o.status == "ok"
            }:
                pending.remove(stem)
                # NBZOO_CPUS: the notebook's share, for work it spreads over processes itself
                # (nbzoo.cpus.share)
                threads_env = {
                    "OMP_NUM_THREADS": str(threads),
                    "MKL_NUM_THREADS": str(threads),
                    "NBZOO_CPUS": str(threads),
                }
                log = log_dir / f"{stem}.log"
                with log.open("w") as out:
                    process = start(
                        command(stem), out, {**os.environ, **(env or {}), **threads_env}, entry
                    )
                running.append(_Running(stem, process, log))
                how = f"{threads} thread{'s' * (threads > 1)}"
                report(f"[demo] {stem} started ({how}, log {log})")
        time.sleep(0.2)
        for job in list(running):
            cpu = _finished(job.process)
            if cpu is None:
                continue
            running.remove(job)
            took = time.perf_counter() - job.started
            if job.process.returncode == 0:
                outcomes[job.stem] = Outcome(job.stem, "ok", took, job.log, cpu_seconds=cpu)
                report(f"[demo] {job.stem} done in {took:.1f} s ({cpu:.1f} s CPU)")
            else:
                tail = job.log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
                outcomes[job.stem] = Outcome(job.stem, "failed", took, job.log, tail[0], cpu)
                report(f"[demo] {job.stem} FAILED after {took:.1f} s: {tail[0]} (log {job.log})")
    return [outcomes[s] for s in stems]


def _finished(process: subprocess.Popen | _Forked) -> float | None:
    """None while ``process`` runs; once it has ended, the CPU seconds (user + system) it and the
    children it waited for used -- on a shared machine the wall-clock says little, the CPU time
    says what a notebook costs. 0.0 where the OS cannot tell (no ``os.wait4``)."""
    if not hasattr(os, "wait4"):
        return None if process.poll() is None else 0.0
    pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    if pid == 0:
        return None
    process.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime


def clean_root(folder: Path, notebooks: Path, results: Path) -> dict[str, str]:
    """A project root with nothing in it but a copy of ``notebooks``, for a run whose outputs are
    committed (``make notebooks``): in the working tree, the notebooks would resume the checkpoints
    and reuse the data of an earlier run, and the stored outputs would say "resuming from ..."
    instead of showing the training. Data and checkpoints go to ``folder`` (nbzoo's scratch
    folder, emptied first; one holding anything nbzoo did not put there is refused:
    nbzoo.safe_write), results still to ``results``. Returns the environment that points a
    notebook run there."""
    safe_write.claim_scratch(folder, "nbzoo.demo (make notebooks)", empty=True)
    shutil.copytree(notebooks, folder / "notebooks", ignore=shutil.ignore_patterns(".ipynb_*"))
    return {"NBZOO_ROOT": str(folder.resolve()), "NBZOO_RESULTS": str(results.resolve())}


def nbzoo_run(output_dir: Path, kernel: str) -> Callable[[str], list[str]]:
    """The command line that runs one notebook on the demo preset."""

    def command(stem: str) -> list[str]:
        return [
            sys.executable, "-m", "nbzoo.cli", "run", stem,
            "--preset", "demo", "--output-dir", str(output_dir), "--kernel", kernel,
        ]  # fmt: skip

    return command
