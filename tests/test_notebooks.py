"""Hygiene of chapters/*.ipynb: what Quarto, nbval and the export step rely on."""
import io
import json
import re
import tokenize
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "chapters").glob("*.ipynb"))
MAX_NOTEBOOK_BYTES = 4_000_000
# The rendered page shows this many characters of a code line; a longer one scrolls sideways or wraps (`#|` option
# lines are Quarto's, not the reader's, and are left alone).
PAGE_WIDTH = 100
# A chapter's first cell is a markdown cell whose first line is its title with a label, `# Title {#sec-label}`: Quarto
# takes the chapter's title from its first H1, and the label makes `@sec-label` a cross-reference to it.
TITLE_LINE = re.compile(r"^# .+ \{#sec-[a-z0-9-]+\}\s*$")
TITLE_LABEL = re.compile(r"\{#sec-([a-z0-9-]+)\}")
# A chapter named by its number ("chapter 5", "Chapters 2-5", "chapter 08") goes stale when chapters move.
CHAPTER_BY_NUMBER = re.compile(r"\b[Cc]hapters? \d+")
# A hand-typed author-year citation ("Nakamura et al., 2023", "(Luo et al. 2020)"): cite with [@key] instead.
TYPED_CITATION = re.compile(r"\b[A-Z][A-Za-z-]+ (?:et al\.|and [A-Z][A-Za-z-]+),? \(?(?:19|20)\d\d\b")
# On stderr, a warning or a progress bar (a command's own one-line messages there are fine).
NOISE = re.compile(r"[Ww]arning\b|\d+%\|")
# An absolute path of the machine that executed the notebook, in a committed output.
MACHINE_PATH = re.compile(r"(?<![\w.~])/(?:tmp|work|home|root|Users|private|var/folders)/")
# A cross-reference in prose: @sec-label (a trailing "-" or "." belongs to the sentence, not the label).
CROSS_REFERENCE = re.compile(r"(?<![\w@])@sec-([a-z0-9]+(?:-[a-z0-9]+)*)")


def _outside_fences(markdown: str) -> list[str]:
    """The lines of a markdown text that are not inside ``` fenced code blocks."""
    lines, fenced = [], False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _code_text(source: str) -> list[str]:
    """The comments and string literals (docstrings, printed text) of a code cell: where prose lives in code."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return [line[line.index("#"):] for line in source.splitlines() if "#" in line]  # comments, roughly
    kinds = {tokenize.COMMENT, tokenize.STRING} | {getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}
    return [token.string for token in tokens if token.type in kinds]


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
    title = first.source.lstrip("\n").split("\n", 1)[0] if first is not None and first.cell_type == "markdown" else ""
    if not TITLE_LINE.match(title):
        problems.append(f"{path.name}: the first cell must be a markdown cell whose first line is "
                        "'# <title> {#sec-<label>}' (Quarto's chapter title, and the target of @sec-<label>)")
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
        if cell.cell_type == "markdown":
            prose = _outside_fences(cell.source)
            if index > 0 and any(re.match(r"#\s", line) for line in prose):
                problems.append(f"{where}: a second H1; the chapter's title in the first cell is its only one")
        elif cell.cell_type == "code":
            prose = _code_text(cell.source)
        else:
            prose = []
        for match in sorted({m.group(0) for text in prose for m in CHAPTER_BY_NUMBER.finditer(text)}):
            problems.append(f"{where}: names a chapter by number ({match!r}); use @sec-<label> (in code, the "
                            "chapter's title)")
        if cell.cell_type == "markdown":
            for match in sorted({m.group(0) for line in prose for m in TYPED_CITATION.finditer(line)}):
                problems.append(f"{where}: a citation typed by hand ({match!r}); cite with [@key] from references.bib")
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
            text = output.get("text", "") + "".join(v for k, v in data.items() if k.startswith("text/")
                                                   and isinstance(v, str))
            if output.output_type == "stream" and "\r" in text:
                problems.append(f"{where}: a carriage-return progress dump; show at most a one-line summary of a loop")
            if output.output_type == "stream" and output.get("name") == "stderr" and NOISE.search(text):
                problems.append(f"{where}: a warning or a progress bar on stderr ({text.strip()[:80]!r})")
            for match in sorted({m.group(0) for m in MACHINE_PATH.finditer(text)}):
                problems.append(f"{where}: an absolute path of this machine ({match!r}...) in an output; print paths "
                                "relative to the project or the data root")
            sized = output.get("metadata", {})
            if any(isinstance(v, dict) and "width" in v for v in sized.values()) or re.search(
                    r"<img[^>]*\bwidth=", data.get("text/html", "") if isinstance(data.get("text/html"), str) else ""):
                problems.append(f"{where}: a figure with a fixed width; let figures scale with the column")
    code = [c for c in notebook.cells if c.cell_type == "code" and c.source.strip()]
    if code and all(c.execution_count is None for c in code):
        problems.append(f"{path.name}: not executed (the book shows committed outputs)")
    if path.stat().st_size > MAX_NOTEBOOK_BYTES:
        problems.append(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB, over {MAX_NOTEBOOK_BYTES / 1e6:.0f} MB")
    return problems


def long_code_lines(path: Path) -> list[str]:
    """The lines of a notebook's code cells longer than PAGE_WIDTH characters, named by notebook, cell id and line."""
    notebook = nbformat.read(path, as_version=4)
    return [f"{path.name} cell {cell.get('id', index)} line {number}: {len(line)} characters: {line[:60]!r}..."
            for index, cell in enumerate(notebook.cells) if cell.cell_type == "code"
            for number, line in enumerate(cell.source.splitlines(), start=1)
            if len(line) > PAGE_WIDTH and not line.startswith("#|")]


def long_output_lines(path: Path) -> list[str]:
    """The lines of a notebook's printed and displayed text outputs longer than PAGE_WIDTH characters, named by
    notebook and cell id: the page shows them cut off or behind a sideways scroll."""
    notebook = nbformat.read(path, as_version=4)
    long = []
    for index, cell in enumerate(notebook.cells):
        for output in cell.get("outputs", []):
            text = output.get("text") or output.get("data", {}).get("text/plain", "")
            long += [f"{path.name} cell {cell.get('id', index)}: {len(line)} characters: {line[:60]!r}..."
                     for line in str(text).splitlines() if len(line) > PAGE_WIDTH]
    return long


def test_there_are_chapters():
    assert CHAPTERS, "chapters/ holds no notebooks"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_is_clean(path):
    assert notebook_problems(path) == []


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_code_lines_fit_the_page(path):
    long = long_code_lines(path)
    assert long == [], (f"code lines longer than {PAGE_WIDTH} characters (the rendered page's width); split them, "
                        f"e.g. with `ruff format --line-length {PAGE_WIDTH}`: {long}")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_output_lines_fit_the_page(path):
    long = long_output_lines(path)
    assert long == [], (f"printed lines longer than {PAGE_WIDTH} characters (the rendered page's width); wrap them, "
                        f"e.g. with textwrap.fill(text, {PAGE_WIDTH}), or split the print: {long}")


def _book_files(entries) -> list[str]:
    """The files of a `book.chapters` or `book.appendices` list, in order: plain paths, and those of `part:` groups."""
    files = []
    for entry in entries or []:
        if isinstance(entry, str):
            files.append(entry)
        elif isinstance(entry, dict):
            files += [entry["part"]] if str(entry.get("part", "")).endswith((".qmd", ".md", ".ipynb")) else []
            files += _book_files(entry.get("chapters"))
    return files


def test_reference_lists_have_a_heading():
    assert yaml.safe_load((ROOT / "_quarto.yml").read_text()).get("reference-section-title"), (
        "set reference-section-title in _quarto.yml: without it a chapter's cited works follow its text unheaded")


def test_quarto_lists_exactly_the_chapters():
    book = yaml.safe_load((ROOT / "_quarto.yml").read_text())["book"]
    chapters, appendices = _book_files(book.get("chapters")), _book_files(book.get("appendices"))
    missing = [c for c in chapters + appendices if not (ROOT / c).exists()]
    assert missing == [], f"_quarto.yml lists files that do not exist: {missing}"
    notebooks = {name: [c for c in files if c.endswith(".ipynb")]
                 for name, files in (("chapters", chapters), ("appendices", appendices))}
    listed = notebooks["chapters"] + notebooks["appendices"]
    twice = sorted({c for c in listed if listed.count(c) > 1})
    assert twice == [], f"notebooks listed more than once in _quarto.yml: {twice}"
    unlisted = sorted({f"chapters/{p.name}" for p in CHAPTERS} - set(listed))
    assert unlisted == [], f"notebooks missing from _quarto.yml (book.chapters or book.appendices): {unlisted}"
    for name, files in notebooks.items():
        assert files == sorted(files), f"book.{name} must list its notebooks in reading (file-name) order"


def _chapter_labels() -> dict[str, str]:
    """Each chapter's label (from `# Title {#sec-label}` in its first cell) -> the notebook that defines it."""
    labels = {}
    for path in CHAPTERS:
        cells = nbformat.read(path, as_version=4).cells
        first = cells[0].source.lstrip("\n").split("\n", 1)[0] if cells and cells[0].cell_type == "markdown" else ""
        for label in TITLE_LABEL.findall(first):
            assert label not in labels, f"sec-{label} is the label of both {labels[label]} and {path.name}"
            labels[label] = path.name
    return labels


def _cross_references(text: str) -> set[str]:
    return set(CROSS_REFERENCE.findall(text))


def test_every_cross_reference_has_a_target():
    """Every @sec-label in a chapter's prose (code cells aside) or in index.qmd is some chapter's title label."""
    labels = _chapter_labels()
    used = {"index.qmd": _cross_references((ROOT / "index.qmd").read_text())}
    for path in CHAPTERS:
        cells = nbformat.read(path, as_version=4).cells
        used[path.name] = set().union(*(_cross_references(c.source) for c in cells if c.cell_type == "markdown"))
    dangling = {name: sorted(refs - set(labels)) for name, refs in used.items() if refs - set(labels)}
    assert dangling == {}, f"cross-references without a chapter of that label (defined: {sorted(labels)}): {dangling}"


def test_index_names_no_chapter_by_number():
    named = CHAPTER_BY_NUMBER.findall("\n".join(_outside_fences((ROOT / "index.qmd").read_text())))
    assert named == [], f"index.qmd names chapters by number {named}; use @sec-<label>"


def test_each_chapter_exports_one_module():
    for path in CHAPTERS:
        first_code = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
        assert re.match(r"#\| default_exp: \w+", first_code.source), f"{path.name}: first code cell must be '#| default_exp: <module>'"


def _write(tmp_path, cells):
    notebook = nbformat.v4.new_notebook(cells=cells)
    path = tmp_path / "99_probe.ipynb"
    nbformat.write(notebook, path)
    return path


def test_hygiene_wants_a_labelled_title(tmp_path):
    code = nbformat.v4.new_code_cell("x = 1", execution_count=1)
    wants_title = lambda first: any("first cell" in p for p in notebook_problems(_write(tmp_path, [first, code])))
    assert not wants_title(nbformat.v4.new_markdown_cell("# Probe: a title {#sec-probe}"))
    assert not wants_title(nbformat.v4.new_markdown_cell("# Probe {#sec-probe-2}\n\nThe chapter's first words."))
    assert wants_title(nbformat.v4.new_markdown_cell("# Probe"))  # an H1 without a label
    assert wants_title(nbformat.v4.new_markdown_cell("## Probe {#sec-probe}"))  # not an H1
    assert wants_title(nbformat.v4.new_markdown_cell("Intro.\n\n# Probe {#sec-probe}"))  # not the first line
    assert wants_title(nbformat.v4.new_raw_cell("# Probe {#sec-probe}"))  # a raw cell
    assert wants_title(nbformat.v4.new_raw_cell('---\ntitle: "Probe"\n---'))  # the old raw front matter


def test_hygiene_catches_a_second_h1(tmp_path):
    title = nbformat.v4.new_markdown_cell("# Probe {#sec-probe}")
    fenced = nbformat.v4.new_markdown_cell("```bash\n# a shell comment, not a heading\n```")
    assert not any("H1" in p for p in notebook_problems(_write(tmp_path, [title, fenced])))
    second = nbformat.v4.new_markdown_cell("# Another title")
    assert any("second H1" in p for p in notebook_problems(_write(tmp_path, [title, second])))


def test_hygiene_catches_chapters_named_by_number(tmp_path):
    title = nbformat.v4.new_markdown_cell("# Probe {#sec-probe}")
    by_number = lambda cell: any("by number" in p for p in notebook_problems(_write(tmp_path, [title, cell])))
    assert by_number(nbformat.v4.new_markdown_cell("As we saw, see chapter 3 for the encoder."))
    assert by_number(nbformat.v4.new_markdown_cell("Chapters 2–5 build the model."))
    assert by_number(nbformat.v4.new_code_cell("x = 1  # built in chapter 08", execution_count=1))
    assert by_number(nbformat.v4.new_code_cell('print("see Chapter 7")', execution_count=1))
    assert not by_number(nbformat.v4.new_markdown_cell("See @sec-conv; the chapters of this book; chapters/03_conv.ipynb."))
    assert not by_number(nbformat.v4.new_code_cell("chapter = 3  # built in the training chapter", execution_count=1))


def test_cross_references_are_read_from_prose():
    text = "See @sec-dual-path. Or [@sec-model; @sec-conv], e.g. a mail@sec-x.org and {#sec-defined}."
    assert _cross_references(text) == {"dual-path", "model", "conv"}


def test_long_code_lines_are_caught(tmp_path):
    title = nbformat.v4.new_markdown_cell("# Probe {#sec-probe}")
    fits = nbformat.v4.new_code_cell("#| export: true\nx = 1\n" + "y = " + "1" * (PAGE_WIDTH - 4), execution_count=1)
    fits.id = "fits"
    too_long = nbformat.v4.new_code_cell("x = 1\n# " + "a" * (PAGE_WIDTH - 1), execution_count=2)
    too_long.id = "too-long"
    option = nbformat.v4.new_code_cell("#| fig-cap: " + "a" * PAGE_WIDTH + "\nx = 1", execution_count=3)
    prose = nbformat.v4.new_markdown_cell("a" * (2 * PAGE_WIDTH))
    assert long_code_lines(_write(tmp_path, [title, fits, option, prose])) == []
    long = long_code_lines(_write(tmp_path, [title, fits, too_long]))
    assert len(long) == 1 and "99_probe.ipynb cell too-long line 2: 101 characters" in long[0], long


def test_long_output_lines_are_caught(tmp_path):
    title = nbformat.v4.new_markdown_cell("# Probe {#sec-probe}")
    fits = nbformat.v4.new_code_cell("print('a' * 100)", execution_count=1)
    fits.outputs = [nbformat.v4.new_output("stream", name="stdout", text="a" * PAGE_WIDTH + "\n")]
    too_long = nbformat.v4.new_code_cell("print('a' * 101)", execution_count=2)
    too_long.id = "too-long"
    too_long.outputs = [nbformat.v4.new_output("execute_result", data={"text/plain": "b" * (PAGE_WIDTH + 1)},
                                               execution_count=2)]
    assert long_output_lines(_write(tmp_path, [title, fits])) == []
    long = long_output_lines(_write(tmp_path, [title, fits, too_long]))
    assert len(long) == 1 and "99_probe.ipynb cell too-long: 101 characters" in long[0], long


def test_hygiene_catches_bare_directive(tmp_path):
    cell = nbformat.v4.new_code_cell("#| export\nx = 1", execution_count=1)
    assert any("directive" in p for p in notebook_problems(_write(tmp_path, [cell])))


def test_hygiene_catches_outputs_without_count(tmp_path):
    cell = nbformat.v4.new_code_cell("print(1)")
    cell.outputs = [nbformat.v4.new_output("stream", text="1\n")]
    assert any("no execution count" in p for p in notebook_problems(_write(tmp_path, [cell])))


def test_hygiene_catches_output_defects(tmp_path):
    title = nbformat.v4.new_markdown_cell("# Probe {#sec-probe}")
    planted = {
        "progress dump": nbformat.v4.new_output("stream", name="stdout", text="step 1\rstep 2\rstep 3\n"),
        "stderr": nbformat.v4.new_output("stream", name="stderr", text="x.py:3: UserWarning: something\n"),
        "absolute path": nbformat.v4.new_output("stream", name="stdout", text="wrote /tmp/tmpab12/x.wav\n"),
        "fixed width": nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo="},
                                              metadata={"image/png": {"width": 1200}}),
    }
    expected = {"progress dump": "carriage-return", "stderr": "a warning or a progress bar", "absolute path": "absolute path",
                "fixed width": "fixed width"}
    for name, output in planted.items():
        cell = nbformat.v4.new_code_cell("x = 1", execution_count=1)
        cell.outputs = [output]
        problems = notebook_problems(_write(tmp_path, [title, cell]))
        assert any(expected[name] in p for p in problems), (name, problems)
    clean = nbformat.v4.new_code_cell("x = 1", execution_count=1)
    clean.outputs = [nbformat.v4.new_output("stream", name="stdout", text="wrote data/x.wav\n")]
    assert notebook_problems(_write(tmp_path, [title, clean])) == []
    typed = nbformat.v4.new_markdown_cell("As Nakamura et al., 2023 show, and (Luo et al. 2020) too.")
    assert sum("typed by hand" in p for p in notebook_problems(_write(tmp_path, [title, typed]))) == 2


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


def test_committed_outputs_are_current():
    """Every chapter's committed outputs come from its current code and modules in the book profile: the digest
    `make book` records when it executes a chapter matches (so a fresh clone's `make book` executes nothing)."""
    import sys

    sys.path.insert(0, str(ROOT / "tools"))
    import book

    stale = [path.name for path in CHAPTERS if book.recorded_digest(path) != book.chapter_digest(path, "book")]
    assert stale == [], f"re-execute these chapters with `make book` before committing: {stale}"
