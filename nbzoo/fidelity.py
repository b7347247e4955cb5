"""The seeds' recipes and figures (``nbzoo/seeds.toml``) and each notebook's fidelity table.

The record holds, per notebook, every recipe item its seed states, the seed's value, the preset
key that carries nbzoo's, and the reason wherever nbzoo deviates; and the seed's figures, which
the notebooks write into their results file as the labelled reference. :func:`table` compares the
record with a resolved preset, one row per seed item: ``exact`` / ``deviates`` / ``left open by
the seed``. Every keyed row compares the value it names (the preset key, or a value derived from
several: ``global_batch``); a row about code (no key) is ``exact`` only with the test that shows
it. :func:`show` displays the table whole in a notebook, :func:`counts` sums it up.
"""

from __future__ import annotations

import html
import tomllib
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from nbzoo import launch, presets

RECORD = "seeds.toml"
EXACT, DEVIATES, OPEN = "exact", "deviates", "left open by the seed"
MATCHES = (EXACT, DEVIATES, OPEN)
RULES = ("equal", "suffix", "contains", "per_device")
ITEM_FIELDS = {
    "item",
    "seed",
    "quote",
    "value",
    "values",
    "key",
    "accept",
    "rule",
    "why",
    "stated",
    "source",
    "source_value",
    "nbzoo",
    "match",
    "test",
}
# The presets that are the seed's recipe, and the seed's row each reproduces: full is the seed's
# one-device row, full_8p its eight-device row, full_8p_on_1 that row's global batch on one device.
SEED_ROW = {"full": "full", "full_8p": "full_8p", "full_8p_on_1": "full_8p"}
SEED_PRESETS = tuple(SEED_ROW)
# Values a row can name that no single knob holds: computed from the resolved preset.
DERIVED: dict[str, tuple[Callable[[Mapping[str, Any]], Any], tuple[str, ...]]] = {
    "global_batch": (launch.global_batch, ("batch_size", "devices", "nnodes", "grad_accum")),
    "optimizers": (lambda cfg: sorted(cfg["grid"]), ("grid",)),
}
# apex's levels as nbzoo spells them: fp16 is O1 (fp16 autocast with dynamic loss scaling)
PRECISION_ALIASES = {"fp16": "O1"}
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
        if item.get("match") not in MATCHES:
            raise RecordError(
                f"{where}: an item without a preset key needs match {' | '.join(MATCHES)}"
            )
        if "nbzoo" not in item:
            raise RecordError(f"{where}: an item without a preset key needs 'nbzoo'")
        if item["match"] == EXACT and not item.get("test"):
            raise RecordError(
                f"{where}: an exact item without a preset key compares no value: it needs the "
                "'test' (tests/<file>.py::<test>) that shows nbzoo does what the seed does"
            )
    else:
        if "match" in item or "nbzoo" in item:
            raise RecordError(f"{where}: a keyed item's match and nbzoo come from the preset")
        if item.get("stated", True) and "value" not in item:
            raise RecordError(f"{where}: a stated item with a key needs the seed's 'value'")
        if item.get("stated", True) is False and "value" in item:
            raise RecordError(f"{where}: an item the seed leaves open has no seed 'value'")
    unstated = item.get("stated") is False or item.get("match") == OPEN
    if (item.get("match") == DEVIATES or unstated) and not item.get("why"):
        raise RecordError(f"{where}: a deviation or an unstated value needs 'why'")
    if "source_value" in item and not item.get("source"):
        raise RecordError(f"{where}: a 'source_value' needs the 'source' it comes from")


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
    """Every figure row of the seed's result tables, as a DataFrame (``row``: the row's name in
    English, ``the seed's row``: as the seed prints it)."""
    import pandas as pd

    return pd.DataFrame(record(stem).get("figures", []))


def seed_row(preset: str) -> str:
    """The seed's row a preset reproduces (full_8p_on_1: the eight-device row)."""
    return SEED_ROW.get(preset, preset)


def seed_value(item: Mapping[str, Any], preset: str) -> Any:
    return item.get("values", {}).get(seed_row(preset), item.get("value"))


def keys_read(item: Mapping[str, Any]) -> tuple[str, ...]:
    """The preset keys a keyed row's value comes from (one, or a derived value's inputs)."""
    key = item["key"]
    return DERIVED[key][1] if key in DERIVED else (key,)


def value_of(key: str, cfg: Mapping[str, Any]) -> Any:
    """The value a row names: the knob's, or a derived one computed from the resolved preset."""
    if key in DERIVED:
        return DERIVED[key][0](cfg)
    return cfg[key]


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" else value
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _level(value: Any) -> Any:
    return PRECISION_ALIASES.get(value, value)


def _per_device(expected: Mapping[str, Any], actual: Any) -> dict[str, tuple[Any, Any]]:
    """The device kinds where ``actual`` (one precision, or one per kind) is not the seed's."""
    return {
        kind: (want, got)
        for kind, want in expected.items()
        if _level(got := actual.get(kind) if isinstance(actual, Mapping) else actual)
        != _level(want)
    }


def _same(item: Mapping[str, Any], expected: Any, actual: Any) -> bool:
    rule = item.get("rule", "equal")
    accept = item.get("accept")
    if rule == "suffix":
        text = str(actual).rstrip("/")
        return any(text == a or text.endswith("/" + a) for a in accept or [str(expected)])
    if rule == "contains":
        return isinstance(actual, list) and list(expected) in [list(x) for x in actual]
    if rule == "per_device":
        return not _per_device(expected, actual)
    if accept is not None:
        return actual in accept
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected
    if isinstance(expected, float) or isinstance(actual, float):
        try:
            return float(actual) == float(expected)
        except (TypeError, ValueError):
            return False
    return actual == expected


def _preset_values(stem: str, preset: str) -> dict[str, Any]:
    """What the preset table itself sets (with the training defaults it leaves to them)."""
    table = presets.load(stem).get(preset, {})
    return {**presets.TRAINING_DEFAULTS, **table}


def _changed_by_parameter(stem: str, preset: str, item: Mapping[str, Any], cfg) -> str | None:
    """``set to X by a parameter (the preset says Y)`` when a knob the row reads was changed."""
    table = _preset_values(stem, preset)
    moved = [k for k in keys_read(item) if k in table and k in cfg and table[k] != cfg[k]]
    if not moved:
        return None
    return "; ".join(
        f"{k} set to {_show(cfg[k])} by a parameter (the preset says {_show(table[k])})"
        for k in moved
    )


def _code_row(base: dict[str, str], item: Mapping[str, Any]) -> dict[str, str]:
    why = item.get("why", "")
    if item["match"] == EXACT:
        why = f"{why} (checked by {item['test']})" if why else f"checked by {item['test']}"
    return {**base, "seed's value": "", "nbzoo": item["nbzoo"], "match": item["match"], "why": why}


def _open_row(base, item, actual, shown, stem, preset, cfg) -> dict[str, str]:
    """A value the seed leaves open: where nbzoo's comes from, and whether this run keeps it."""
    why = item["why"]
    if "source_value" in item:
        source = f"{item['source']}: {_show(item['source_value'])}"
        if _same({}, item["source_value"], actual):
            why += f" (from {source})"
        else:
            moved = _changed_by_parameter(stem, preset, item, cfg)
            why += f" -- this run departs from {source}" + (f"; {moved}" if moved else "")
    return {**base, "seed's value": "not stated", "nbzoo": shown, "match": OPEN, "why": why}


def row(stem: str, item: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, str]:
    """One table row: the seed's item against ``cfg``, a resolved preset of notebook ``stem``."""
    preset = cfg.get("preset", "")
    says = item["seed"] + (f" (the seed: 「{item['quote']}」)" if item.get("quote") else "")
    base = {"seed item": item["item"], "the seed says": says}
    if "key" not in item:
        return _code_row(base, item)
    key = item["key"]
    expected = seed_value(item, preset)
    missing = [k for k in keys_read(item) if k not in cfg and k not in presets.TRAINING_DEFAULTS]
    if missing:
        return {
            **base,
            "seed's value": "" if expected is None else _show(expected),
            "nbzoo": f"no `{missing[0]}` knob in this build",
            "match": DEVIATES,
            "why": f"the notebook does not declare `{missing[0]}`, so the seed's setting cannot "
            "be chosen",
        }
    actual = value_of(key, {**presets.TRAINING_DEFAULTS, **cfg})
    shown = f"{key} = {_show(actual)}"
    if item.get("stated", True) is False:
        return _open_row(base, item, actual, shown, stem, preset, cfg)
    if _same(item, expected, actual):
        return {**base, "seed's value": _show(expected), "nbzoo": shown, "match": EXACT, "why": ""}
    why = item.get("why") or "nbzoo's preset differs from the seed"
    detail = ""
    if item.get("rule") == "per_device":
        off = _per_device(expected, actual)
        detail = "; ".join(
            f"{kind}: {_show(got)}, the seed's {_show(want)}" for kind, (want, got) in off.items()
        )
        why = f"{why} ({detail})"
    if preset not in SEED_ROW:
        why = f"the {preset} preset is not the seed's recipe ({', '.join(SEED_PRESETS)} are)"
    elif moved := _changed_by_parameter(stem, preset, item, cfg):
        why = moved + (f" ({detail})" if detail else "")
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


def _config(stem: str, cfg: Mapping[str, Any] | str) -> Mapping[str, Any]:
    return resolved(stem, cfg) if isinstance(cfg, str) else cfg


def table(stem: str, cfg: Mapping[str, Any] | str):
    """The fidelity table of ``stem`` for a resolved config (a notebook's ``cfg``) or a preset
    name, as a DataFrame: seed item | the seed says | seed's value | nbzoo | match | why."""
    import pandas as pd

    return pd.DataFrame(rows(stem, _config(stem, cfg)), columns=COLUMNS)


def counts(stem: str, cfg: Mapping[str, Any] | str) -> dict[str, int]:
    """How many rows are exact, deviate, and are left open by the seed (a config or a preset)."""
    tally = Counter(r["match"] for r in rows(stem, _config(stem, cfg)))
    return {m: tally.get(m, 0) for m in MATCHES}


def count_line(tally: Mapping[str, int]) -> str:
    """``N exact · M deviate · K left open by the seed``."""
    deviate = tally[DEVIATES]
    return (
        f"{tally[EXACT]} exact · {deviate} deviate{'s' if deviate == 1 else ''} · "
        f"{tally[OPEN]} left open by the seed"
    )


@dataclass(frozen=True)
class Shown:
    """A fidelity table as a notebook displays it: one line of counts, then every row with every
    cell in full (HTML in Jupyter, a saved notebook and on GitHub; plain text elsewhere)."""

    stem: str
    preset: str
    rows: tuple[dict[str, str], ...]

    @property
    def counts(self) -> dict[str, int]:
        tally = Counter(r["match"] for r in self.rows)
        return {m: tally.get(m, 0) for m in MATCHES}

    @property
    def title(self) -> str:
        return f"{self.stem} [{self.preset}] against its seed: {count_line(self.counts)}"

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in COLUMNS)
        body = "".join(
            "<tr>"
            + "".join(
                f"<td style='text-align:left;vertical-align:top'>{html.escape(r[c])}</td>"
                for c in COLUMNS
            )
            + "</tr>"
            for r in self.rows
        )
        return (
            f"<p><b>{html.escape(self.title)}</b></p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        )

    def __repr__(self) -> str:
        lines = [self.title]
        for r in self.rows:
            value = r["seed's value"]
            lines.append(
                f"- {r['seed item']}: {r['match']} | seed: {r['the seed says']}"
                + (f" [{value}]" if value else "")
                + f" | nbzoo: {r['nbzoo']}"
                + (f" | {r['why']}" if r["why"] else "")
            )
        return "\n".join(lines)


def show(stem: str, cfg: Mapping[str, Any] | str) -> Shown:
    """The fidelity table to display in a notebook (the cell's last expression): its counts line
    and every cell in full -- no column cut at pandas' 50 characters."""
    cfg = _config(stem, cfg)
    return Shown(stem, str(cfg.get("preset", "")), tuple(rows(stem, cfg)))
