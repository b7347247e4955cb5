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
        k for k, v in declared.items() if v["default"] == "None" and k not in presets.COMMON
    }
    assert defaults_none <= preset_keys, "a None-default parameter no preset sets"
    assert "preset" in declared and declared["preset"]["default"].strip("'\"") == "demo"
