"""Project hygiene: pins agree, notebooks are clean with a parameters cell, lint is clean."""

import json
import re
import subprocess
import sys
import tomllib

import nbformat
import pytest
import yaml

from repro.config import PROJECT_ROOT
from repro.pipeline.runner import list_notebooks

EXPECTED_NOTEBOOKS = [
    "01_prepare_data",
    "02_make_subsets",
    "03_train_streaming",
    "04_train_mil",
    "05_evaluate",
    "06_heatmaps",
    "07_error_analysis",
]


def pinned(requirements: list[str]) -> dict[str, str]:
    pins = {}
    for requirement in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", requirement.strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    declared = pinned(project["dependencies"] + project["optional-dependencies"]["dev"])
    environment = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert pinned(pip_section) == declared
    assert "python=3.11" in environment["dependencies"]
    assert declared["torch"] == "2.14.1" and declared["torchvision"] == "0.29.1"


def test_every_dependency_is_pinned():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"]:
        assert "==" in requirement, requirement


def test_the_seven_notebooks_exist_in_order():
    assert [nb.stem for nb in list_notebooks()] == EXPECTED_NOTEBOOKS


@pytest.mark.parametrize("name", EXPECTED_NOTEBOOKS)
def test_notebook_is_clean_and_parameterised(name):
    path = PROJECT_ROOT / "notebooks" / f"{name}.ipynb"
    cells = json.loads(path.read_text())["cells"]
    assert all("id" in cell for cell in cells), f"{name}: a cell has no id (nbformat 4.5)"
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.cells[0].cell_type == "markdown"
    tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{name}: committed with outputs"
            assert cell.execution_count is None, f"{name}: committed with execution counts"
        assert "injected-parameters" not in cell.metadata.get("tags", [])


def test_lint_is_clean():
    ruff = [sys.executable, "-m", "ruff"]
    check = subprocess.run([*ruff, "check", "."], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run(
        [*ruff, "format", "--check", "."], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr
