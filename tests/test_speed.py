"""sepreformer_book.speed: finding and reading the saved benchmark results the speed appendix plots."""
import json
import re
from pathlib import Path

import nbformat
import pytest

from sepreformer_book.speed import BENCHMARKS_ENV, load_benchmark, results_dir

ROOT = Path(__file__).resolve().parents[1]
APPENDIX = ROOT / "chapters" / "14_speed.ipynb"


def test_results_dir_follows_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv(BENCHMARKS_ENV, str(tmp_path / "elsewhere"))
    assert results_dir(ROOT) == tmp_path / "elsewhere"  # taken as given, even before it exists


def test_results_dir_walks_up_to_the_first_benchmarks_results(tmp_path, monkeypatch):
    monkeypatch.delenv(BENCHMARKS_ENV, raising=False)
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    deep = tmp_path / "chapters" / "sub"
    deep.mkdir(parents=True)
    assert results_dir(deep) == (tmp_path / "benchmarks" / "results").resolve()
    monkeypatch.chdir(deep)
    assert results_dir() == (tmp_path / "benchmarks" / "results").resolve()


def test_results_dir_names_the_folder_it_could_not_find(tmp_path, monkeypatch):
    monkeypatch.delenv(BENCHMARKS_ENV, raising=False)
    if any((folder / "benchmarks" / "results").is_dir() for folder in tmp_path.resolve().parents):
        pytest.skip("a benchmarks/results folder exists above the temporary directory")
    with pytest.raises(FileNotFoundError, match=r"benchmarks/results") as error:
        results_dir(tmp_path)
    assert str(tmp_path.resolve()) in str(error.value)
    assert BENCHMARKS_ENV in str(error.value)


def test_load_benchmark_reads_the_json_file(tmp_path):
    saved = {"date": "2026-01-01T00:00:00+00:00", "rows": [{"name": "a", "gflops_per_s": 1.5}]}
    (tmp_path / "probe.json").write_text(json.dumps(saved))
    assert load_benchmark("probe", tmp_path) == saved


def test_load_benchmark_uses_results_dir_by_default(tmp_path, monkeypatch):
    monkeypatch.setenv(BENCHMARKS_ENV, str(tmp_path))
    (tmp_path / "probe.json").write_text('{"value": 3}')
    assert load_benchmark("probe") == {"value": 3}


def test_a_missing_result_names_the_script_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"benchmarks/bench_nothing_here\.py --save") as error:
        load_benchmark("nothing_here", tmp_path)
    assert "nothing_here.json" in str(error.value)


def _benchmarks_loaded_by_the_appendix() -> list[str]:
    cells = nbformat.read(APPENDIX, as_version=4).cells
    code = "\n".join(cell.source for cell in cells if cell.cell_type == "code")
    return re.findall(r"""load_benchmark\(\s*["']([^"']+)["']""", code)


def test_the_appendix_reads_saved_results():
    assert _benchmarks_loaded_by_the_appendix(), "the speed appendix loads no saved benchmark result"


@pytest.mark.parametrize("name", sorted(set(_benchmarks_loaded_by_the_appendix())))
def test_every_result_the_appendix_loads_is_saved(name):
    path = ROOT / "benchmarks" / "results" / f"{name}.json"
    assert path.is_file(), f"chapters/14_speed.ipynb loads {name!r}, but {path.relative_to(ROOT)} is missing"
    json.loads(path.read_text())  # and it is valid JSON
