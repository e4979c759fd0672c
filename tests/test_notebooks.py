"""The real notebooks 01-07, executed end to end under papermill on params/smoke.yaml.

Everything the run writes (synthetic slides, prepared images, runs/, figures, labels) goes under
the test's temp dir; a failing cell fails the test with the notebook, the cell and the error.
"""

import os

import pytest
import yaml

from repro.config import PROJECT_ROOT, load_params
from repro.pipeline.runner import NotebookFailedError, list_notebooks, run_pipeline

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)
def test_notebooks_run_end_to_end_on_smoke(tmp_path, monkeypatch):
    params_file = tmp_path / "smoke.yaml"
    smoke_in_tmp = {
        "base": str(PROJECT_ROOT / "params" / "smoke.yaml"),
        "data": {
            "panda_dir": str(tmp_path / "panda"),
            "prepared_dir": str(tmp_path / "prepared" / "synthetic-smoke"),  # names the figures
        },
        "evaluation": {
            "figures_dir": str(tmp_path / "figures"),
            "labels_dir": str(tmp_path / "labels"),
        },
    }
    params_file.write_text(yaml.safe_dump(smoke_in_tmp))
    # The kernels import this checkout, as this process does, wherever the venv's install points.
    path = [str(PROJECT_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path))
    try:
        run_dir = run_pipeline(params_file, out_dir=tmp_path / "runs")
    except NotebookFailedError as error:
        pytest.fail(str(error), pytrace=False)
    params = load_params(params_file, overrides={"run": {"out_dir": str(tmp_path / "runs")}})
    assert run_dir == params.run_dir == tmp_path / "runs" / "smoke"
    names = [notebook.stem for notebook in list_notebooks()]
    assert len(names) == 7
    for name in names:
        assert (run_dir / f"{name}.ipynb").exists() and (run_dir / f"{name}.html").exists(), name
        assert (run_dir / ".done" / f"{name}.json").exists(), name
    assert not list(run_dir.glob("*.partial.ipynb"))
    assert params.prepared.manifest.exists(), "notebook 01 prepared the synthetic set"
    assert any((tmp_path / "figures").iterdir()), "the figures went to the temp dir"
