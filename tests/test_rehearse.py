"""The rehearsal's plan (which presets run, every override size or location only, the presets'
own code paths), its local mirror of the download hosts and the checksum refusal."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from nbzoo import cli, fidelity, local_mirror, presets, rehearse
from nbzoo.data import sources
from nbzoo.data.download import DownloadError, checksum_overrides, download, fetched

SIZE_OR_LOCATION = ("location", "sample count", "steps", "batch size", "devices")
# what the rehearsal may never override: the recipe's architecture, sequence length and code path
NEVER = {
    "model_config", "max_seq_length", "block_size", "max_positions", "seq_lengths", "task",
    "grid", "frequency", "precision", "mlm_probability", "learning_rate", "export_onnx",
    # the code paths: what to download and from where, the seed's shapes and checks
    "data_source", "model_url", "generate_with", "static_shapes", "onnx_seq_lens",
}  # fmt: skip
# overridden in their batch sizes only: each [seq, batch] pair keeps the preset's sequence length
SEQ_BATCH_PAIRS = {"static_shapes"}


def declared() -> dict[str, set[str]]:
    return {s: set(cli.notebook_parameters(cli.find_notebook(s))) for s in rehearse.ORDER}


def test_every_override_says_why_it_is_size_or_location_only(tmp_path):
    s = rehearse.Standins(tmp_path / "standins")
    runs, _ = rehearse.plan(list(rehearse.ORDER), s, tmp_path, declared())
    assert {r.stem for r in runs if r.preset == "full"} == set(rehearse.ORDER)
    for run in runs:
        overridden = set(run.parameters) - {"preset", "output_dir"}
        assert not overridden & NEVER, f"{run.name} overrides {overridden & NEVER}"
        for key in overridden:
            assert run.reasons[key].startswith(SIZE_OR_LOCATION), f"{run.name}: {key}"
        preset = presets.load(run.stem)[run.preset]
        for key in overridden & SEQ_BATCH_PAIRS:
            seqs = [seq for seq, _ in run.parameters[key]]
            assert seqs == [seq for seq, _ in preset[key]], f"{run.name}: {key} changes a length"
        for key, value in run.parameters.items():
            if isinstance(value, str) and key.endswith(("_dir", "_name", "checkpoint")):
                assert not value or Path(value).is_absolute(), f"{run.name}: {key}={value}"


def test_full_8p_runs_on_two_processes_wherever_the_seed_has_an_eight_device_row(tmp_path):
    s = rehearse.Standins(tmp_path)
    runs, problems = rehearse.plan(list(rehearse.ORDER), s, tmp_path, declared())
    eight = [st for st in rehearse.ORDER if fidelity.record(st)["eight_device_row"]]
    assert eight == [st for st in rehearse.ORDER if st != "02_albert_inference"]
    for stem in eight:
        if "full_8p" in presets.names(stem):
            run = next(r for r in runs if r.name == f"{stem}-full_8p")
            assert run.parameters["devices"] == 2
        else:
            assert f"{stem}: no [full_8p] in nbzoo/presets/{stem}.toml" in problems


def test_the_standins_are_named_as_the_presets_expect(tmp_path):
    """The fidelity table of a rehearsed run still finds the seed's checkpoint names."""
    s = rehearse.Standins(tmp_path)
    runs, _ = rehearse.plan(list(rehearse.ORDER), s, tmp_path, declared())
    for run in runs:
        if run.preset != "full":
            continue
        cfg = fidelity.resolved(run.stem, "full")
        cfg.update({k: v for k, v in run.parameters.items() if k in cfg})
        table = fidelity.table(run.stem, cfg)
        model_rows = table[
            table["seed item"].str.contains("model") & table["nbzoo"].str.contains("model_name")
        ]
        assert (model_rows["match"] != fidelity.DEVIATES).all(), model_rows.to_dict("records")


def test_a_missing_knob_stops_that_run_with_its_name(tmp_path):
    s = rehearse.Standins(tmp_path)
    knobs = declared()
    knobs["04_reformer_mlm"].discard("scaling_seq_lens")
    runs, problems = rehearse.plan(["04_reformer_mlm"], s, tmp_path, knobs)
    assert not any(r.name == "04_reformer_mlm-full" for r in runs)
    assert "04_reformer_mlm [full]: the notebook declares no scaling_seq_lens" in problems


def test_the_hub_models_and_downloads_are_the_presets_own(tmp_path):
    """No run reads a local copy in place of a download: the hub ids, the download source and
    the model URL are the presets'; only the folders the downloads land in are the run's."""
    s = rehearse.Standins(tmp_path / "standins")
    runs, _ = rehearse.plan(list(rehearse.ORDER), s, tmp_path, declared())
    for run in runs:
        preset = presets.load(run.stem)[run.preset]
        if run.stem in rehearse.HUB_REPOS:
            assert "model_name" not in run.parameters
            assert preset["model_name"] == rehearse.HUB_REPOS[run.stem]
        if run.stem in rehearse.NBZOO_DOWNLOADS:
            assert preset["data_source"] == "download" and "data_source" not in run.parameters
    roberta = next(r for r in runs if r.name == "03_roberta_sst2-full")
    assert presets.load("03_roberta_sst2")["full"]["model_url"] == sources.ROBERTA_BASE.url
    assert roberta.parameters["model_name"].endswith("pre_train_model/RoBERTa.base/model.pt")
    thor = next(r for r in runs if r.name == "06_bert_thor-full")
    assert thor.parameters["init_checkpoint"] == str(s.phase1)


def test_the_scaling_measurement_and_the_1024_token_onnx_check_run():
    s = rehearse.Standins(Path("/x"))
    reformer = rehearse.overrides("04_reformer_mlm", "full", s, Path("/w"))
    full = presets.load("04_reformer_mlm")["full"]["scaling_seq_lens"]
    assert len(reformer["scaling_seq_lens"][0]) >= 2
    assert set(reformer["scaling_seq_lens"][0]) <= set(full)
    assert "onnx_seq_lens" not in rehearse.overrides("05_longformer_mlm", "full", s, Path("/w"))
    assert 1024 in presets.load("05_longformer_mlm")["full"]["onnx_seq_lens"]


@pytest.fixture
def glue_standins(tmp_path):
    """The stand-in GLUE archives in the mirror's folder, and their checksum file."""
    s = rehearse.Standins(tmp_path / "standins")
    rehearse.glue_archives(s)
    rehearse.write_checksums(s)
    return s


def test_the_mirror_serves_each_file_under_its_published_urls_host_and_path(
    glue_standins, tmp_path, monkeypatch
):
    s = glue_standins
    with local_mirror.Mirror(s.mirror) as mirror:
        for key, value in mirror.environment().items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("NBZOO_CHECKSUMS", str(s.checksums))
        mark = len(fetched())
        remote = sources.GLUE_SST2
        dest = download(remote.url, tmp_path / "SST-2.zip", sha256=remote.sha256)
        entry = fetched()[mark]
    assert dest.read_bytes() == s.mirrored(remote.url).read_bytes()
    assert entry["url"] == remote.url
    assert entry["from"] == f"{mirror.url}/dl.fbaipublicfiles.com/glue/data/SST-2.zip"
    assert entry["verified"].startswith(f"sha256 equal to the sha256 of {s.checksums}")
    assert [r["path"] for r in mirror.requests] == ["/dl.fbaipublicfiles.com/glue/data/SST-2.zip"]


def test_a_corrupted_download_is_refused_and_leaves_nothing(glue_standins, tmp_path):
    s = glue_standins
    with local_mirror.Mirror(s.mirror) as mirror:
        refused = rehearse.checksum_refusal(s, mirror, tmp_path / "work")
    assert "does not match the sha256 of" in refused["refused"]
    assert f"{s.checksums} (NBZOO_CHECKSUMS)" in refused["refused"]
    assert not any((tmp_path / "work" / "checksum_check").iterdir())
    # the same file, not corrupted, is accepted
    with (
        local_mirror.Mirror(s.mirror) as mirror,
        rehearse.environment({**mirror.environment(), "NBZOO_CHECKSUMS": str(s.checksums)}),
    ):
        remote = sources.GLUE_SST2
        download(remote.url, tmp_path / "ok.zip", sha256=remote.sha256, size=remote.size)


def test_without_the_stand_ins_checksums_the_published_one_refuses_the_stand_in(
    glue_standins, tmp_path
):
    s = glue_standins
    with local_mirror.Mirror(s.mirror) as mirror, rehearse.environment(mirror.environment()):
        remote = sources.GLUE_SST2
        with pytest.raises(DownloadError, match="does not match the published"):
            download(remote.url, tmp_path / "a.zip", sha256=remote.sha256)


def test_a_malformed_checksum_file_names_its_line(tmp_path):
    bad = tmp_path / "sums.txt"
    bad.write_text("# stand-ins\nabc 12 https://example.org/a.zip\n")
    with pytest.raises(DownloadError, match=r"sums.txt, line 2: expected '<sha256>"):
        checksum_overrides(bad)


def test_the_hub_client_downloads_from_the_mirror_and_the_rehearsal_checks_the_blob(tmp_path):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo = tmp_path / "mirror" / "huggingface.co" / "org" / "model"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text(json.dumps({"model_type": "bert"}))
    cache = tmp_path / "hf_home" / "hub"
    with local_mirror.Mirror(tmp_path / "mirror") as mirror:
        got = hf_hub_download(
            "org/model", "config.json", cache_dir=cache, endpoint=mirror.hub_endpoint
        )
        with pytest.raises(EntryNotFoundError):
            hf_hub_download(
                "org/model", "absent.json", cache_dir=cache, endpoint=mirror.hub_endpoint
            )
        fetched = rehearse.hub_downloads(mirror.requests, tmp_path / "hf_home", mirror.url)
    assert json.loads(Path(got).read_text()) == {"model_type": "bert"}
    assert [f["url"] for f in fetched] == [
        "https://huggingface.co/org/model/resolve/main/config.json"
    ]
    assert fetched[0]["sha256"] == local_mirror.sha256_of(repo / "config.json")


def test_a_run_whose_record_shows_no_download_fails(tmp_path):
    run = rehearse.Run("03_roberta_sst2", "full", {"preset": "full"})
    record = {"preset": "full", "devices": 1, "downloaded": []}
    with pytest.raises(rehearse.RehearsalError, match="nothing says it downloaded .*SST-2.zip"):
        rehearse.check_record(run, record)
    record["downloaded"] = [{"url": r.url} for r in rehearse.NBZOO_DOWNLOADS["03_roberta_sst2"]]
    rehearse.check_record(run, record)


def test_a_full_disk_while_building_the_stand_ins_ends_in_one_line(tmp_path, monkeypatch, capsys):
    def no_space(root, with_bert_large, log=print):
        raise OSError(errno.ENOSPC, "No space left on device", str(root / "mirror" / "SST-2.zip"))

    monkeypatch.setattr(rehearse, "BUILD", str(tmp_path / "rehearse"))
    monkeypatch.setattr(rehearse, "build_standins", no_space)
    assert rehearse.main(["--only", "01_albert_glue"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("cannot rehearse: cannot write ") and len(err.splitlines()) == 1, err
    assert err.endswith("SST-2.zip: no space left on the device"), err
