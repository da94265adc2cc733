"""Hygiene of chapters/*.ipynb: what Quarto, nbval and the export step rely on."""
import json
import re
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
MAX_NOTEBOOK_BYTES = 4_000_000


def notebook_problems(path: Path) -> list[str]:
    """Everything wrong with one notebook, as readable sentences (empty when it is clean)."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        return [f"{path.name}: not valid JSON ({error})"]
    try:
        notebook = nbformat.reads(json.dumps(raw), as_version=4)
        nbformat.validate(notebook)
    except nbformat.ValidationError as error:
        return [f"{path.name}: not a valid nbformat notebook ({error.message})"]
    problems = []
    first = notebook.cells[0] if notebook.cells else None
    front = first.source.strip() if first is not None and first.cell_type == "raw" else ""
    if not (front.startswith("---") and front.endswith("---")
            and "title" in (yaml.safe_load(front.strip("-")) or {})):
        problems.append(f"{path.name}: the first cell must be a raw cell of YAML front matter with a title (Quarto)")
    if (notebook.nbformat, notebook.nbformat_minor) < (4, 5):
        problems.append(f"{path.name}: nbformat {notebook.nbformat}.{notebook.nbformat_minor} has no cell ids; need 4.5")
    for index, cell in enumerate(notebook.cells):
        where = f"{path.name} cell {index}"
        if "id" not in cell:
            problems.append(f"{where}: no cell id")
        for line in cell.source.splitlines():
            if line.startswith("#|"):
                try:
                    parsed = yaml.safe_load(line[2:])
                except yaml.YAMLError:
                    parsed = None
                if not isinstance(parsed, dict):
                    problems.append(f"{where}: directive {line!r} is not a YAML 'key: value' line")
        if cell.cell_type != "code":
            continue
        if cell.outputs and cell.execution_count is None:
            problems.append(f"{where}: has outputs but no execution count")
        for output in cell.outputs:
            if output.output_type == "error":
                problems.append(f"{where}: committed error output ({output.get('ename')})")
            data = output.get("data", {})
            if any("widget" in mime for mime in data):
                problems.append(f"{where}: widget output (static HTML and nbval cannot show it)")
    code = [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()]
    if code and all(c.execution_count is None for c in code):
        problems.append(f"{path.name}: not executed (the book shows committed outputs)")
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        problems.append(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB, over {MAX_NOTEBOOK_BYTES / 1e6:.0f} MB")
    return problems


def test_there_are_chapters():
    assert CHAPTERS, "chapters/ holds no notebooks"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_is_clean(path):
    assert notebook_problems(path) == []


def test_quarto_lists_exactly_the_chapters():
    listed = [c for c in yaml.safe_load((ROOT / "_quarto.yml").read_text())["book"]["chapters"]]
    notebooks = [c for c in listed if c.endswith(".ipynb")]
    missing = [c for c in listed if not (ROOT / c).exists()]
    assert missing == [], f"_quarto.yml lists files that do not exist: {missing}"
    unlisted = sorted({f"chapters/{p.name}" for p in CHAPTERS} - set(notebooks))
    assert unlisted == [], f"notebooks missing from _quarto.yml: {unlisted}"
    assert notebooks == sorted(notebooks), "chapters must be listed in reading (file-name) order"


def test_each_chapter_exports_one_module():
    for path in CHAPTERS:
        first_code = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert re.match(r"#\| default_exp: \w+", first_code.source), f"{path.name}: first code cell must be '#| default_exp: <module>'"


def _write(tmp_path, cells):
    notebook = nbformat.v4.new_notebook(cells=cells)
    path = tmp_path / "99_probe.ipynb"
    nbformat.write(notebook, path)
    return path


def test_hygiene_wants_front_matter_with_a_title(tmp_path):
    titled = nbformat.v4.new_raw_cell('---\ntitle: "Probe"\n---')
    code = nbformat.v4.new_code_cell("x = 1", execution_count=1)
    assert not any("front matter" in p for p in notebook_problems(_write(tmp_path, [titled, code])))
    as_markdown = nbformat.v4.new_markdown_cell('---\ntitle: "Probe"\n---')
    assert any("front matter" in p for p in notebook_problems(_write(tmp_path, [as_markdown, code])))
    untitled = nbformat.v4.new_raw_cell("---\nauthor: someone\n---")
    assert any("front matter" in p for p in notebook_problems(_write(tmp_path, [untitled, code])))


def test_hygiene_catches_bare_directive(tmp_path):
    cell = nbformat.v4.new_code_cell("#| export\nx = 1", execution_count=1)
    assert any("directive" in p for p in notebook_problems(_write(tmp_path, [cell])))


def test_hygiene_catches_outputs_without_count(tmp_path):
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    assert any("no execution count" in p for p in notebook_problems(_write(tmp_path, [cell])))


def test_hygiene_catches_error_outputs_and_widgets(tmp_path):
    error = nbformat.v4.new_code_cell("1/0", execution_count=1)
    error.outputs = [nbformat.v4.new_output("error", ename="ZeroDivisionError", evalue="", traceback=[])]
    widget = nbformat.v4.new_code_cell("w", execution_count=2)
    widget.outputs = [nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {}})]
    problems = notebook_problems(_write(tmp_path, [error, widget]))
    assert any("error output" in p for p in problems) and any("widget" in p for p in problems)


def test_hygiene_catches_unexecuted_and_invalid_json(tmp_path):
    path = _write(tmp_path, [nbformat.v4.new_code_cell("x = 1")])
    assert any("not executed" in p for p in notebook_problems(path))
    path.write_text("{not json")
    assert any("not valid JSON" in p for p in notebook_problems(path))
