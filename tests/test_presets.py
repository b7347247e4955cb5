from typing import Optional

import pytest

from nbzoo import cli, presets


def test_none_takes_the_preset_and_explicit_values_win():
    names = {k: None for k in presets.load("01_albert_glue")["demo"]}
    cfg = presets.resolve("01_albert_glue", "demo", {**names, "epochs": 1, "seed": 5})
    assert cfg.epochs == 1 and cfg.seed == 5 and cfg.preset == "demo"
    assert cfg.model_name == presets.load("01_albert_glue")["demo"]["model_name"]
    full = presets.resolve("01_albert_glue", "full", names)
    assert full.max_seq_length == 128 and full.epochs == 2 and full.batch_size == 32


def test_unknown_preset_lists_the_choices():
    with pytest.raises(
        presets.PresetError,
        match="unknown preset 'nope' for 01_albert_glue; choose one of: demo, full",
    ):
        presets.resolve("01_albert_glue", "nope", {})


def test_a_preset_key_the_notebook_lacks_is_rejected():
    names = {k: None for k in presets.load("01_albert_glue")["demo"]}
    names.pop("epochs")
    with pytest.raises(
        presets.PresetError,
        match="sets epochs, which the notebook's parameters cell does not declare",
    ):
        presets.resolve("01_albert_glue", "demo", names)


def test_attribute_access_names_unknown_keys():
    cfg = presets.Config(a=1)
    with pytest.raises(AttributeError, match="no parameter 'b'"):
        cfg.b  # noqa: B018


@pytest.mark.parametrize("stem", cli.available_notebooks())
def test_every_notebook_declares_exactly_its_presets_knobs(stem):
    """Notebook parameters and preset files cannot drift apart."""
    try:
        tables = presets.load(stem)
    except presets.PresetError:
        pytest.skip(f"{stem} has no presets")
    declared = cli.notebook_parameters(cli.notebooks_dir() / f"{stem}.ipynb")
    preset_keys = {k for t in tables.values() for k in t}
    assert preset_keys <= set(declared)
    defaults_none = {
        k
        for k, v in declared.items()
        if v["default"] == "None" and k not in (*presets.COMMON, *presets.TRAINING_DEFAULTS)
    }
    assert defaults_none <= preset_keys, "a None-default parameter no preset sets"
    assert "preset" in declared and declared["preset"]["default"].strip("'\"") == "demo"


def _knobs(stem):
    return {k: None for t in presets.load(stem).values() for k in t}


@pytest.mark.parametrize(
    ("knob", "value", "domain"),
    [("epochs", -1, ">= 1"), ("batch_size", 0, ">= 1"), ("task", "mrpc", "one of sst2")],
)
def test_a_value_outside_its_domain_is_refused_naming_the_knob_and_domain(knob, value, domain):
    with pytest.raises(presets.PresetError, match=f"parameter {knob} must be {domain}"):
        presets.resolve("01_albert_glue", "demo", {**_knobs("01_albert_glue"), knob: value})


def test_a_value_of_another_type_than_the_cell_declares_is_refused():
    """The plain papermill route (`-p epochs 1.5`) reaches resolve() with the cell's
    annotations in the namespace: 1.5 is not an Optional[int]."""
    namespace = {**_knobs("01_albert_glue"), "epochs": 1.5}
    namespace["__annotations__"] = {
        "epochs": Optional[int],  # noqa: UP045 (the notebooks' spelling, for papermill)
        "learning_rate": float | None,
    }
    with pytest.raises(presets.PresetError, match="parameter epochs expects Optional\\[int\\]"):
        presets.resolve("01_albert_glue", "demo", namespace)
    namespace["epochs"], namespace["learning_rate"] = 2, 1  # an int is a float
    assert presets.resolve("01_albert_glue", "demo", namespace).learning_rate == 1


@pytest.mark.parametrize("stem", [s for s in cli.available_notebooks() if s != "00_results"])
def test_every_preset_value_lies_in_its_domain(stem):
    for name in presets.names(stem):
        presets.resolve(stem, name, _knobs(stem))  # raises on a value outside its domain


def test_domains_name_only_knobs_that_some_notebook_declares():
    declared = {
        k
        for s in cli.available_notebooks()
        for k in cli.notebook_parameters(cli.notebooks_dir() / f"{s}.ipynb")
    }
    tables = presets._read_toml(presets.DOMAINS_FILE)
    assert set(tables) - {"common"} <= set(cli.available_notebooks())
    named = {k for t in tables.values() for k in t}
    assert named <= declared, f"domains of undeclared knobs: {sorted(named - declared)}"
