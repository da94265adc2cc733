"""Execute the book's chapters in place (only those whose code changed) and render the book.

Used by `make book`. Chapters run in reading order, as listed in _quarto.yml, in the profile given by
$SEPREFORMER_PROFILE (default `book`). A chapter is re-executed when its own code cells, the library it imports
(sepreformer_book/*.py) or the profile changed since its last successful run (state in .book-state.json).
With Quarto on PATH the website is rendered with `quarto render`; without it an HTML preview is written to _preview/.
"""
import argparse
import hashlib
import html
import json
import os
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
STATE = ROOT / ".book-state.json"
PREVIEW = ROOT / "_preview"


def chapter_paths() -> list[Path]:
    """Notebooks in reading order, from _quarto.yml."""
    config = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    return [ROOT / c for c in config["book"]["chapters"] if c.endswith(".ipynb")]


def library_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted((ROOT / "sepreformer_book").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def chapter_digest(notebook: nbformat.NotebookNode, library: str, profile: str) -> str:
    digest = hashlib.sha256(f"{library}:{profile}".encode())
    for cell in notebook.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode() + b"\0")
    return digest.hexdigest()


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
    for cell in notebook.cells:  # per-cell timestamps would make every re-run a diff
        cell.metadata.pop("execution", None)
    nbformat.write(notebook, path)


def run_chapters(profile: str, force: bool) -> None:
    state = json.loads(STATE.read_text()) if STATE.exists() else {}
    library = library_digest()
    chapters = chapter_paths()
    for number, path in enumerate(chapters, start=1):
        if not path.exists():
            raise SystemExit(f"_quarto.yml lists {path.relative_to(ROOT)}, which does not exist.")
        digest = chapter_digest(nbformat.read(path, as_version=4), library, profile)
        label = f"[{number}/{len(chapters)}] {path.name}"
        if not force and state.get(path.name) == digest:
            print(f"{label}: unchanged, not re-executed", flush=True)
            continue
        print(f"{label}: executing in the {profile} profile ...", end=" ", flush=True)
        start = time.perf_counter()
        execute(path, profile)
        print(f"{time.perf_counter() - start:.0f} s", flush=True)
        state[path.name] = digest
        STATE.write_text(json.dumps(state, indent=1))


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
        title = path.stem
        front = nbformat.read(path, as_version=4).cells[0].source
        for line in front.splitlines():
            if line.startswith("title:"):
                title = line.split(":", 1)[1].strip().strip('"')
                break
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
    parser.add_argument("--force", action="store_true", help="re-execute every chapter")
    parser.add_argument("--no-render", action="store_true", help="execute only")
    args = parser.parse_args()
    profile = os.environ.get("SEPREFORMER_PROFILE", "book")
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
