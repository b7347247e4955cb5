"""``make rehearse``: every notebook's ``full`` (and ``full_8p``) preset end to end on the CPU.

The full presets name hub checkpoints and download URLs, which cannot be fetched here. The rehearsal
builds stand-ins (nbzoo.standins: the real architectures from their real config.json with random
weights, in the hub's and fairseq's layouts, real-format tokenizer files, data in the seeds' layouts)
and runs each notebook through papermill on them with the preset's recipe, overridden only where
:data:`OVERRIDES` says, each override with its reason: *where* (local paths instead of hub ids and
URLs) and *how much* (steps, sample counts, batch size where the time needs it). The architecture,
the sequence length and the code path are the preset's. ``full_8p`` runs with ``devices = 2``: two
processes through torchrun. Notebook 02's OM stage runs through the stand-in ``atc`` / ``ais_bench``
of nbzoo.export.cann_standins.

Each run leaves ``results/rehearse/<notebook>-<preset>.json``, the notebook's own results record.

    python -m nbzoo.rehearse            # or: nbzoo rehearse, make rehearse
    python -m nbzoo.rehearse --only 03_roberta_sst2 --keep-standins
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nbzoo import fidelity, metrics, paths, presets, safe_write

BUILD = "build/rehearse"
WRITER = "nbzoo.rehearse"
RESULTS = "results/rehearse"
REHEARSAL_DEVICES = 2  # full_8p on two processes: the smallest count that runs the 8p code path
ORDER = tuple(fidelity.notebooks())  # every notebook with a seed, in the seeds' record order

# Sizes of the stand-in data (sample counts: the only thing they change is how long a run takes).
GLUE_SIZES = {"train": 8, "dev": 8, "test": 4}
CORPUS_SIZES = {"train": 200, "test": 120}  # ~4 blocks of 4096 tokens to train on, 2 to test
# 05's blocks are 512 tokens: 120 test documents would be 20 blocks to evaluate, 24 are 4
LONGFORMER_CORPUS_SIZES = {"train": 200, "test": 24}
MLPERF_SAMPLES, MLPERF_PER_SHARD = 8, 4  # eval 1 + 2 steps x batch 1 x 2 processes, 2 shards
TOKENIZER_TEXTS = 2000  # generated sentences the SentencePiece / BPE vocabularies are learnt on


@dataclass(frozen=True)
class Standins:
    """Where the stand-ins live (all under ``root``), named as the seeds name them."""

    root: Path

    @property
    def glue(self) -> Path:
        return self.root / "albert" / "dataset"

    @property
    def albert(self) -> Path:
        return self.root / "albert" / "prev_trained_model" / "albert_base_v2"

    @property
    def roberta_model(self) -> Path:
        return self.root / "roberta" / "pre_train_model" / "RoBERTa.base" / "model.pt"

    @property
    def gpt2_bpe(self) -> Path:
        return self.root / "roberta" / "gpt2_bpe"

    @property
    def sst2_bin(self) -> Path:
        return self.root / "roberta" / "SST-2"

    @property
    def corpus(self) -> Path:
        return self.root / "seed"  # holds corpus/ and lf_token/

    @property
    def longformer_corpus(self) -> Path:
        return self.root / "seed_longformer"  # corpus/ and lf_token/, fewer test documents

    @property
    def reformer(self) -> Path:
        return self.root / "checkpoint" / "reformer-crime-and-punishment"

    @property
    def longformer(self) -> Path:
        return self.root / "allenai" / "longformer-base-4096"

    @property
    def mlperf(self) -> Path:
        return self.root / "mlperf_bert" / "tfrecord"

    @property
    def bert_large(self) -> Path:
        return self.root / "bert-large"

    @property
    def cann(self) -> Path:
        return self.root / "cann"


def build_standins(root: Path, with_bert_large: bool, log=print) -> Standins:
    """Write every stand-in under ``root`` (an earlier set is replaced)."""
    from nbzoo import standins
    from nbzoo.data import corpus, glue

    s = Standins(root)
    steps = [
        ("GLUE SST-2 / STS-B TSVs", lambda: standins.glue_dataset(s.glue, GLUE_SIZES)),
    ]
    sst2 = glue.generate_split("sst2", TOKENIZER_TEXTS, seed=1).text_a
    stsb = glue.generate_split("stsb", TOKENIZER_TEXTS // 2, seed=1)
    sentences = sst2 + stsb.text_a + (stsb.text_b or [])
    steps += [
        ("albert-base-v2 (config, safetensors, spiece.model)",
         lambda: standins.albert_base_v2(s.albert, sentences)),
        ("roberta.base (fairseq model.pt, GPT-2 BPE, dict.txt)",
         lambda: standins.roberta_base_fairseq(s.roberta_model, s.gpt2_bpe, sentences)),
        ("SST-2 binarized (input0/, lable/)",
         lambda: standins.sst2_binarized(s.glue, s.sst2_bin, s.gpt2_bpe)),
        ("corpus/ + lf_token/", lambda: standins.corpus_root(s.corpus, CORPUS_SIZES, 50265)),
        ("corpus/ + lf_token/ (longformer)",
         lambda: standins.corpus_root(s.longformer_corpus, LONGFORMER_CORPUS_SIZES, 50265)),
        ("reformer-crime-and-punishment (config, safetensors, spiece.model)",
         lambda: standins.reformer_crime_and_punishment(
             s.reformer, corpus.read_corpus(s.corpus, "train"))),
        ("longformer-base-4096 (config, safetensors)",
         lambda: standins.longformer_base_4096(s.longformer)),
        ("MLPerf TFRecord shards",
         lambda: standins.mlperf_shards(s.mlperf, MLPERF_SAMPLES, MLPERF_PER_SHARD)),
    ]  # fmt: skip
    if with_bert_large:
        steps.append(
            ("BERT-Large (config, safetensors)", lambda: standins.bert_large(s.bert_large))
        )
    for name, build in steps:
        start = time.perf_counter()
        build()
        log(f"  stand-in {name}: {time.perf_counter() - start:.1f} s")
    return s


def checkpoints(work: Path, stem: str, preset: str) -> Path:
    """A run's own checkpoint folder (the rehearsal's, under build/)."""
    return work / "checkpoints" / f"{stem}-{preset}"


def artifacts(work: Path, stem: str) -> Path:
    """A run's own work folder (notebook 02's exported models and runner outputs)."""
    return work / "artifacts" / stem


# What each notebook's run overrides, and why each override is size or location only.
def overrides(stem: str, preset: str, s: Standins, work: Path) -> dict[str, tuple[Any, str]]:
    where = "location: the stand-in on disk instead of the hub id / download the preset names"
    out = str(checkpoints(work, stem, preset))
    table: dict[str, dict[str, tuple[Any, str]]] = {
        "01_albert_glue": {
            "model_name": (str(s.albert), where),
            "data_source": ("local", "location: read the stand-in GLUE folder, no download"),
            "data_dir": (str(s.glue), where),
            "checkpoint_dir": (out, "location: the rehearsal's own folder"),
            "batch_size": (4, "batch size: 4 sequences of 128 per step (CPU time)"),
        },
        "02_albert_inference": {
            "checkpoint": (
                str(checkpoints(work, "01_albert_glue", "full") / "sst2"),
                "location: 01's rehearsed SST-2 checkpoint",
            ),
            "work_dir": (str(artifacts(work, stem)), "location: the rehearsal's own folder"),
            "max_samples": (6, "sample count: 6 dev sentences instead of all"),
            "batch_sizes": (
                [4],
                "batch size: one batch size of the sweep, 4: two batches of the 6 sentences, the "
                "second padded as ais_bench pads it (CPU time)",
            ),
            "static_shapes": (
                [[16, 4], [32, 4], [64, 4], [128, 4]],
                "batch size: the seed's four ATC shapes at the sweep's batch 4 instead of 64 / 32 "
                "(which would pad 6 sentences to 64 / 32 rows); the sequence lengths stay",
            ),
            "bench_batch_size": (4, "batch size: the speed-up measured on batches of 4"),
            "bench_batches": (1, "steps: one batch per timing round"),
            "bench_rounds": (1, "steps: one timing round"),
        },
        "03_roberta_sst2": {
            "data_source": (
                "binarized",
                "location: the stand-in binarized SST-2 (what the download would produce)",
            ),
            "data_dir": (str(s.sst2_bin), where),
            "model_name": (str(s.roberta_model), where),
            "model_url": ("", "location: no download"),
            "checkpoint_dir": (out, "location: the rehearsal's own folder"),
            "batch_size": (8, "batch size: 8 sentences per step (CPU time)"),
        },
        "04_reformer_mlm": {
            "data_dir": (str(s.corpus), where),
            "model_name": (str(s.reformer), where),
            "generate_with": (str(s.reformer), where),
            "checkpoint_dir": (out, "location: the rehearsal's own folder"),
            "batch_size": (1, "batch size: one 4096-token block per step (CPU time)"),
            "eval_batch_size": (1, "batch size: one block per evaluation batch (CPU time)"),
            "max_steps": (2, "steps: 2 optimizer steps"),
            "scaling_seq_lens": (
                [256],
                "sample count: one length of the side measurement, the demo's shortest (the "
                "preset's reach 16384, whose full-attention twin needs ~13 GB)",
            ),
        },
        "05_longformer_mlm": {
            "data_dir": (
                str(s.longformer_corpus),
                "location: the stand-in corpus/ + lf_token/ (sample count: 24 test documents, "
                "4 blocks of 512 tokens to evaluate)",
            ),
            "model_name": (str(s.longformer), where),
            "checkpoint_dir": (out, "location: the rehearsal's own folder"),
            "batch_size": (1, "batch size: one 512-token block per step (CPU time)"),
            "eval_batch_size": (1, "batch size: one block per evaluation batch (CPU time)"),
            "max_steps": (2, "steps: 2 optimizer steps"),
            "onnx_seq_lens": ([512], "sample count: the ONNX check at the training length only"),
        },
        "06_bert_thor": {
            "data_dir": (str(s.mlperf), where),
            "checkpoint_dir": (out, "location: the rehearsal's own folder"),
            # every rank evaluates the whole set, and a BERT-Large forward of one 512-token sample
            # costs about 7 CPU seconds here: one sample, evaluated twice
            "eval_samples": (1, "sample count: the first sample instead of 10,000"),
            "batch_size": (1, "batch size: one 512-token sample per device and step (CPU time)"),
            "eval_batch_size": (1, "batch size: evaluation batches of 1"),
            "max_steps": (
                2,
                "steps: 2 optimizer steps (the first gathers and inverts, the second not)",
            ),
            "eval_every": (2, "steps: evaluate after the 2 steps (and the initial weights)"),
        },
    }
    values = dict(table[stem])
    if preset == "full_8p" and stem in EIGHT_DEVICE_STEPS:
        values["max_steps"] = (
            EIGHT_DEVICE_STEPS[stem],
            "steps: 2 optimizer steps, across one epoch end (the 8-device row's epochs are one "
            "step each on the stand-in data: 7 for 01, 10 for 03, each with its evaluation)",
        )
    return values


# full_8p's epochs (the seed's 8-device row) take one step each on the stand-in data
EIGHT_DEVICE_STEPS = {"01_albert_glue": 2, "03_roberta_sst2": 2}


# Notebook 02 reads SST-2's dev set from notebook 01's preset (``finetune_preset``), whose data_dir
# (data/glue/dataset) is relative to the project root: the run gets its own root (NBZOO_ROOT) where
# that path is the stand-in GLUE folder, so the user's data/ is neither read nor written.
ENVIRONMENT = {"02_albert_inference": lambda work: {"NBZOO_ROOT": str(work / "root")}}


def link_roots(work: Path, s: Standins) -> None:
    """``work/root/data/glue/dataset`` -> the stand-in GLUE folder (for notebook 02)."""
    link = work / "root" / "data" / "glue" / "dataset"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(s.glue, target_is_directory=True)


# knobs that exist only on some builds: passed when the notebook declares them
OPTIONAL = {
    "06_bert_thor": lambda s: {
        "init_checkpoint": (
            str(s.bert_large),
            "location: BERT-Large's stand-in checkpoint as the seed's load_checkpoint_path",
        )
    },
}


@dataclass
class Run:
    stem: str
    preset: str
    parameters: dict[str, Any]
    reasons: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.stem}-{self.preset}"


class RehearsalError(RuntimeError):
    pass


def plan(
    stems: list[str], s: Standins, work: Path, declared: Mapping[str, set[str]]
) -> tuple[list[Run], list[str]]:
    """The runs: each notebook's ``full``, and ``full_8p`` (devices=2) wherever its seed reports
    an eight-device row; and the problems (a missing preset or knob) that stop a run."""
    runs, problems = [], []
    for preset in ("full", "full_8p"):
        for stem in stems:
            if preset == "full_8p" and not fidelity.record(stem)["eight_device_row"]:
                continue
            if preset not in presets.names(stem):
                problems.append(f"{stem}: no [{preset}] in nbzoo/presets/{stem}.toml")
                continue
            values = overrides(stem, preset, s, work)
            for key, value in OPTIONAL.get(stem, lambda _: {})(s).items():
                if key in declared[stem]:
                    values[key] = value
            if preset == "full_8p":
                values["devices"] = (REHEARSAL_DEVICES, "devices: 2 processes stand for the 8")
            missing = sorted(k for k in values if k not in declared[stem])
            if missing:
                problems.append(f"{stem} [{preset}]: the notebook declares no {', '.join(missing)}")
                continue
            values["preset"] = (preset, "")
            values["output_dir"] = (str(work / "results" / f"{stem}-{preset}"), "location")
            runs.append(
                Run(stem, preset, {k: v for k, (v, _) in values.items()},
                    {k: why for k, (_, why) in values.items() if why},
                    dict(ENVIRONMENT.get(stem, lambda _w: {})(work)))
            )  # fmt: skip
    return runs, problems


def check_record(run: Run, record: Mapping[str, Any]) -> None:
    if record.get("preset") != run.preset:
        raise RehearsalError(f"{run.name}: results record says preset {record.get('preset')!r}")
    want = run.parameters.get("devices", 1)
    if record.get("devices") != want:
        raise RehearsalError(
            f"{run.name}: results record says devices {record.get('devices')}, expected {want}"
        )


def execute(run: Run, work: Path, env: Mapping[str, str], log=print) -> Path:
    """Run one notebook through papermill; copy its results record to results/rehearse/."""
    from nbzoo import cli

    output = work / "notebooks" / f"{run.name}.ipynb"
    # from scratch: a checkpoint of an earlier rehearsal (older code) is never resumed, and no
    # exported model of one is found in place of this run's (work is nbzoo's scratch folder)
    safe_write.remove_folder(checkpoints(work, run.stem, run.preset), WRITER)
    safe_write.remove_folder(artifacts(work, run.stem), WRITER)
    notebook = cli.find_notebook(run.stem)  # before NBZOO_ROOT moves the project root
    saved = dict(os.environ)
    os.environ.update({**env, **run.env})
    try:
        cli.execute(notebook, output, run.parameters, "python3")
    finally:
        os.environ.clear()
        os.environ.update(saved)
    source = Path(run.parameters["output_dir"]) / f"{run.stem}.json"
    record = json.loads(source.read_text(encoding="utf-8"))
    check_record(run, record)
    dest = paths.resolve(RESULTS) / f"{run.name}.json"
    data = source.read_bytes()
    safe_write.write_output_file(dest, data, WRITER, recognise=metrics.results_record(run.stem))
    return dest


def cann_environment(s: Standins) -> dict[str, str] | None:
    """PATH / PYTHONPATH with the stand-in atc, npu-smi and ais_bench first (nbzoo.export.
    cann_standins); None where that module is missing."""
    try:
        from nbzoo.export import cann_standins
    except ImportError:
        return None
    tools = cann_standins.write(s.cann)
    return {k: v for k, v in tools.env().items() if k in ("PATH", "PYTHONPATH")}


def cpu_seconds() -> float:
    """CPU time of this process and of its finished children (kernels, torchrun and its ranks):
    the measure of a run's cost on a shared machine, where wall time depends on the neighbours."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nbzoo rehearse", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", nargs="+", choices=ORDER, metavar="NOTEBOOK", help="rehearse these notebooks only"
    )
    parser.add_argument(
        "--keep-standins", action="store_true", help="reuse the stand-ins of an earlier run"
    )
    parser.add_argument(
        "--skip-missing",
        action="store_true",
        help="run what this build can run when a preset, knob or tool is missing (still exits 1)",
    )
    args = parser.parse_args(argv)
    from nbzoo import cli

    stems = [s for s in ORDER if not args.only or s in args.only]
    work = paths.resolve(BUILD)
    try:  # nbzoo's scratch folder: refused when it holds anything nbzoo did not put there
        safe_write.claim_scratch(work, WRITER)
    except safe_write.NotOursError as exc:
        print(f"cannot rehearse: {exc}", file=sys.stderr, flush=True)
        return 2
    first = checkpoints(work, "01_albert_glue", "full") / "sst2" / "config.json"
    if "02_albert_inference" in stems and "01_albert_glue" not in stems and not first.exists():
        stems.insert(0, "01_albert_glue")  # 02 infers with 01's rehearsed checkpoint
    declared = {stem: set(cli.notebook_parameters(cli.find_notebook(stem))) for stem in stems}
    s = Standins(work / "standins")
    runs, problems = plan(stems, s, work, declared)
    env = {"PYTHONUNBUFFERED": "1"}
    if "02_albert_inference" in stems:
        if importlib.util.find_spec("nbzoo.export.cann_standins") is None:
            problems.append(
                "02_albert_inference: nbzoo.export.cann_standins is missing, so the OM stage "
                "cannot run through the stand-in atc / ais_bench"
            )
    if problems:
        print("cannot rehearse:\n  " + "\n  ".join(problems), file=sys.stderr, flush=True)
        if not args.skip_missing:
            return 1
    start = time.perf_counter()
    done = s.root / "built"
    if not (args.keep_standins and done.exists()):
        print(f"building stand-ins in {s.root}", flush=True)
        done.unlink(missing_ok=True)
        with_bert = "init_checkpoint" in declared.get("06_bert_thor", set())
        c0 = cpu_seconds()
        build_standins(s.root, with_bert, log=lambda m: print(m, flush=True))
        done.write_text("stand-ins complete\n")
        print(
            f"stand-ins: {time.perf_counter() - start:.0f} s wall, {cpu_seconds() - c0:.0f} CPU s",
            flush=True,
        )
    link_roots(work, s)
    if "02_albert_inference" in stems:
        env.update(cann_environment(s) or {})
    seconds, failed = {}, []
    for run in runs:
        print(f"{run.name}: {', '.join(f'{k}={v}' for k, v in run.parameters.items())}", flush=True)
        t0, c0 = time.perf_counter(), cpu_seconds()
        try:
            dest = execute(run, work, env)
        except Exception as exc:  # one failed notebook does not stop the others
            failed.append(f"{run.name}: {type(exc).__name__}: {str(exc).splitlines()[-1:]}")
            print(f"{run.name}: FAILED after {time.perf_counter() - t0:.0f} s", flush=True)
            continue
        seconds[run.name] = time.perf_counter() - t0
        print(
            f"{run.name}: {seconds[run.name]:.0f} s wall, {cpu_seconds() - c0:.0f} CPU s -> {dest}",
            flush=True,
        )
    total = time.perf_counter() - start
    print(
        f"rehearsal: {len(seconds)} of {len(runs)} runs passed in {total:.0f} s wall "
        f"({total / 60:.1f} min), {cpu_seconds():.0f} CPU seconds (this process and its kernels)"
    )
    for line in problems + failed:
        print(f"  not rehearsed: {line}", file=sys.stderr)
    return 1 if problems or failed else 0


def stoppable_main(argv: list[str] | None = None) -> int:
    """:func:`main` as ``make rehearse`` runs it: SIGTERM (``timeout``, ``kill``) and Ctrl-C stop
    the rehearsal in one line, the running notebook's kernel shut down and with it every process
    it started (nbzoo.lifeline), instead of leaving torchrun and its ranks behind."""
    from nbzoo import cli, lifeline

    try:
        with lifeline.signals_as_interrupt():
            return main(argv)
    except KeyboardInterrupt as exc:
        print(f"rehearsal: {cli.stopped_by(exc)}", file=sys.stderr, flush=True)
        return cli.exit_status(exc)


if __name__ == "__main__":
    sys.exit(stoppable_main())
