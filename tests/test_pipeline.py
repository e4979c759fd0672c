"""The notebook runner: order, skipping complete notebooks, and failures that name the notebook."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from repro.config import PROJECT_ROOT
from repro.pipeline import NotebookFailedError, list_notebooks, run_pipeline

PARAMETERS = "experiment = None\nparams_file = None\ndry_run = False"
SETUP = "from repro.config import from_notebook\nparams, dry_run = from_notebook(globals())"


def make_notebook(path: Path, body: str) -> None:
    notebook = new_notebook()
    notebook.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    parameters = new_code_cell(PARAMETERS)
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [new_markdown_cell("# test"), parameters, new_code_cell(SETUP)]
    notebook.cells.append(new_code_cell(body))
    nbformat.write(notebook, path)


@pytest.fixture
def notebooks(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    log = tmp_path / "log.txt"
    for name in ("01_first", "02_second"):
        body = f"open({str(log)!r}, 'a').write('{name} ' + params.experiment + '\\n')\n"
        body += f"print('{name} printed ' + params.experiment)"
        make_notebook(folder / f"{name}.ipynb", body)
    return folder, log


def test_runs_in_order_then_skips_complete(notebooks, tmp_path):
    folder, log = notebooks
    out = tmp_path / "runs"
    params = PROJECT_ROOT / "params" / "smoke.yaml"
    run_dir = run_pipeline(params, out_dir=out, notebook_dir=folder)
    assert run_dir == out / "smoke"
    assert log.read_text().splitlines() == ["01_first smoke", "02_second smoke"]
    assert (run_dir / "01_first.ipynb").exists() and (run_dir / "02_second.ipynb").exists()
    assert "02_second printed smoke" in (run_dir / "02_second.html").read_text(), "outputs in HTML"
    run_pipeline(params, out_dir=out, notebook_dir=folder)
    assert len(log.read_text().splitlines()) == 2, "complete notebooks must be skipped"
    run_pipeline(params, out_dir=out, notebook_dir=folder, only=["02"], force=True)
    assert log.read_text().splitlines()[-1] == "02_second smoke"


def test_rerunning_one_notebook_reruns_the_later_ones(notebooks, tmp_path):
    folder, log = notebooks
    out = tmp_path / "runs"
    params = PROJECT_ROOT / "params" / "smoke.yaml"
    run_pipeline(params, out_dir=out, notebook_dir=folder)
    (out / "smoke" / ".done" / "01_first.json").unlink()
    run_pipeline(params, out_dir=out, notebook_dir=folder)
    assert log.read_text().splitlines()[2:] == ["01_first smoke", "02_second smoke"]


def test_failing_notebook_is_named_and_stops_the_run(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    make_notebook(folder / "01_broken.ipynb", "raise RuntimeError('tissue mask is empty')")
    make_notebook(folder / "02_never.ipynb", "raise AssertionError('must not run')")
    with pytest.raises(NotebookFailedError) as error:
        run_pipeline(PROJECT_ROOT / "params" / "smoke.yaml", out_dir=tmp_path, notebook_dir=folder)
    message = str(error.value)
    assert "01_broken" in message and "RuntimeError: tissue mask is empty" in message
    assert not (tmp_path / "smoke" / "02_never.ipynb").exists()


def test_unknown_only_is_an_error():
    with pytest.raises(ValueError, match="no notebook 09"):
        list_notebooks(["09"])


def test_cli_exits_nonzero_on_bad_params(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trian:\n  lr: 1\n")
    result = subprocess.run(
        [sys.executable, "-m", "repro", "run", str(bad), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert "bad.yaml" in result.stderr and "did you mean 'train'" in result.stderr
