"""The patch mechanism itself, on a stand-in target (each real patch has its own equivalence test)."""

import types

import pytest

from nbzoo import patching


@pytest.fixture
def target(monkeypatch):
    module = types.ModuleType("nbzoo_test_target")

    class Thing:
        def value(self):
            return "upstream"

    module.Thing = Thing
    monkeypatch.setitem(__import__("sys").modules, "nbzoo_test_target", module)
    return module


def register(monkeypatch, patch):
    monkeypatch.setitem(patching._REGISTRY, patch.name, patch)
    patching._load_registry()
    return patch


def test_apply_undo_and_listing(monkeypatch, target):
    register(
        monkeypatch,
        patching.Patch(
            "demo_patch",
            "nbzoo_test_target:Thing.value",
            lambda self: "patched",
            {"torch": ">=2"},
            "test",
        ),
    )
    thing = target.Thing()
    patching.apply("demo_patch")
    assert thing.value() == "patched" and "demo_patch" in patching.active()
    patching.undo("demo_patch")
    assert thing.value() == "upstream" and "demo_patch" not in patching.active()
    with patching.applied("demo_patch"):
        assert thing.value() == "patched"
    assert thing.value() == "upstream"


def test_refuses_outside_the_checked_versions(monkeypatch, target):
    register(
        monkeypatch,
        patching.Patch(
            "old_patch",
            "nbzoo_test_target:Thing.value",
            lambda self: "x",
            {"transformers": "<4.0"},
            "test",
        ),
    )
    with pytest.raises(
        patching.PatchError, match="checked against transformers <4.0; installed is"
    ):
        patching.apply("old_patch")
    assert target.Thing().value() == "upstream"


def test_device_specific_patches_skip_other_devices(monkeypatch, target):
    register(
        monkeypatch,
        patching.Patch(
            "npu_patch",
            "nbzoo_test_target:Thing.value",
            lambda self: "npu",
            {"torch": ">=2"},
            "test",
            devices=("npu",),
        ),
    )
    assert patching.apply("npu_patch", device_kind="cpu") is False
    assert target.Thing().value() == "upstream"


def test_unknown_patch_names_the_available_ones():
    with pytest.raises(patching.PatchError, match="unknown patch 'nope'"):
        patching.apply("nope")


def test_two_patches_of_one_target_are_refused(monkeypatch, target):
    for name, value in (("first", "one"), ("second", "two")):
        register(
            monkeypatch,
            patching.Patch(
                name,
                "nbzoo_test_target:Thing.value",
                lambda self, v=value: v,
                {"torch": ">=2"},
                "test",
            ),
        )
    patching.apply("first")
    try:
        with pytest.raises(patching.PatchError, match="active patch 'first' already replaces"):
            patching.apply("second")
        assert target.Thing().value() == "one" and "second" not in patching.active()
    finally:
        patching.undo("first")
    assert target.Thing().value() == "upstream"


def test_applied_leaves_patches_that_were_active_before(monkeypatch, target):
    register(
        monkeypatch,
        patching.Patch(
            "outer", "nbzoo_test_target:Thing.value", lambda self: "p", {"torch": ">=2"}, "test"
        ),
    )
    patching.apply("outer")
    try:
        with patching.applied("outer"):
            assert target.Thing().value() == "p"
        assert target.Thing().value() == "p" and "outer" in patching.active()
    finally:
        patching.undo("outer")
