"""Execute the book's chapters in place (only those whose code changed) and render the book.

Used by `make book`. Chapters run in reading order, as listed in _quarto.yml, in the profile given by
$SEPREFORMER_PROFILE (default `book`). A chapter is re-executed when its own code cells, the modules it can import
(those of its own and earlier chapters: modules import only downward) or the profile changed since it was last
executed. That is decided from the committed notebook itself: each executed chapter records the digest of what it ran
in its metadata (`book.digest`), so a fresh clone whose committed outputs are current executes nothing.
With Quarto on PATH the website is rendered with `quarto render`; without it an HTML preview is written to _preview/.
"""
import argparse
import hashlib
import html
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import yaml
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
PREVIEW = ROOT / "_preview"


def chapter_paths() -> list[Path]:
    """Notebooks in reading order, from _quarto.yml: its chapters, then its appendices."""
    book = yaml.safe_load((ROOT / "_quarto.yml").read_text())["book"]
    return [ROOT / c for c in [*book["chapters"], *book.get("appendices", [])] if c.endswith(".ipynb")]


def chapter_number(path: Path) -> int:
    return int(path.name.split("_", 1)[0])


def library_digest(upto: int) -> str:
    """Digest of the modules a chapter numbered `upto` can use: those generated from chapters numbered up to it."""
    digest = hashlib.sha256()
    for path in sorted((ROOT / "sepreformer_book").glob("*.py")):
        if path.name == "_modidx.py":
            continue  # nbdev's index of names for documentation links: no chapter runs it
        source = path.read_text()
        made_by = re.search(r"File to edit: \.\./chapters/(\d+)_", source.split("\n", 1)[0])
        if made_by is None or int(made_by.group(1)) <= upto:  # __init__.py counts for every chapter
            digest.update(path.name.encode() + source.encode())
    return digest.hexdigest()


def chapter_digest(path: Path, profile: str) -> str:
    """What a chapter's committed outputs depend on: its code cells, the modules it can import, the profile."""
    notebook = nbformat.read(path, as_version=4)
    digest = hashlib.sha256(f"{library_digest(chapter_number(path))}:{profile}".encode())
    for cell in notebook.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode() + b"\0")
    return digest.hexdigest()


def recorded_digest(path: Path) -> str | None:
    return nbformat.read(path, as_version=4).metadata.get("book", {}).get("digest")


def stamp(path: Path, profile: str) -> None:
    """Record in the notebook that its outputs are those of its current code, modules and profile."""
    notebook = nbformat.read(path, as_version=4)
    notebook.metadata["book"] = {"digest": chapter_digest(path, profile), "profile": profile}
    nbformat.write(notebook, path)


def execute(path: Path, profile: str) -> None:
    notebook = nbformat.read(path, as_version=4)
    os.environ["SEPREFORMER_PROFILE"] = profile
    client = NotebookClient(notebook, timeout=None, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    try:
        client.execute()
    except CellExecutionError as error:
        print(f"\nChapter {path.name} failed; the error of the failing cell:\n{error}", file=sys.stderr)
        raise SystemExit(1)
    tidy(notebook)
    nbformat.write(notebook, path)
    stamp(path, profile)


def tidy(notebook: nbformat.NotebookNode) -> None:
    """Drop what would make the committed notebook differ from run to run or render badly: per-cell execution
    timestamps, and the pixel sizes IPython attaches to some figures (a fixed width overflows the page's column)."""
    for cell in notebook.cells:
        cell.metadata.pop("execution", None)
        for output in cell.get("outputs", []):
            for mime, meta in output.get("metadata", {}).items():
                if mime.startswith("image/") and isinstance(meta, dict):
                    meta.pop("width", None)
                    meta.pop("height", None)


def run_chapters(profile: str, force: bool) -> None:
    chapters = chapter_paths()
    for number, path in enumerate(chapters, start=1):
        if not path.exists():
            raise SystemExit(f"_quarto.yml lists {path.relative_to(ROOT)}, which does not exist.")
        label = f"[{number}/{len(chapters)}] {path.name}"
        if not force and recorded_digest(path) == chapter_digest(path, profile):
            print(f"{label}: current, not re-executed", flush=True)
            continue
        print(f"{label}: executing in the {profile} profile ...", end=" ", flush=True)
        start = time.perf_counter()
        execute(path, profile)
        print(f"{time.perf_counter() - start:.0f} s", flush=True)


def write_preview() -> Path:
    """nbconvert HTML for every chapter, with an index page in reading order."""
    import mistune
    from nbconvert import HTMLExporter

    PREVIEW.mkdir(exist_ok=True)
    exporter = HTMLExporter(template_name="lab")
    links = []
    for path in chapter_paths():
        body, _ = exporter.from_filename(str(path))
        target = PREVIEW / f"{path.stem}.html"
        target.write_text(body)
        first = nbformat.read(path, as_version=4).cells[0].source.splitlines()
        heading = re.match(r"# (.+?)\s*(\{#sec-[\w-]+\})?\s*$", first[0]) if first else None
        title = heading.group(1) if heading else path.stem  # the chapter's labelled H1
        links.append(f'<li><a href="{target.name}">{html.escape(title)}</a></li>')
    preface = mistune.html((ROOT / "index.qmd").read_text().replace("{.unnumbered}", ""))
    page = ("<!doctype html><meta charset='utf-8'><title>SepReformer from scratch (preview)</title>"
            "<body style='max-width:50em;margin:auto;font-family:sans-serif'>"
            "<p><em>Preview without Quarto: chapters rendered by nbconvert; citations appear as keys.</em></p>"
            f"{preface}<h2>Chapters</h2><ol>{''.join(links)}</ol></body>")
    (PREVIEW / "index.html").write_text(page)
    return PREVIEW / "index.html"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="re-execute every chapter (make book FORCE=1)")
    parser.add_argument("--stamp", nargs="+", metavar="CHAPTER", default=None,
                        help="record that these chapters' committed outputs are current, without executing them (only "
                             "right after executing them in the profile by other means, e.g. nbconvert)")
    parser.add_argument("--no-render", action="store_true", help="execute only")
    args = parser.parse_args()
    profile = os.environ.get("SEPREFORMER_PROFILE", "book")
    if args.stamp:
        for name in args.stamp:
            stamp(ROOT / "chapters" / Path(name).name, profile)
        return
    run_chapters(profile, args.force)
    if args.no_render:
        return
    quarto = shutil.which("quarto")
    if quarto:
        subprocess.run([quarto, "render"], cwd=ROOT, check=True)
        print(f"Book rendered: {ROOT / '_book' / 'index.html'}")
    else:
        index = write_preview()
        print(f"Quarto is not installed, so the website was not rendered; an HTML preview is at {index}.\n"
              "To render the real book, install Quarto: `conda env create -f environment.yml` (conda-forge has it),\n"
              "or `pip install quarto-cli` on a machine with internet access, or https://quarto.org; then `make book`.")


if __name__ == "__main__":
    main()
