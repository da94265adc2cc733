"""The committed library must be exactly what the notebooks export (nbdev), and this check must be able to fail."""
import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
NBDEV_EXPORT = Path(sys.executable).with_name("nbdev-export")


def copy_project(target: Path) -> Path:
    for name in ("chapters", "sepreformer_book"):
        shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints"))
    shutil.copy(ROOT / "pyproject.toml", target / "pyproject.toml")
    return target


def export_drift(project: Path) -> list[str]:
    """Files of sepreformer_book/ that a fresh export would change, add or remove."""
    before = project / "committed"
    shutil.copytree(project / "sepreformer_book", before)
    subprocess.run([str(NBDEV_EXPORT)], cwd=project, check=True, capture_output=True)
    after = project / "sepreformer_book"
    names = {p.name for p in before.glob("*.py")} | {p.name for p in after.glob("*.py")}
    return sorted(n for n in names
                  if not (before / n).exists() or not (after / n).exists()
                  or not filecmp.cmp(before / n, after / n, shallow=False))


def test_committed_modules_match_the_notebooks(tmp_path):
    drift = export_drift(copy_project(tmp_path))
    assert drift == [], f"sepreformer_book/ differs from the notebooks' export in {drift}: run `make export` and commit"


def test_drift_is_detected_when_a_notebook_changes(tmp_path):
    project = copy_project(tmp_path)
    chapter = project / "chapters" / "00_config.ipynb"
    notebook = nbformat.read(chapter, as_version=4)
    cell = nbformat.v4.new_code_cell("#| export: true\nDRIFT_PROBE = 1")
    cell.id = "driftprobe"
    notebook.cells.append(cell)
    nbformat.write(notebook, chapter)
    assert export_drift(project) != []


def test_every_module_names_its_notebook():
    for module in (ROOT / "sepreformer_book").glob("*.py"):
        if module.name.startswith("_"):
            continue
        assert "File to edit: ../chapters/" in module.read_text().splitlines()[0], f"{module.name} was not generated"
