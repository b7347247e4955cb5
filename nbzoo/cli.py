"""The ``nbzoo`` command: list, run and compare the notebooks.

    nbzoo list
    nbzoo run 01_albert_glue --preset demo -p epochs=3 -p task=sst2
    nbzoo results
    nbzoo bench [CASE ...] --quick

Mistakes in what the user typed (an unknown notebook, preset, parameter or kernel, a value of the
wrong type or outside its domain, an output folder that is a file or cannot be written) end with
one line naming it and the allowed choices, and exit code 2, before a kernel starts. The executed
notebook is written under a temporary name and renamed when the run succeeds, so a failed or
interrupted run (Ctrl-C: one line, exit 130) never replaces the previous one.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nbzoo import cpus, lifeline, paths, progress, safe_write
from nbzoo.catalog import (
    UsageError,
    available_notebooks,
    find_notebook,
    notebook_parameters,
    notebooks_dir,
)
from nbzoo.run_outputs import WRITER, check_outputs, failed_path, install

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # what a shell reports for a command ended by SIGINT


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "dict": dict, "list": list}


def convert(name: str, text: str, type_name: str | None) -> Any:
    """Parse ``text`` as the parameter's declared type (``int``, ``float | None``, ...)."""
    type_name = (type_name or "").strip()
    if type_name.startswith("Optional[") and type_name.endswith("]"):
        type_name = f"{type_name[9:-1]} | None"
    declared = [t.strip() for t in type_name.split("|") if t.strip() and t.strip() != "None"]
    wanted = _TYPES.get(declared[0]) if len(declared) == 1 else None
    if wanted is str or (wanted is None and not declared):
        return text
    if text == "None" and "None" in type_name:
        return None
    if wanted is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise UsageError(f"parameter {name} expects bool (true/false), got {text!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if wanted is float and isinstance(value, str):
        # "nan", "inf", "-inf": floats Python reads, which the domain check then refuses by name
        with contextlib.suppress(ValueError):
            value = float(text)
    if wanted is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if wanted is not None and not (
        isinstance(value, wanted) and not (wanted is int and isinstance(value, bool))
    ):
        raise UsageError(f"parameter {name} expects {declared[0]}, got {text!r}")
    return value


def parse_overrides(
    path: Path, pairs: list[str], declared: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """``-p key=value`` pairs checked and typed against the parameters cell (``declared``, as
    :func:`notebook_parameters` read it from ``path``)."""
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep:
            raise UsageError(f"-p expects key=value, got {pair!r}")
        if name not in declared:
            raise UsageError(
                f"unknown parameter {name!r} for {path.stem}; choose one of: {', '.join(declared)}"
            )
        values[name] = convert(name, text, declared[name].get("inferred_type_name"))
        check_domain(path.stem, name, values[name])
    return values


def check_domain(stem: str, name: str, value: Any) -> None:
    """A value outside the knob's domain (nbzoo/presets/domains.toml) is a usage error."""
    from nbzoo import presets

    try:
        presets.check_domain(stem, name, value)
    except presets.PresetError as exc:
        raise UsageError(str(exc)) from None


def run_parameters(path: Path, preset: str, pairs: list[str]) -> dict[str, Any]:
    """What papermill injects: the overrides, and the preset unless it is the notebook's default.
    With nothing to set papermill injects no cell, so `make notebooks` (in place) leaves the
    notebooks' cells as they are."""
    declared = notebook_parameters(path)
    parameters = parse_overrides(path, pairs, declared)
    if "preset" in declared and _literal_default(declared["preset"]) != preset:
        parameters = {"preset": preset, **parameters}
    return parameters


def _literal_default(knob: dict[str, Any]) -> Any:
    try:
        return ast.literal_eval(knob.get("default", "None"))
    except (ValueError, SyntaxError):
        return None


def cmd_list(_args: argparse.Namespace) -> int:
    from nbzoo import presets

    for stem in available_notebooks():
        try:
            names = ", ".join(presets.names(stem))
        except presets.PresetError:
            names = "-"
        print(f"{stem:28s} presets: {names}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from nbzoo import presets

    path = find_notebook(args.notebook)
    try:
        choices = presets.names(path.stem)
    except presets.PresetError:
        choices = ["demo"]
    if args.preset not in choices:
        raise UsageError(
            f"unknown preset {args.preset!r} for {path.stem}; choose one of: {', '.join(choices)}"
        )
    parameters = run_parameters(path, args.preset, args.param or [])
    check_kernel(args.kernel)
    folder = writable_folder(paths.results_dir(args.output_dir))
    output = folder / f"{path.stem}.ipynb"
    try:  # found before the run, not after it
        check_outputs(path, output)
    except safe_write.NotOursError as exc:
        raise UsageError(str(exc)) from None
    print(f"running {path.name} (preset {args.preset}) → {output}", flush=True)
    from nbclient.exceptions import DeadKernelError
    from papermill.exceptions import PapermillExecutionError

    try:
        seconds = execute(path, output, parameters, args.kernel, args.verbose)
    except DeadKernelError:
        print(
            "nbzoo: the notebook's kernel died (killed by the system, most often for want of "
            f"memory, or crashed); the cells it ran: {failed_path(output)}",
            file=sys.stderr,
        )
        return 1
    except PapermillExecutionError as exc:
        lines = str(exc.evalue).strip().splitlines() or [""]
        evalue = lines[0] + (" ..." if len(lines) > 1 else "")
        print(
            f"nbzoo: the notebook failed in cell {exc.exec_count}: {exc.ename}: {evalue} "
            f"(the executed notebook, with the traceback: {failed_path(output)})",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt as exc:
        kept = f"; {output} left as it was" if output.exists() else ""
        print(f"nbzoo: {stopped_by(exc)}, nothing written{kept}", file=sys.stderr)
        return exit_status(exc)
    print(f"done in {seconds:.1f} s", flush=True)
    return 0


def quiet_shutdown() -> None:
    """Once the user has stopped a run, it ends in one line of ours: papermill's report of the
    kernel it shuts down ("Kernel died while waiting for execute reply") and asyncio's of the
    abandoned cell's DeadKernelError are the stop's own echo, not news."""
    for name in ("papermill", "asyncio"):
        logging.getLogger(name).disabled = True


def stopped_by(exc: KeyboardInterrupt) -> str:
    """``interrupted`` (Ctrl-C) or ``stopped by SIGTERM`` (kill, timeout)."""
    signum = getattr(exc, "signum", None)
    return f"stopped by {signal.Signals(signum).name}" if signum else "interrupted"


def exit_status(exc: KeyboardInterrupt) -> int:
    """What a shell reports for a command ended by that signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + getattr(exc, "signum", signal.SIGINT)


def check_kernel(name: str) -> None:
    """An unknown kernel name is a usage error, found before anything is written."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        manager.get_kernel_spec(name)
    except NoSuchKernel:
        known = ", ".join(sorted(manager.find_kernel_specs())) or "(none installed)"
        raise UsageError(f"no Jupyter kernel named {name!r}; installed: {known}") from None


def writable_folder(folder: Path) -> Path:
    """``folder``, created if missing, once a file could be created in it; else a usage error."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--output-dir {folder} is a file, not a folder")
    try:
        if not folder.exists():  # made by nbzoo, so marked as nbzoo's
            safe_write.claim(folder, WRITER)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"--output-dir {folder} cannot be written: {exc.strerror}") from None
    return folder


def execute(
    path: Path, output: Path, parameters: dict[str, Any], kernel: str, verbose: bool = False
) -> float:
    """Run one notebook with papermill from its own folder; return the seconds it took.

    papermill writes under a temporary name beside ``output``, installed as ``output`` when the
    run succeeds; a run that fails in a cell or whose kernel dies is installed as
    :func:`failed_path` (its traceback inside), anything else (Ctrl-C) leaves no file: the previous
    ``output`` is never replaced by a run that did not finish, nor a file that is not an earlier
    run of the notebook (:mod:`nbzoo.run_outputs`, asked before the run and again at its end)."""
    import papermill
    from nbclient.exceptions import DeadKernelError

    check_outputs(path, output)
    if not output.parent.exists():  # callers other than nbzoo run, too
        safe_write.claim(output.parent, WRITER)
    partial = output.with_name(f".{output.stem}.running-{os.getpid()}.ipynb")
    start = time.perf_counter()
    try:
        with progress.headless():
            papermill.execute_notebook(
                str(path),
                str(partial),
                parameters=parameters,
                cwd=str(path.parent),
                kernel_name=kernel,
                progress_bar=False,
                # --verbose: the kernel's stdout and stderr, live, as each output arrives
                # (papermill's log_output goes to a logger nobody configured: nothing shows)
                stdout_file=sys.stdout if verbose else None,
                stderr_file=sys.stderr if verbose else None,
                # nbclient's default, a graceful shutdown, lets a kernel interrupted mid-cell
                # (Ctrl-C) print a ZMQ traceback over our one-line message; the outputs are
                # collected by then, so a kill loses nothing
                shutdown_kernel="immediate",
            )
        install(path, partial, output)
    except (papermill.PapermillExecutionError, DeadKernelError) as exc:
        if getattr(exc, "ename", None) == "KeyboardInterrupt":  # Ctrl-C reached the kernel first
            raise KeyboardInterrupt from None
        if partial.exists():  # a cell failed, or the kernel died: the cells it ran are kept
            install(path, partial, failed_path(output))
        raise
    finally:  # installed under its final name, or not at all
        partial.unlink(missing_ok=True)
    return time.perf_counter() - start


def cmd_demo(args: argparse.Namespace) -> int:
    """Every notebook on the demo preset, ``--jobs`` at a time (00_results last, since it reads
    the others), then the results table."""
    from nbzoo import demo

    jobs = args.jobs or min(cpus.count(), 4)
    if jobs < 1:
        raise UsageError(f"--jobs must be at least 1, not {jobs}")
    threads = max(1, cpus.count() // jobs)
    output = notebooks_dir() if args.in_place else paths.results_dir()
    env = None
    if args.in_place:  # the committed outputs: from scratch, in build/, whatever the tree holds
        scratch = paths.resolve("build/notebooks-run")
        env = demo.clean_root(scratch, notebooks_dir(), paths.results_dir())
        # one progress line per run in the committed outputs, however slow this machine is
        env["NBZOO_PROGRESS_EVERY"] = "inf"
        print(f"[demo] data and checkpoints of this run go to {scratch}", flush=True)
    stems = available_notebooks()
    start = time.perf_counter()
    outcomes = demo.run_all(
        stems,
        demo.nbzoo_run(output, args.kernel),
        log_dir=paths.results_dir(),
        jobs=jobs,
        threads=threads,
        seconds={s: demo.recorded_seconds(notebooks_dir() / f"{s}.ipynb") for s in stems},
        env=env,
        entry=main,
    )
    print(f"[demo] executed notebooks are in {output}", flush=True)
    wall, cpu = time.perf_counter() - start, sum(o.cpu_seconds for o in outcomes)
    print(f"[demo] {len(stems)} notebooks in {wall:.1f} s, {cpu:.1f} s CPU in all", flush=True)
    cmd_results(argparse.Namespace(dir=None, markdown=False))
    bad = [o for o in outcomes if o.status != "ok"]
    for o in bad:
        print(f"nbzoo: {o.stem} {o.status}: {o.reason} (log {o.log})", file=sys.stderr)
    return 1 if bad else 0


def cmd_results(args: argparse.Namespace) -> int:
    import pandas as pd

    from nbzoo import metrics, report

    records = metrics.read_results(args.dir)
    if not records:
        print(f"no results in {paths.results_dir(args.dir)}; run `make demo` first")
        return 1
    table = report.metrics_table(records)
    if getattr(args, "markdown", False):
        print(table.to_markdown(index=False, floatfmt=".4g"))
        return 0
    with pd.option_context(
        "display.width", 200, "display.max_columns", 20, "display.max_rows", 200
    ):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nbzoo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the notebooks and their presets").set_defaults(func=cmd_list)
    run = sub.add_parser("run", help="execute a notebook with papermill")
    run.add_argument("notebook")
    run.add_argument("--preset", default="demo")
    run.add_argument(
        "-p", "--param", action="append", metavar="KEY=VALUE", help="override one parameter"
    )
    run.add_argument(
        "--output-dir",
        help="where the executed notebook goes (default: results/, or $NBZOO_RESULTS)",
    )
    run.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    run.add_argument(
        "--verbose", action="store_true", help="stream the notebook's output as it runs"
    )
    run.set_defaults(func=cmd_run)
    demo = sub.add_parser(
        "demo", help="run every notebook on the demo preset, then the results table"
    )
    demo.add_argument(
        "--in-place",
        action="store_true",
        help="store outputs in notebooks/ (a run from scratch: data and checkpoints in "
        "build/notebooks-run, never an earlier run's)",
    )
    demo.add_argument("--kernel", default="python3")
    demo.add_argument(
        "--jobs", type=int, default=0, help="notebooks at a time (default: one per CPU, at most 4)"
    )
    demo.set_defaults(func=cmd_demo)
    res = sub.add_parser(
        "results", help="the table of every results file against the seeds' figures"
    )
    res.add_argument("--dir", default=None)
    res.add_argument("--markdown", action="store_true", help="a Markdown table (for README.md)")
    res.set_defaults(func=cmd_results)
    # Its options are nbzoo.bench's own, parsed there (so that torch is imported only when needed).
    bench = sub.add_parser(
        "bench",
        help="stock transformers vs nbzoo's perf path (--help: its options)",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(func=cmd_bench)
    return parser


def cmd_bench(args: argparse.Namespace) -> int:
    """``nbzoo bench ARGS``: ARGS are parsed by nbzoo.bench's own parser (``main`` hands them
    over before this parser sees them, so that its options need not be listed twice)."""
    try:
        from nbzoo import bench
    except ImportError:
        raise UsageError("nbzoo bench is not available in this version") from None
    return bench.main(bench.build_parser().parse_args(args.bench_args))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()

    def one_line_error(message: str) -> None:
        print(f"nbzoo: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    parser.error = one_line_error  # type: ignore[method-assign]
    for action in parser._subparsers._group_actions:  # sub-commands report the same way
        for sub in action.choices.values():
            sub.error = one_line_error  # type: ignore[method-assign]
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        args = argparse.Namespace(func=cmd_bench, bench_args=argv[1:])
    else:
        args = parser.parse_args(argv)
    try:
        # SIGTERM / SIGHUP (kill, timeout) stop a run as Ctrl-C does: the kernel is shut down, and
        # with it every process the notebook started (nbzoo.lifeline)
        with lifeline.signals_as_interrupt(on_stop=quiet_shutdown):
            return args.func(args)
    except UsageError as exc:
        print(f"nbzoo: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as exc:
        print(f"nbzoo: {stopped_by(exc)}", file=sys.stderr)
        return exit_status(exc)


if __name__ == "__main__":
    sys.exit(main())
