"""``make rehearse``: every notebook's ``full`` (and ``full_8p``) preset end to end on the CPU,
through the notebook's own code paths, changed only in size.

The full presets name hub checkpoints and download URLs, which cannot be fetched here. The rehearsal
builds stand-ins (nbzoo.standins: the real architectures from their real config.json with random
weights, real-format tokenizer files, data in the seeds' layouts) and serves them from a local
mirror of the download hosts (nbzoo.local_mirror, on 127.0.0.1) under the published URLs' paths:
GLUE's archives, fairseq's GPT-2 BPE files and roberta.base archive, and the hub repositories. The
notebooks download them with their own code -- nbzoo.data.download through ``NBZOO_MIRROR``, with
the stand-ins' checksums in ``NBZOO_CHECKSUMS`` where the real files have a published one;
huggingface_hub through ``HF_ENDPOINT`` -- into each run's own folders. Before the runs, a check
serves a corrupted GLUE archive and requires the download to refuse it.

06 starts from the seed's phase-1 checkpoint as a lab does: the rehearsal writes its random
BERT-Large as a TensorFlow 1 bundle (MLPerf's download) and a MindSpore ``.ckpt``, converts both
with ``python -m nbzoo.convert_checkpoint``, checks that both give back the model's tensors, and
06 starts from the TensorFlow one.

Each run is overridden only where :func:`overrides` says, each override with its reason: *where*
(the run's own folders, the local corpus, the converted checkpoint) and *how much* (steps, sample
counts, batch size). The architecture, the sequence lengths, the precision and the code path are
the preset's; the precision a CPU takes for a preset's level is nbzoo.device.choose_precision's,
as for any user. ``full_8p`` runs with ``devices = 2``: two processes through torchrun. Notebook
02's OM stage runs through the stand-in ``atc`` / ``ais_bench`` of nbzoo.export.cann_standins.

Each run leaves ``results/rehearse/<notebook>-<preset>.json``: the notebook's own results record
with ``downloaded`` (what was fetched, from where, how it was verified), its precision path, and a
``rehearsal`` entry (overrides, wall and CPU seconds, load, CPU). ``results/rehearse/rehearsal.json``
sums the rehearsal up.

    python -m nbzoo.rehearse            # or: make rehearse
    python -m nbzoo.rehearse --only 03_roberta_sst2 --keep-standins
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from nbzoo import fidelity, metrics, paths, presets, safe_write
from nbzoo.data import sources

BUILD = "build/rehearse"
WRITER = "nbzoo.rehearse"
RESULTS = "results/rehearse"
REHEARSAL_DEVICES = 2  # full_8p on two processes: the smallest count that runs the 8p code path
ORDER = tuple(fidelity.notebooks())  # every notebook with a seed, in the seeds' record order

# Sizes of the stand-in data (sample counts: the only thing they change is how long a run takes).
# GLUE: 4 training sentences are one step per epoch at 01's batch of 4 (8p: 2 x 2); 8 dev sentences
GLUE_SIZES = {"train": 4, "dev": 8, "test": 4}
CORPUS_SIZES = {"train": 200, "test": 120}  # ~4 blocks of 4096 tokens to train on, 2 to test
# 05's blocks are 512 tokens: 120 test documents would be 20 blocks to evaluate, 12 are 2
LONGFORMER_CORPUS_SIZES = {"train": 200, "test": 12}
MLPERF_SAMPLES, MLPERF_PER_SHARD = 8, 4  # eval 1 + 2 steps x batch 1 x 2 processes, 2 shards
TOKENIZER_TEXTS = 2000  # generated sentences the SentencePiece / BPE vocabularies are learnt on

# The hub repositories the full presets name (their model_name), mirrored with the stand-ins.
HUB_REPOS = {
    "01_albert_glue": "albert-base-v2",
    "04_reformer_mlm": "google/reformer-crime-and-punishment",
    "05_longformer_mlm": "allenai/longformer-base-4096",
}
# What each notebook's full presets download with nbzoo.data.download (its record must show them).
NBZOO_DOWNLOADS = {
    "01_albert_glue": (sources.GLUE_SST2, sources.GLUE_STSB),
    "03_roberta_sst2": (
        sources.GLUE_SST2, sources.GPT2_ENCODER_JSON, sources.GPT2_VOCAB_BPE,
        sources.GPT2_DICT_TXT, sources.ROBERTA_BASE,
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Standins:
    """Where the stand-ins live (all under ``root``): the mirror's files under their published
    URLs' host and path, the local data in the seeds' layouts, 06's checkpoints."""

    root: Path

    @property
    def mirror(self) -> Path:
        return self.root / "mirror"

    def mirrored(self, url: str) -> Path:
        """Where the mirror keeps the file of a published URL."""
        parts = urlsplit(url)
        return self.mirror / parts.netloc / parts.path.lstrip("/")

    def hub_repo(self, repo_id: str) -> Path:
        return self.mirror / "huggingface.co" / repo_id

    @property
    def glue_tsv(self) -> Path:  # the TSVs zipped into the mirror's GLUE archives
        return self.root / "glue"

    @property
    def albert(self) -> Path:
        return self.hub_repo(HUB_REPOS["01_albert_glue"])

    @property
    def roberta_model(self) -> Path:  # archived into the mirror's roberta.base.tar.gz
        return self.root / "roberta.base" / "model.pt"

    @property
    def gpt2_bpe(self) -> Path:
        return self.mirrored(sources.GPT2_ENCODER_JSON.url).parent

    @property
    def corpus(self) -> Path:
        return self.root / "seed"  # holds corpus/ and lf_token/

    @property
    def longformer_corpus(self) -> Path:
        return self.root / "seed_longformer"  # corpus/ and lf_token/, fewer test documents

    @property
    def reformer(self) -> Path:
        return self.hub_repo(HUB_REPOS["04_reformer_mlm"])

    @property
    def longformer(self) -> Path:
        return self.hub_repo(HUB_REPOS["05_longformer_mlm"])

    @property
    def mlperf(self) -> Path:
        return self.root / "mlperf_bert" / "tfrecord"

    @property
    def mlperf_download(self) -> Path:  # bert_config.json, tf1_ckpt/, mindspore/
        return self.root / "mlperf_bert" / "download"

    @property
    def phase1(self) -> Path:  # converted from the TF1 bundle: 06's starting checkpoint
        return self.root / "mlperf_bert" / "phase1"

    @property
    def phase1_from_mindspore(self) -> Path:
        return self.root / "mlperf_bert" / "phase1_from_mindspore"

    @property
    def conversion_check(self) -> Path:  # both conversions against the stand-in's weights
        return self.root / "mlperf_bert" / "conversions_equal.json"

    @property
    def checksums(self) -> Path:  # NBZOO_CHECKSUMS: the stand-ins' sha256 for published ones
        return self.root / "checksums.txt"

    @property
    def cann(self) -> Path:
        return self.root / "cann"


def build_standins(root: Path, with_bert_large: bool, log=print) -> Standins:
    """Write every stand-in under ``root`` (an earlier set is replaced); convert 06's."""
    from nbzoo import standins
    from nbzoo.data import corpus, glue

    s = Standins(root)
    sst2 = glue.generate_split("sst2", TOKENIZER_TEXTS, seed=1).text_a
    stsb = glue.generate_split("stsb", TOKENIZER_TEXTS // 2, seed=1)
    sentences = sst2 + stsb.text_a + (stsb.text_b or [])
    steps = [
        ("GLUE SST-2 / STS-B archives", lambda: glue_archives(s)),
        ("albert-base-v2 (config, safetensors, spiece.model, tokenizer.json)",
         lambda: standins.albert_base_v2(s.albert, sentences)),
        ("roberta.base.tar.gz (fairseq model.pt, dict.txt) and the GPT-2 BPE files",
         lambda: roberta_archive(s, sentences)),
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
        ("checksums of the stand-ins whose real files have a published one",
         lambda: write_checksums(s)),
    ]  # fmt: skip
    if with_bert_large:
        steps.append(
            ("BERT-Large as MLPerf's TF1 bundle and a MindSpore .ckpt, both converted",
             lambda: phase1_checkpoint(s, log))
        )  # fmt: skip
    for name, build in steps:
        start, cpu = time.perf_counter(), cpu_seconds()
        build()
        log(
            f"  stand-in {name}: {time.perf_counter() - start:.1f} s wall, "
            f"{cpu_seconds() - cpu:.1f} CPU s"
        )
    return s


def glue_archives(s: Standins) -> None:
    from nbzoo import standins
    from nbzoo.data import glue

    standins.glue_dataset(s.glue_tsv, GLUE_SIZES)
    for task, remote in glue.ARCHIVES.items():
        standins.glue_archive(s.glue_tsv, task, s.mirrored(remote.url))


def roberta_archive(s: Standins, sentences: list[str]) -> None:
    from nbzoo import standins

    standins.roberta_base_fairseq(s.roberta_model, s.gpt2_bpe, sentences)
    standins.roberta_base_archive(
        s.roberta_model, s.gpt2_bpe / "dict.txt", s.mirrored(sources.ROBERTA_BASE.url)
    )


def write_checksums(s: Standins) -> Path:
    """``NBZOO_CHECKSUMS``: ``<sha256> <size> <url>`` of each stand-in whose real file has a
    published sha256 (GLUE's archives); the others are verified as the real ones are, by length."""
    from nbzoo.data.download import sha256_of

    lines = [
        f"{sha256_of(s.mirrored(r.url))} {s.mirrored(r.url).stat().st_size} {r.url}"
        for r in sources.KNOWN.values()
        if r.sha256 is not None
    ]
    s.checksums.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return s.checksums


def phase1_checkpoint(s: Standins, log=print) -> dict[str, Any]:
    """06's starting checkpoint as a lab makes it: the stand-in BERT-Large written as MLPerf's TF1
    bundle and as a MindSpore ``.ckpt``, each converted with ``python -m
    nbzoo.convert_checkpoint``; both conversions must hold exactly the model's tensors."""
    from nbzoo import standins

    written, model = standins.bert_large_foreign_checkpoints(s.mlperf_download)
    outputs = {"tf1": s.phase1, "mindspore": s.phase1_from_mindspore}
    for kind, out in outputs.items():
        shutil.rmtree(out, ignore_errors=True)  # the rehearsal's own conversion of before
        command = [
            sys.executable, "-m", "nbzoo.convert_checkpoint", str(written[kind]), str(out),
            "--config", str(written["config"]),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RehearsalError(f"{' '.join(command)} failed:\n{done.stderr.strip()}")
        converted = [line for line in done.stdout.splitlines() if line.startswith("converted")]
        log(f"    {kind}: {(converted or ['(no summary)'])[0]}")
    files = [o / "model.safetensors" for o in outputs.values()]
    compared = {
        "sources": {k: str(written[k]) for k in outputs},
        **same_tensors(model.state_dict(), *files),
    }
    write_json(s.conversion_check, compared)
    shutil.rmtree(s.phase1_from_mindspore)  # compared; 06 starts from the TF1 conversion
    return compared


def same_tensors(reference: Mapping[str, Any], *files: Path) -> dict[str, Any]:
    """Every tensor of each safetensors file equals ``reference``'s of that name, and the files
    hold the same names; raises :class:`RehearsalError` naming the first that differs."""
    import torch
    from safetensors import safe_open

    names = None
    for file in files:
        with safe_open(str(file), "pt") as f:
            keys = sorted(f.keys())
            if names is not None and keys != names:
                raise RehearsalError(f"{file}: other tensors than {files[0]}")
            names = keys
            for name in keys:
                if not torch.equal(f.get_tensor(name), reference[name]):
                    raise RehearsalError(f"{file}: {name} differs from the stand-in's weights")
    return {"tensors": len(names or []), "files": [str(f) for f in files], "equal": True}


def checksum_refusal(s: Standins, mirror, work: Path) -> dict[str, Any]:
    """Serve GLUE's SST-2 archive with one byte changed: the download must refuse it (sha256),
    install nothing and leave no partial file."""
    from nbzoo.data.download import DownloadError, download

    remote = sources.GLUE_SST2
    dest = work / "checksum_check" / Path(remote.url).name
    shutil.rmtree(dest.parent, ignore_errors=True)
    url_path = "/" + str(s.mirrored(remote.url).relative_to(s.mirror))
    env = {**mirror.environment(), "NBZOO_CHECKSUMS": str(s.checksums)}
    with environment(env), mirror.corrupt(url_path):
        try:
            download(remote.url, dest, sha256=remote.sha256, size=remote.size)
        except DownloadError as exc:
            refused = str(exc)
        else:
            raise RehearsalError(f"a corrupted {remote.url} was installed at {dest}")
    leftovers = [p.name for p in dest.parent.iterdir()]
    if "sha256" not in refused or leftovers:
        raise RehearsalError(f"corrupted {remote.url}: {refused!r}; left {leftovers}")
    return {"url": remote.url, "served_from": mirror.url + url_path, "refused": refused}


@contextlib.contextmanager
def environment(values: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def run_folder(work: Path, stem: str, preset: str) -> Path:
    """A run's own folder: its downloads, its hub cache, its checkpoints."""
    return work / "runs" / f"{stem}-{preset}"


def checkpoints(work: Path, stem: str, preset: str) -> Path:
    """A run's own checkpoint folder."""
    return run_folder(work, stem, preset) / "checkpoints"


def artifacts(work: Path, stem: str) -> Path:
    """A run's own work folder (notebook 02's exported models and runner outputs)."""
    return run_folder(work, stem, "full") / "artifacts"


# What each notebook's run overrides, and why each override is size or location only.
def overrides(stem: str, preset: str, s: Standins, work: Path) -> dict[str, tuple[Any, str]]:
    own = run_folder(work, stem, preset)
    fresh = "location: an empty folder of the run, which the download fills"
    local = "location: the stand-in on disk (the seed names no download for it)"
    out = str(checkpoints(work, stem, preset))
    table: dict[str, dict[str, tuple[Any, str]]] = {
        "01_albert_glue": {
            "data_dir": (str(own / "glue"), fresh),
            "checkpoint_dir": (out, "location: the rehearsal's own folder"),
            "batch_size": (4, "batch size: 4 sequences of 128 per step (CPU time)"),
        },
        "02_albert_inference": {
            "checkpoint": (
                str(checkpoints(work, "01_albert_glue", "full") / "sst2"),
                "location: 01's rehearsed SST-2 checkpoint",
            ),
            "work_dir": (str(artifacts(work, stem)), "location: the rehearsal's own folder"),
            "max_samples": (4, "sample count: 4 dev sentences instead of all"),
            "batch_sizes": (
                [4],
                "batch size: the sweep's grid at batch 4 instead of 1 to 64 (CPU time); the seed's "
                "ATC shapes (batch 64 at seq 16 / 32, 32 at seq 64 / 128) still run, padded as "
                "ais_bench pads",
            ),
            "bench_batch_size": (4, "batch size: the speed-up measured on batches of 4"),
            "bench_batches": (1, "steps: one batch per timing round"),
            "bench_rounds": (1, "steps: one timing round"),
        },
        "03_roberta_sst2": {
            "data_dir": (
                str(own / "SST-2-bin"),
                "location: the run's folder for binarize's output",
            ),
            "glue_dir": (str(own / "glue"), fresh),
            "bpe_dir": (str(own / "gpt2_bpe"), fresh),
            "model_name": (
                str(own / "pre_train_model" / "RoBERTa.base" / "model.pt"),
                "location: the seed's pre_train_model/RoBERTa.base/model.pt in the run's folder, "
                "where model_url's archive is unpacked",
            ),
            "checkpoint_dir": (out, "location: the rehearsal's own folder"),
            "batch_size": (8, "batch size: 8 sentences per step (CPU time)"),
        },
        "04_reformer_mlm": {
            "data_dir": (str(s.corpus), local),
            "checkpoint_dir": (out, "location: the rehearsal's own folder"),
            "batch_size": (1, "batch size: one 4096-token block per step (CPU time)"),
            "eval_batch_size": (1, "batch size: one block per evaluation batch (CPU time)"),
            "max_steps": (2, "steps: 2 optimizer steps"),
            "scaling_seq_lens": (
                [1024, 2048],
                "sample count: the side measurement at the preset's two shortest lengths of five "
                "(8192 and 16384 take minutes a step on a CPU, and 16384's full-attention twin "
                "~13 GB)",
            ),
        },
        "05_longformer_mlm": {
            "data_dir": (
                str(s.longformer_corpus),
                "location: the stand-in corpus/ + lf_token/ (sample count: 12 test documents, "
                "2 blocks of 512 tokens to evaluate)",
            ),
            "checkpoint_dir": (out, "location: the rehearsal's own folder"),
            "batch_size": (1, "batch size: one 512-token block per step (CPU time)"),
            "eval_batch_size": (1, "batch size: one block per evaluation batch (CPU time)"),
            "max_steps": (2, "steps: 2 optimizer steps"),
        },
        "06_bert_thor": {
            "data_dir": (str(s.mlperf), local),
            "checkpoint_dir": (out, "location: the rehearsal's own folder"),
            "init_checkpoint": (
                str(s.phase1),
                "location: the stand-in phase-1 checkpoint, converted from its TF1 bundle by "
                "nbzoo.convert_checkpoint, instead of data/mlperf_bert/phase1",
            ),
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
    if preset == "full_8p" and stem == "04_reformer_mlm":
        values["scaling_seq_lens"] = (
            [1024],
            "sample count: the side measurement at the preset's shortest length (full's run "
            "measures it at two: the notebook's code is the same on 2 processes)",
        )
    if preset == "full_8p" and stem in EIGHT_DEVICE_STEPS:
        values["max_steps"] = (
            EIGHT_DEVICE_STEPS[stem],
            "steps: 2 optimizer steps, across one epoch end (the 8-device row's epochs are one "
            "step each on the stand-in data: 7 for 01, 10 for 03, each with its evaluation)",
        )
    return values


# full_8p's epochs (the seed's 8-device row) take one step each on the stand-in data
EIGHT_DEVICE_STEPS = {"01_albert_glue": 2, "03_roberta_sst2": 2}


def run_environment(stem: str, preset: str, s: Standins, work: Path, mirror_env: Mapping[str, str]):
    """The run's environment: downloads through the mirror, the stand-ins' checksums, its own hub
    cache; for 02 a project root whose data/glue/dataset is what 01's full run downloaded (02 reads
    SST-2's dev set through 01's preset), so the user's data/ is neither read nor written."""
    env = {
        **mirror_env,
        "NBZOO_CHECKSUMS": str(s.checksums),
        "HF_HOME": str(run_folder(work, stem, preset) / "hf_home"),
    }
    if stem == "02_albert_inference":
        env["NBZOO_ROOT"] = str(work / "root")
    return env


def link_roots(work: Path) -> None:
    """``work/root/data/glue/dataset`` -> 01's full run's downloaded GLUE folder (for 02)."""
    link = work / "root" / "data" / "glue" / "dataset"
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(run_folder(work, "01_albert_glue", "full") / "glue", target_is_directory=True)


@dataclass
class Run:
    stem: str
    preset: str
    parameters: dict[str, Any]
    reasons: dict[str, str] = field(default_factory=dict)

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
            if preset == "full_8p":
                values["devices"] = (REHEARSAL_DEVICES, "devices: 2 processes stand for the 8")
            missing = sorted(k for k in values if k not in declared[stem])
            if missing:
                problems.append(f"{stem} [{preset}]: the notebook declares no {', '.join(missing)}")
                continue
            values["preset"] = (preset, "")
            values["output_dir"] = (str(run_folder(work, stem, preset) / "results"), "location")
            runs.append(
                Run(stem, preset, {k: v for k, (v, _) in values.items()},
                    {k: why for k, (_, why) in values.items() if why})
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
    got = {entry["url"] for entry in record.get("downloaded", [])}
    missing = [r.url for r in NBZOO_DOWNLOADS.get(run.stem, ()) if r.url not in got]
    if run.stem in HUB_REPOS and not any(
        entry.get("by") == "huggingface_hub" for entry in record.get("downloaded", [])
    ):
        missing.append(f"hub repository {HUB_REPOS[run.stem]}")
    if missing:
        raise RehearsalError(f"{run.name}: nothing says it downloaded {', '.join(missing)}")


def hub_downloads(requests: list[dict[str, Any]], hub_home: Path, mirror_url: str) -> list[dict]:
    """The hub files a run fetched (the mirror's log), each checked in the run's hub cache: the
    stored blob's sha256 must be the ETag the mirror served (huggingface_hub checks the size
    only)."""
    from nbzoo.data.download import sha256_of

    out = []
    for r in requests:
        prefix = "/huggingface.co/"
        if (
            r["method"] != "GET"
            or r["status"] not in (200, 206)
            or not r["path"].startswith(prefix)
        ):
            continue
        repo_id, _, rest = r["path"][len(prefix) :].partition("/resolve/")
        blob = hub_home / "hub" / f"models--{repo_id.replace('/', '--')}" / "blobs" / r["sha256"]
        if not blob.is_file() or sha256_of(blob) != r["sha256"]:
            raise RehearsalError(f"{r['path']}: the hub cache holds no blob of the served sha256")
        out.append(
            {
                "url": f"https://huggingface.co/{repo_id}/resolve/{rest}",
                "from": mirror_url + r["path"],
                "file": str(blob),
                "bytes": r["bytes"],
                "sha256": r["sha256"],
                "verified": "size by huggingface_hub (it checks no checksum); the stored blob's "
                "sha256 equal to the served ETag, by the rehearsal",
                "by": "huggingface_hub",
            }
        )
    return out


def cpu() -> dict[str, Any]:
    """The CPU a run measured on (torch is imported only when a run starts)."""
    from nbzoo import device

    return device.cpu_description()


def execute(run: Run, work: Path, s: Standins, mirror, log=print) -> tuple[Path, dict[str, Any]]:
    """Run one notebook through papermill from scratch in its own folder; write its record, with
    what it downloaded, to results/rehearse/."""
    from nbzoo import cli

    folder = run_folder(work, run.stem, run.preset)
    # from scratch: no checkpoint, download or exported model of an earlier rehearsal is reused
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    output = work / "notebooks" / f"{run.name}.ipynb"
    notebook = cli.find_notebook(run.stem)  # before NBZOO_ROOT moves the project root
    env = run_environment(run.stem, run.preset, s, work, mirror.environment())
    mark, t0, c0, load0 = len(mirror.requests), time.perf_counter(), cpu_seconds(), os.getloadavg()
    with environment({"PYTHONUNBUFFERED": "1", **env}):
        cli.execute(notebook, output, run.parameters, "python3")
    timing = {
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "cpu_seconds": round(cpu_seconds() - c0, 1),
        "load_average_before": [round(x, 2) for x in load0],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
    }
    source = Path(run.parameters["output_dir"]) / f"{run.stem}.json"
    record = json.loads(source.read_text(encoding="utf-8"))
    nbzoo_downloads = [{**e, "by": "nbzoo.data.download"} for e in record.get("downloaded", [])]
    requests = mirror.log_since(mark)
    hub = hub_downloads(requests, Path(env["HF_HOME"]), mirror.url)
    record["downloaded"] = nbzoo_downloads + hub
    check_record(run, record)
    record["rehearsal"] = {
        **timing,
        "overrides": {
            k: {"value": run.parameters[k], "why": why} for k, why in run.reasons.items()
        },
        "mirror_requests": len(requests),
        "cpu": cpu(),
    }
    dest = paths.resolve(RESULTS) / f"{run.name}.json"
    write_json(dest, record, recognise=metrics.results_record(run.stem))
    return dest, timing


def write_json(path: Path, data: Any, recognise=None) -> None:
    """Through nbzoo.safe_write: results/rehearse is an output folder, replaced file by file only
    where nbzoo wrote the file."""
    blob = (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8")
    safe_write.write_output_file(path, blob, WRITER, recognise=recognise)


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


def standins_identity() -> str:
    """What the stand-ins depend on: an earlier set is reused (--keep-standins) only when equal."""
    from nbzoo import standins

    h = hashlib.sha256()
    for module in (standins, sys.modules[__name__]):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()


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
    from nbzoo import cli, local_mirror

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
    summary: dict[str, Any] = {"cpu": cpu(), "runs": {}, "checks": {}}
    done = s.root / "built"
    with_bert_large = "06_bert_thor" in stems
    identity = standins_identity() + (" with BERT-Large" if with_bert_large else "")
    if not (args.keep_standins and done.exists() and done.read_text().strip() == identity):
        print(f"building stand-ins in {s.root}", flush=True)
        done.unlink(missing_ok=True)
        shutil.rmtree(s.mirror, ignore_errors=True)  # the rehearsal's own mirror of before
        c0 = cpu_seconds()
        try:
            build_standins(s.root, with_bert_large, log=lambda m: print(m, flush=True))
        except OSError as exc:  # a full disk (BERT-Large's stand-ins take about 6 GB), read-only
            where = exc.filename or s.root
            print(f"cannot rehearse: {safe_write.write_error(where, exc)}", file=sys.stderr,
                  flush=True)  # fmt: skip
            return 1
        done.write_text(identity + "\n")
        summary["standins"] = {
            "wall_seconds": round(time.perf_counter() - start, 1),
            "cpu_seconds": round(cpu_seconds() - c0, 1),
        }
        print(f"stand-ins: {summary['standins']['wall_seconds']:.0f} s wall, "
              f"{summary['standins']['cpu_seconds']:.0f} CPU s", flush=True)  # fmt: skip
    link_roots(work)
    if s.conversion_check.exists():
        summary["checks"]["phase-1 conversions equal"] = json.loads(s.conversion_check.read_text())
    failed = []
    cann = cann_environment(s) if "02_albert_inference" in stems else None
    with local_mirror.Mirror(s.mirror) as mirror, environment(cann or {}):
        print(f"mirror of the download hosts: {mirror.url} (serving {s.mirror})", flush=True)
        try:
            summary["checks"]["corrupted download refused"] = checksum_refusal(s, mirror, work)
            print(f"check: a corrupted {sources.GLUE_SST2.url} is refused", flush=True)
        except RehearsalError as exc:
            failed.append(f"checksum check: {exc}")
        for run in runs:
            print(f"{run.name}: {', '.join(f'{k}={v}' for k, v in run.parameters.items())}",
                  flush=True)  # fmt: skip
            t0 = time.perf_counter()
            try:
                dest, timing = execute(run, work, s, mirror)
            except Exception as exc:  # one failed notebook does not stop the others
                failed.append(f"{run.name}: {type(exc).__name__}: {str(exc).splitlines()[-1:]}")
                print(f"{run.name}: FAILED after {time.perf_counter() - t0:.0f} s", flush=True)
                continue
            summary["runs"][run.name] = timing
            print(f"{run.name}: {timing['wall_seconds']:.0f} s wall, "
                  f"{timing['cpu_seconds']:.0f} CPU s -> {dest}", flush=True)  # fmt: skip
    total = time.perf_counter() - start
    summary.update(
        passed=len(summary["runs"]), planned=len(runs), wall_seconds=round(total, 1),
        cpu_seconds=round(cpu_seconds(), 1), failed=failed + problems,
    )  # fmt: skip
    write_json(paths.resolve(RESULTS) / "rehearsal.json", summary)
    print(
        f"rehearsal: {len(summary['runs'])} of {len(runs)} runs passed in {total:.0f} s wall "
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
        with lifeline.signals_as_interrupt(on_stop=cli.quiet_shutdown):
            return main(argv)
    except KeyboardInterrupt as exc:
        print(f"rehearsal: {cli.stopped_by(exc)}", file=sys.stderr, flush=True)
        return cli.exit_status(exc)


if __name__ == "__main__":
    sys.exit(stoppable_main())
