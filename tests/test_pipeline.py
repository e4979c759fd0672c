"""The notebook runner: order, skipping complete notebooks, failures that name the notebook, and
terminal output that is one progress bar while papermill's and the kernel's log go to run.log."""

import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from repro.config import PROJECT_ROOT
from repro.pipeline.runner import NotebookFailedError, list_notebooks, run_pipeline

PARAMETERS = "experiment = None\nparams_file = None\ndry_run = False"
SETUP = "from repro.pipeline.notebook import from_notebook\nparams = from_notebook(globals())[0]"


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


def run_cli(notebook_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m repro run ...`` in a child process, on the notebooks in ``notebook_dir``."""
    code = (
        "import functools, pathlib, sys\n"
        "from repro.pipeline import cli, runner\n"
        "cli.run_pipeline = functools.partial(runner.run_pipeline, "
        f"notebook_dir=pathlib.Path({str(notebook_dir)!r}))\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "run", *args], capture_output=True, text=True, timeout=300
    )


def test_terminal_is_a_progress_bar_and_times_while_the_log_gets_papermill(notebooks, tmp_path):
    folder, _ = notebooks
    out = tmp_path / "runs"
    params = str(PROJECT_ROOT / "params" / "smoke.yaml")
    result = run_cli(folder, params, "--out", str(out))
    terminal = result.stdout + result.stderr
    assert result.returncode == 0, terminal
    for name in ("01_first", "02_second"):
        assert re.search(rf"^{name}: \d+\.\d s$", result.stdout, re.MULTILINE), terminal
        assert f"smoke: {name}" in result.stderr, "the bar names the current notebook"
    assert "INFO" not in terminal and "papermill" not in terminal
    assert "without encryption" not in terminal
    log = (out / "smoke" / "run.log").read_text()
    assert re.findall(r"^===== (\S+) ", log, re.MULTILINE) == ["01_first", "02_second"]
    assert "INFO papermill: Executing notebook with kernel" in log
    assert "Kernel is running over TCP without encryption" in log, "the kernel's stderr"
    assert "02_second printed smoke" in log, "the notebooks' output"

    verbose = run_cli(folder, params, "--out", str(out), "--only", "02", "--force", "--verbose")
    terminal = verbose.stdout + verbose.stderr
    assert verbose.returncode == 0, terminal
    assert "INFO papermill: Executing notebook with kernel" in terminal
    assert "without encryption" in terminal
    log = (out / "smoke" / "run.log").read_text()
    headers = re.findall(r"^===== (\S+) ", log, re.MULTILINE)
    assert headers == ["01_first", "02_second", "02_second"], "appended, one header per notebook"


def test_cli_failure_names_the_notebook_cell_and_error(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    make_notebook(folder / "01_broken.ipynb", "raise RuntimeError('tissue mask is empty')")
    params = str(PROJECT_ROOT / "params" / "smoke.yaml")
    result = run_cli(folder, params, "--out", str(tmp_path))
    assert result.returncode == 1
    assert re.search(
        r"^error: notebook 01_broken failed in cell \d+: RuntimeError: tissue mask is empty",
        result.stderr,
        re.MULTILINE,
    ), result.stderr


def test_dead_kernel_is_named_with_its_log(tmp_path):
    folder = tmp_path / "notebooks"
    folder.mkdir()
    body = "import os\nos.write(2, b'fatal: out of shared memory\\n')\nos._exit(3)"
    make_notebook(folder / "01_crash.ipynb", body)
    with pytest.raises(NotebookFailedError, match="01_crash: the kernel died") as error:
        run_pipeline(PROJECT_ROOT / "params" / "smoke.yaml", out_dir=tmp_path, notebook_dir=folder)
    log = tmp_path / "smoke" / "run.log"
    assert str(log) in str(error.value)
    assert "fatal: out of shared memory" in log.read_text(), "the kernel's last words"
