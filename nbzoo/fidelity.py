"""The seeds' recipes and figures (``nbzoo/seeds.toml``) and each notebook's fidelity table.

The record holds, per notebook, every recipe item its seed states, the seed's value, the preset
key that carries nbzoo's, and the reason wherever nbzoo deviates; and the seed's figures, which
the notebooks write into their results file as the labelled reference. :func:`table` compares the
record with a resolved preset: one row per seed item, ``exact`` / ``deviates`` / ``not in seed``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from functools import cache
from importlib import resources
from typing import Any

from nbzoo import presets

RECORD = "seeds.toml"
EXACT, DEVIATES, NOT_IN_SEED = "exact", "deviates", "not in seed"
RULES = ("equal", "suffix", "contains", "knob")
ITEM_FIELDS = {
    "item",
    "seed",
    "value",
    "values",
    "key",
    "accept",
    "rule",
    "why",
    "stated",
    "nbzoo",
    "match",
}
SEED_PRESETS = ("full", "full_8p")  # the seed's one- and eight-device rows
COLUMNS = ["seed item", "the seed says", "seed's value", "nbzoo", "match", "why"]


class RecordError(ValueError):
    pass


@cache
def _load() -> dict[str, dict[str, Any]]:
    text = resources.files(__package__).joinpath(RECORD).read_text(encoding="utf-8")
    try:
        record = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecordError(f"nbzoo/{RECORD}: {exc}") from None
    for stem, entry in record.items():
        for n, item in enumerate(entry.get("items", []), start=1):
            _check_item(stem, n, item)
    return record


def _check_item(stem: str, n: int, item: Mapping[str, Any]) -> None:
    where = f"nbzoo/{RECORD} [{stem}] item {n} ({item.get('item', '?')!r})"
    unknown = sorted(set(item) - ITEM_FIELDS)
    if unknown:
        raise RecordError(f"{where}: unknown fields {unknown}; known: {sorted(ITEM_FIELDS)}")
    for field in ("item", "seed"):
        if not item.get(field):
            raise RecordError(f"{where}: no {field!r}")
    if item.get("rule", "equal") not in RULES:
        raise RecordError(f"{where}: rule must be one of {RULES}; got {item['rule']!r}")
    if "key" not in item:
        if item.get("match") not in (EXACT, DEVIATES):
            raise RecordError(f"{where}: an item without a preset key needs match exact|deviates")
        if "nbzoo" not in item:
            raise RecordError(f"{where}: an item without a preset key needs 'nbzoo'")
    elif item.get("stated", True) and "value" not in item:
        raise RecordError(f"{where}: a stated item with a key needs the seed's 'value'")
    if (item.get("match") == DEVIATES or item.get("stated") is False) and not item.get("why"):
        raise RecordError(f"{where}: a deviation or an unstated value needs 'why'")


def notebooks() -> list[str]:
    return list(_load())


def record(stem: str) -> dict[str, Any]:
    try:
        return _load()[stem]
    except KeyError:
        raise RecordError(f"nbzoo/{RECORD} has no [{stem}]; known: {', '.join(_load())}") from None


def reference(stem: str) -> dict[str, Any]:
    """The seed's figure for ``metrics.write_results(reference=...)`` (a fresh copy)."""
    ref = record(stem)["reference"]
    return {k: dict(v) if isinstance(v, Mapping) else v for k, v in ref.items()}


def figures(stem: str):
    """Every figure row of the seed's result tables, as a DataFrame."""
    import pandas as pd

    return pd.DataFrame(record(stem).get("figures", []))


def seed_value(item: Mapping[str, Any], preset: str) -> Any:
    return item.get("values", {}).get(preset, item.get("value"))


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" else value
    return str(value)


def _same(item: Mapping[str, Any], expected: Any, actual: Any) -> bool:
    rule = item.get("rule", "equal")
    accept = item.get("accept")
    if rule == "suffix":
        text = str(actual).rstrip("/")
        return any(text == a or text.endswith("/" + a) for a in accept or [str(expected)])
    if rule == "contains":
        return isinstance(actual, list) and list(expected) in [list(x) for x in actual]
    if accept is not None:
        return actual in accept
    if isinstance(expected, float) or isinstance(actual, float):
        try:
            return float(actual) == float(expected)
        except (TypeError, ValueError):
            return False
    return actual == expected


def row(stem: str, item: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, str]:
    """One table row: the seed's item against ``cfg``, a resolved preset of notebook ``stem``."""
    preset = cfg.get("preset", "")
    base = {"seed item": item["item"], "the seed says": item["seed"]}
    if "key" not in item:
        return {
            **base,
            "seed's value": "",
            "nbzoo": item["nbzoo"],
            "match": item["match"],
            "why": item.get("why", ""),
        }
    key = item["key"]
    expected = seed_value(item, preset)
    if key not in cfg:
        return {
            **base,
            "seed's value": "" if expected is None else _show(expected),
            "nbzoo": f"no `{key}` knob in this build",
            "match": DEVIATES,
            "why": f"the notebook does not declare `{key}`, so the seed's setting cannot be chosen",
        }
    actual = cfg[key]
    shown = f"{key} = {_show(actual)}"
    if item.get("stated", True) is False:
        return {**base, "seed's value": "not stated", "nbzoo": shown, "match": NOT_IN_SEED,
                "why": item["why"]}  # fmt: skip
    if item.get("rule") == "knob":
        return {**base, "seed's value": _show(expected), "nbzoo": f"`{key}` knob", "match": EXACT,
                "why": ""}  # fmt: skip
    if _same(item, expected, actual):
        return {**base, "seed's value": _show(expected), "nbzoo": shown, "match": EXACT, "why": ""}
    preset_value = presets.load(stem).get(preset, {}).get(key)
    why = item.get("why") or "nbzoo's preset differs from the seed"
    if preset not in SEED_PRESETS:
        why = f"the {preset} preset is not the seed's recipe ({', '.join(SEED_PRESETS)} are)"
    elif preset_value is not None and preset_value != actual:
        why = f"set to {_show(actual)} by a parameter (the preset says {_show(preset_value)})"
    return {**base, "seed's value": _show(expected), "nbzoo": shown, "match": DEVIATES, "why": why}


def rows(stem: str, cfg: Mapping[str, Any]) -> list[dict[str, str]]:
    return [row(stem, item, cfg) for item in record(stem)["items"]]


def resolved(stem: str, preset: str) -> presets.Config:
    """``preset`` resolved as the notebook would resolve it on its parameters cell's defaults."""
    import ast

    from nbzoo import catalog

    declared = catalog.notebook_parameters(catalog.notebooks_dir() / f"{stem}.ipynb")
    namespace: dict[str, Any] = {}
    for name, knob in declared.items():
        try:
            namespace[name] = ast.literal_eval(knob["default"])
        except (ValueError, SyntaxError):
            namespace[name] = None
    namespace["preset"] = preset
    return presets.resolve(stem, preset, namespace)


def table(stem: str, cfg: Mapping[str, Any] | str):
    """The fidelity table of ``stem`` for a resolved config (a notebook's ``cfg``) or a preset
    name: seed item | the seed says | seed's value | nbzoo | exact / deviates / not in seed | why."""
    import pandas as pd

    if isinstance(cfg, str):
        cfg = resolved(stem, cfg)
    return pd.DataFrame(rows(stem, cfg), columns=COLUMNS)


class Shown:
    """A fidelity table as a notebook shows it: every cell whole (no truncation), the counts above."""

    def __init__(self, frame):
        self.frame = frame

    def counts(self) -> dict[str, int]:
        return {m: int((self.frame["match"] == m).sum()) for m in (EXACT, DEVIATES, NOT_IN_SEED)}

    def headline(self) -> str:
        c = self.counts()
        return f"{c[EXACT]} exact · {c[DEVIATES]} deviate · {c[NOT_IN_SEED]} left open by the seed"

    def _repr_html_(self) -> str:
        import html

        table = self.frame.to_html(index=False, escape=True, border=0)
        return f"<p>{html.escape(self.headline())}</p>{table}"

    def __repr__(self) -> str:
        import pandas as pd

        with pd.option_context("display.max_colwidth", None, "display.width", None):
            return f"{self.headline()}\n{self.frame.to_string(index=False)}"


def show(stem: str, cfg: Mapping[str, Any] | str) -> Shown:
    """The fidelity table of ``stem`` rendered whole, with its counts: a notebook's appendix."""
    return Shown(table(stem, cfg))
