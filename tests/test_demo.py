"""nbzoo demo's scheduler: order, concurrency, thread count, failures."""

from __future__ import annotations

import json
import os
import sys
import time

from nbzoo import cli, demo

STEMS = ["00_results", "01_albert_glue", "02_albert_inference", "03_roberta_sst2"]


def recorder(tmp_path, fail=(), seconds=None):
    """A command that records when it ran and with how many threads, then exits 0 or 1; it takes
    ``seconds[stem]`` (0.3 s unless given)."""

    def command(stem):
        code = (
            f"import json, os, sys, time; t = time.time(); time.sleep({(seconds or {}).get(stem, 0.3)}); "
            "json.dump({'start': t, 'end': time.time(), 'threads': os.environ['OMP_NUM_THREADS'], "
            "'cpus': os.environ['NBZOO_CPUS']}, "
            f"open({str(tmp_path / stem)!r} + '.json', 'w')); "
            f"print('boom' if {stem in fail} else 'fine'); sys.exit({int(stem in fail)})"
        )
        return [sys.executable, "-c", code]

    return command


def times(tmp_path, stem):
    return json.loads((tmp_path / f"{stem}.json").read_text())


def test_requirements_put_summary_last_and_inference_after_training():
    needs = demo.requirements(STEMS)
    assert needs["00_results"] == set(STEMS[1:])
    assert needs["02_albert_inference"] == {"01_albert_glue"}
    assert needs["03_roberta_sst2"] == set()
    # A requirement that is not being run is not waited for.
    assert demo.requirements(["02_albert_inference"]) == {"02_albert_inference": set()}


def test_longest_chain_starts_first():
    needs = demo.requirements(STEMS)
    seconds = {"01_albert_glue": 40, "02_albert_inference": 30, "03_roberta_sst2": 60}
    chain = demo.critical_path(needs, seconds)
    assert chain["01_albert_glue"] == 70 and chain["03_roberta_sst2"] == 60
    assert chain["00_results"] == 0


def test_recorded_seconds_reads_papermill_metadata(tmp_path):
    notebook = tmp_path / "x.ipynb"
    notebook.write_text(json.dumps({"metadata": {"papermill": {"duration": 12.5}}, "cells": []}))
    assert demo.recorded_seconds(notebook) == 12.5
    notebook.write_text("{not json")
    assert demo.recorded_seconds(notebook) == 0.0
    assert demo.recorded_seconds(tmp_path / "missing.ipynb") == 0.0


def test_run_all_runs_in_parallel_in_dependency_order(tmp_path):
    lines = []
    outcomes = demo.run_all(
        STEMS,
        recorder(tmp_path, seconds={"03_roberta_sst2": 1.5}),
        tmp_path / "logs",
        jobs=2,
        threads=3,
        report=lines.append,
    )
    assert [o.status for o in outcomes] == ["ok"] * 4
    t = {s: times(tmp_path, s) for s in STEMS}
    assert {v["threads"] for v in t.values()} == {"3"}
    assert all(v["cpus"] == v["threads"] for v in t.values())  # NBZOO_CPUS: the same share
    assert t["02_albert_inference"]["start"] >= t["01_albert_glue"]["end"]
    assert t["00_results"]["start"] >= t["02_albert_inference"]["end"]
    assert t["00_results"]["start"] >= max(v["end"] for s, v in t.items() if s != "00_results")
    # 01 and 03 overlap, and so do 02 and 03: two at a time, the benchmark too.
    assert t["03_roberta_sst2"]["start"] < t["01_albert_glue"]["end"]
    assert t["02_albert_inference"]["start"] < t["03_roberta_sst2"]["end"]
    assert (tmp_path / "logs" / "03_roberta_sst2.log").read_text().strip() == "fine"
    assert any("02_albert_inference done" in line for line in lines)


def test_a_failure_skips_its_dependents_and_not_the_others(tmp_path):
    lines = []
    outcomes = demo.run_all(
        STEMS,
        recorder(tmp_path, fail=("01_albert_glue",)),
        tmp_path,
        jobs=1,
        threads=1,
        report=lines.append,
    )
    status = {o.stem: o.status for o in outcomes}
    assert status == {
        "00_results": "skipped",
        "01_albert_glue": "failed",
        "02_albert_inference": "skipped",
        "03_roberta_sst2": "ok",
    }
    failed = next(o for o in outcomes if o.stem == "01_albert_glue")
    assert failed.reason == "boom" and failed.log == tmp_path / "01_albert_glue.log"
    assert any("FAILED" in line and "boom" in line for line in lines)


def test_in_place_runs_start_from_a_clean_root(tmp_path):
    notebooks = tmp_path / "repo" / "notebooks"
    notebooks.mkdir(parents=True)
    (notebooks / "01_albert_glue.ipynb").write_text("{}")
    (notebooks / ".ipynb_checkpoints").mkdir()
    scratch, results = tmp_path / "scratch", tmp_path / "repo" / "results"
    (scratch / "checkpoints" / "01_albert_glue").mkdir(parents=True)  # an earlier run's
    env = demo.clean_root(scratch, notebooks, results)
    assert sorted(p.name for p in scratch.iterdir() if p.name != ".nbzoo-owned") == ["notebooks"]
    assert [p.name for p in (scratch / "notebooks").iterdir()] == ["01_albert_glue.ipynb"]

    code = (
        "from nbzoo import cli, paths; "
        "print(paths.resolve('checkpoints/01_albert_glue'), paths.results_dir(), "
        "cli.find_notebook('albert_glue'), sep='\\n')"
    )
    demo.run_all(
        ["01_albert_glue"],
        lambda stem: [sys.executable, "-c", code],
        tmp_path / "logs",
        jobs=1,
        threads=1,
        env=env,
        report=lambda line: None,
    )
    seen = (tmp_path / "logs" / "01_albert_glue.log").read_text().split()
    assert seen == [
        str(scratch.resolve() / "checkpoints" / "01_albert_glue"),
        str(results.resolve()),
        str(scratch.resolve() / "notebooks" / "01_albert_glue.ipynb"),
    ]


def test_each_outcome_reports_the_cpu_time_its_processes_used(tmp_path):
    spin = "import time; t = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    idle = "import time; time.sleep(0.3)"
    commands = {"01_albert_glue": spin, "03_roberta_sst2": idle}
    lines = []
    outcomes = demo.run_all(
        list(commands), lambda stem: [sys.executable, "-c", commands[stem]], tmp_path, jobs=2,
        threads=1, report=lines.append,
    )  # fmt: skip
    cpu = {o.stem: o.cpu_seconds for o in outcomes}
    # the spinning child used 0.3 s of CPU on top of the interpreter's start, which both pay;
    # how long that start takes depends on the machine, so it is not bounded here
    assert cpu["01_albert_glue"] >= 0.3 and cpu["03_roberta_sst2"] < cpu["01_albert_glue"]
    assert all(o.seconds >= 0.3 for o in outcomes)
    assert any("01_albert_glue done in" in line and "s CPU)" in line for line in lines)


def test_the_cli_runs_in_a_forked_child_with_its_own_environment_and_log(tmp_path):
    """``python -m nbzoo.cli ...`` starts as a fork of the scheduler (papermill imported once);
    its exit status, log and environment are those a subprocess would have had."""
    commands = {
        "01_albert_glue": [*demo.CLI, "--help"],
        "03_roberta_sst2": [*demo.CLI, "run", "no_such_notebook"],
    }
    lines = []
    outcomes = demo.run_all(
        list(commands), commands.get, tmp_path, jobs=2, threads=1, report=lines.append,
        env={"NBZOO_DEMO_TEST": "seen"}, entry=cli.main,
    )  # fmt: skip
    status = {o.stem: o.status for o in outcomes}
    assert status == {"01_albert_glue": "ok", "03_roberta_sst2": "failed"}
    assert "usage: nbzoo" in (tmp_path / "01_albert_glue.log").read_text()
    failed = next(o for o in outcomes if o.stem == "03_roberta_sst2")
    assert "no_such_notebook" in failed.reason
    assert "NBZOO_DEMO_TEST" not in os.environ  # set in the child only


def test_a_forked_child_sees_the_environment_it_was_given(tmp_path):
    with (tmp_path / "log").open("w") as out:
        child = demo.start(
            [*demo.CLI, "nonexistent-command"], out, {"PATH": os.environ.get("PATH", "")}, cli.main
        )
    while (cpu := demo._finished(child)) is None:
        time.sleep(0.05)
    assert isinstance(child, demo._Forked) and child.returncode == 2 and cpu >= 0
    assert "invalid choice" in (tmp_path / "log").read_text()
