"""Every tutorial notebook reads as a lesson (../shared/DESIGN.md, "A notebook"): the title, what you
will learn, the few settings a learner changes above the complete (collapsed) parameters cell, the
lesson's steps, a summary computed from the run, exercises, and the fidelity appendix -- with short
cells, and saved outputs that hold no traceback, no unexplained warning, no word of our own
process and at most one progress line per run."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

LESSONS = sorted(p for p in (ROOT / "notebooks").glob("0[1-9]_*.ipynb") if "." not in p.stem)
SECTIONS = ("what you will learn", "settings", "summary", "exercises", "fidelity to the seed")
LONGEST_CELL = 25  # lines of a code cell, the parameters cell excepted
# "issue", and "bar" in the sense of a threshold to clear ("not above the bar", "the bars: 1 of 3
# met"), not a bar chart, a progress bar or a colour bar
PROCESS_WORDS = re.compile(
    r"\bissues?\b"
    r"|\b(?:above|below|over|under|clears?|cleared|meets?|met|miss(?:es|ed)?|pass(?:es|ed)?)"
    r"\s+(?:the|a|its|this|each)\s+bars?\b"
    r"|\bbars?\s*(?:\(|:|met\b)",
    re.I,
)
PROGRESS_LINE = re.compile(r"^\s*(?P<desc>[^\n|]*?):?\s+\d+%\|")


def cells(path: Path) -> list[dict]:
    return json.loads(path.read_text(encoding="utf-8"))["cells"]


def source(cell: dict) -> str:
    return "".join(cell.get("source", ""))


def headings(cell: dict) -> list[str]:
    if cell["cell_type"] != "markdown":
        return []
    return [
        line.lstrip("#").strip().lower()
        for line in source(cell).splitlines()
        if line.startswith("#")
    ]


def section_of(nb: list[dict], name: str) -> tuple[int, int]:
    """(first cell, end cell) of the section whose heading contains ``name``: from its heading
    to the next heading of the same or a higher level."""
    for i, cell in enumerate(nb):
        for line in source(cell).splitlines() if cell["cell_type"] == "markdown" else []:
            if line.startswith("#") and name in line.lower():
                level = len(line) - len(line.lstrip("#"))
                for j in range(i + 1, len(nb)):
                    for other in headings_with_level(nb[j]):
                        if other <= level:
                            return i, j
                return i, len(nb)
    raise AssertionError(f"no section {name!r}")


def headings_with_level(cell: dict) -> list[int]:
    if cell["cell_type"] != "markdown":
        return []
    return [
        len(line) - len(line.lstrip("#"))
        for line in source(cell).splitlines()
        if line.startswith("#")
    ]


def parameters_index(nb: list[dict]) -> int:
    found = [i for i, c in enumerate(nb) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(found) == 1, f"{len(found)} cells tagged 'parameters'"
    return found[0]


def knobs(nb: list[dict]) -> list[str]:
    tree = ast.parse(source(nb[parameters_index(nb)]))
    return [n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)]


def list_items(text: str) -> list[str]:
    return [line for line in text.splitlines() if re.match(r"\s*(?:[-*]|\d+\.)\s+\S", line)]


def section_text(nb: list[dict], name: str) -> str:
    start, end = section_of(nb, name)
    return "\n".join(source(c) for c in nb[start:end] if c["cell_type"] == "markdown")


@pytest.fixture(params=LESSONS, ids=lambda p: p.stem)
def notebook(request) -> list[dict]:
    return cells(request.param)


def test_a_lesson_has_its_sections_in_order(notebook):
    title = source(notebook[0])
    assert notebook[0]["cell_type"] == "markdown" and title.startswith("# "), "no title first"
    starts = [section_of(notebook, name)[0] for name in SECTIONS]
    assert starts == sorted(starts), dict(zip(SECTIONS, starts, strict=True))
    steps = [h for c in notebook[starts[1] : starts[2]] for h in headings_with_level(c) if h == 2]
    assert len(steps) >= 3, "the lesson's steps: at least three headed sections"


def test_what_you_will_learn_lists_three_to_five_points_and_the_cost(notebook):
    text = section_text(notebook, "what you will learn")
    assert 3 <= len(list_items(text)) <= 7, list_items(text)
    assert re.search(r"\b(second|minute|hour)s?\b", text), "what it costs to run"


def test_settings_name_the_learners_knobs_first_and_how_to_change_them(notebook):
    text = section_text(notebook, "settings")
    start, end = section_of(notebook, "settings")
    assert parameters_index(notebook) == end - 1 or parameters_index(notebook) in range(start, end)
    named = [k for k in knobs(notebook) if f"`{k}`" in text]
    assert 2 <= len(named) <= 6 and "preset" in named, named
    assert knobs(notebook)[: len(named)] == named, "the learner's knobs open the parameters cell"
    assert "-p " in text and "papermill" in text.lower(), "how to set them headless"


def test_the_parameters_cell_is_complete_and_collapsed(notebook):
    cell = notebook[parameters_index(notebook)]
    assert cell["metadata"].get("jupyter", {}).get("source_hidden") is True
    assert "preset" in knobs(notebook) and "device" in knobs(notebook)


def _assigned_names(tree: ast.AST) -> set[str]:
    """Names bound at the top level of a cell (functions' and comprehensions' own scopes apart)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            if not isinstance(node, ast.Lambda):
                found.add(node.name)
            return
        if isinstance(node, ast.ListComp | ast.SetComp | ast.DictComp | ast.GeneratorExp):
            return
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            found.add(node.id)
        elif isinstance(node, ast.alias):
            found.add((node.asname or node.name).split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def test_nothing_after_the_parameters_cell_assigns_a_knob(notebook):
    """papermill injects its values right after the parameters cell: they must win."""
    names = set(knobs(notebook))
    for i, cell in enumerate(notebook[parameters_index(notebook) + 1 :]):
        if cell["cell_type"] != "code" or "injected-parameters" in cell["metadata"].get("tags", []):
            continue
        code = "\n".join(
            line for line in source(cell).splitlines() if not line.lstrip().startswith(("%", "!"))
        )
        hit = _assigned_names(ast.parse(code)) & names
        assert not hit, f"cell {i} after the parameters cell assigns {sorted(hit)}"


def test_code_cells_are_short_but_the_parameters_cell(notebook):
    skip = parameters_index(notebook)
    long = {
        i: len(source(c).splitlines())
        for i, c in enumerate(notebook)
        if c["cell_type"] == "code" and i != skip and len(source(c).splitlines()) > LONGEST_CELL
    }
    assert not long, f"cells longer than {LONGEST_CELL} lines: {long}"


def test_the_summary_is_computed_and_the_exercises_name_their_knobs(notebook):
    start, end = section_of(notebook, "summary")
    assert any(c["cell_type"] == "code" for c in notebook[start:end]), "a summary of this run"
    items = list_items(section_text(notebook, "exercises"))
    assert len(items) >= 3, items
    names = set(knobs(notebook))
    for item in items:
        assert set(re.findall(r"`(\w+)", item)) & names, f"an exercise names no knob: {item}"


def test_the_appendix_shows_the_fidelity_table_whole(notebook):
    start, end = section_of(notebook, "fidelity to the seed")
    code = [source(c) for c in notebook[start:end] if c["cell_type"] == "code"]
    assert any("fidelity.show(" in c for c in code), "the appendix renders fidelity.show(...)"
    assert end == len(notebook), "the fidelity appendix closes the notebook"


def outputs_text(cell: dict) -> list[tuple[str, str]]:
    found = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            found.append((out["name"], "".join(out["text"])))
        elif out["output_type"] == "error":
            found.append(("error", f"{out['ename']}: {out['evalue']}"))
        else:
            data = out.get("data", {})
            found.append(
                ("display", "".join(data.get("text/markdown", data.get("text/plain", ""))))
            )
    return found


def test_saved_outputs_hold_no_traceback_and_no_unexplained_warning(notebook):
    prose = "\n".join(source(c) for c in notebook if c["cell_type"] == "markdown")
    for i, cell in enumerate(notebook):
        for name, text in outputs_text(cell):
            assert name != "error" and "Traceback" not in text, f"cell {i}: {text[:300]}"
            for line in text.splitlines() if name == "stderr" else []:
                warning = re.search(r"Warning: (.{20,}?)\s*$", line)
                if warning:
                    said = warning.group(1)[:40]
                    assert said in prose, f"cell {i}: a warning the text does not explain: {line}"


def test_no_word_of_our_own_process(notebook):
    for i, cell in enumerate(notebook):
        texts = [source(cell)] + [t for _, t in outputs_text(cell)]
        for text in texts:
            hit = PROCESS_WORDS.search(text)
            assert not hit, f"cell {i}: {text[max(0, hit.start() - 40) : hit.end() + 40]!r}"


def test_at_most_one_progress_line_per_run(notebook):
    for i, cell in enumerate(notebook):
        seen: dict[str, int] = {}
        for _, text in outputs_text(cell):
            for line in text.splitlines():
                if match := PROGRESS_LINE.match(line):
                    seen[match["desc"]] = seen.get(match["desc"], 0) + 1
        repeated = {d: n for d, n in seen.items() if n > 1}
        assert not repeated, f"cell {i}: progress lines per bar {repeated}"
