"""The library's layout: one module per chapter, imports only downward, one place for each profile number, and the
shipped model's outputs unchanged by refactoring."""
import ast
import re
from dataclasses import fields
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from sepreformer_book.config import PROFILES
from sepreformer_book.model import PRESETS, ModelConfig, model_config_for
from sepreformer_book.training import RunConfig, run_config_for

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sepreformer_book"


def chapter_of_module() -> dict[str, int]:
    """Each generated module's chapter number, read from the notebook its first line names."""
    chapters = {}
    for module in PACKAGE.glob("*.py"):
        if module.name.startswith("_"):
            continue
        first = module.read_text().splitlines()[0]
        match = re.search(r"File to edit: \.\./chapters/(\d+)_(\w+)\.ipynb", first)
        assert match, f"{module.name} does not name its notebook"
        assert match.group(2) == module.stem, f"{module.name} comes from {match.group(0)}: chapter and module differ"
        chapters[module.stem] = int(match.group(1))
    return chapters


def imported_modules(path: Path) -> set[str]:
    """The package modules `path` imports anywhere in it (top level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.module and node.module.startswith("sepreformer_book."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("sepreformer_book.")}
    return found


def test_each_chapter_file_names_its_module_and_chapters_are_numbered_once():
    chapters = chapter_of_module()
    assert len(set(chapters.values())) == len(chapters), "two modules from one chapter"
    notebooks = {int(p.name[:2]): p.stem[3:] for p in (ROOT / "chapters").glob("*.ipynb")}
    assert {notebooks[n] for n in chapters.values()} == set(chapters)


def test_modules_import_only_downward():
    chapters = chapter_of_module()
    upward = [(module, other) for module in chapters for other in imported_modules(PACKAGE / f"{module}.py")
              if other in chapters and chapters[other] >= chapters[module]]
    assert upward == [], f"imports of a later (or the same) chapter's module: {upward}"


def test_the_import_check_can_fail(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from sepreformer_book.separate import main\n")
    assert imported_modules(probe) == {"separate"}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_owns_its_numbers_once(name):
    profile = PROFILES[name]
    model = model_config_for(profile)
    assert PRESETS[name] == model == ModelConfig(sample_rate=profile.sample_rate, **profile.model)
    assert model.sample_rate == profile.sample_rate
    assert set(profile.model) <= {f.name for f in fields(ModelConfig)} - {"sample_rate"}
    run = run_config_for(name)
    assert (run.profile, run.batch_size, run.segment_seconds) == (name, profile.batch_size, profile.segment_seconds)
    assert set(profile.run) <= {f.name for f in fields(RunConfig)} - {"profile", "batch_size", "segment_seconds"}
    assert all(getattr(run, key) == value for key, value in profile.run.items())


def test_the_shipped_model_separates_the_reference_input_as_when_published():
    """tests/reference/shipped_model_reference.npz holds the shipped model's outputs on a fixed input, written when
    the model was published (retrained on the randomised choir); a change of the code must not change them."""
    from sepreformer_book.checkpoints import load_model

    reference = np.load(Path(__file__).parent / "reference" / "shipped_model_reference.npz")
    model, _ = load_model()
    output = np.asarray(model(jnp.asarray(reference["input"])))
    assert output.shape == reference["output"].shape
    np.testing.assert_allclose(output, reference["output"], rtol=0, atol=1e-6)
