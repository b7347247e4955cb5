"""The rehearsal's plan: which presets run, and that every override is size or location only."""

from __future__ import annotations

from pathlib import Path

from nbzoo import cli, fidelity, presets, rehearse

SIZE_OR_LOCATION = ("location", "sample count", "steps", "batch size", "devices")
# what the rehearsal may never override: the recipe's architecture, sequence length and code path
NEVER = {
    "model_config", "max_seq_length", "block_size", "max_positions", "seq_lengths", "task",
    "grid", "frequency", "precision", "mlm_probability", "learning_rate", "export_onnx",
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
    knobs["04_reformer_mlm"].discard("generate_with")
    runs, problems = rehearse.plan(["04_reformer_mlm"], s, tmp_path, knobs)
    assert not any(r.name == "04_reformer_mlm-full" for r in runs)
    assert "04_reformer_mlm [full]: the notebook declares no generate_with" in problems
