"""Run the numbered notebooks of one experiment in order, with papermill.

Executed copies go to ``<out>/<experiment>/<notebook>.ipynb``, with an HTML export next to each
(``<notebook>.html``, readable without Jupyter). A notebook whose executed copy is
complete for the same params (recorded in ``<out>/<experiment>/.done/<notebook>.json``) is
skipped, unless ``force``; once one notebook runs, every later one runs too, since its inputs may
have changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import nbconvert
import nbformat
import papermill
from tqdm.auto import tqdm

from repro.atomic import atomic_path, write_text_atomic
from repro.config import PROJECT_ROOT, Params, load_params

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
logger = logging.getLogger(__name__)


class NotebookFailedError(RuntimeError):
    """A notebook of the pipeline raised; the message names it and the failing cell's error."""


def list_notebooks(
    only: Sequence[str] | None = None, notebook_dir: Path = NOTEBOOK_DIR
) -> list[Path]:
    """The numbered notebooks (``01_...`` to ``07_...``), optionally only those whose number or
    name is in ``only`` (e.g. ``["03", "05"]``)."""
    notebooks = sorted(notebook_dir.glob("[0-9][0-9]_*.ipynb"))
    if not only:
        return notebooks
    wanted = set(only)
    chosen = [nb for nb in notebooks if nb.stem[:2] in wanted or nb.stem in wanted]
    known = {nb.stem[:2] for nb in notebooks} | {nb.stem for nb in notebooks}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"--only: no notebook {', '.join(unknown)}; have {sorted(known)}")
    return chosen


def run_pipeline(
    params_path: str | os.PathLike[str],
    only: Sequence[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    notebook_dir: Path = NOTEBOOK_DIR,
) -> Path:
    """Execute the notebooks for one params file; returns the experiment's run directory.

    Raises:
        ParamsError: the params file is invalid (checked before anything runs).
        NotebookFailedError: a notebook raised; later notebooks are not run.
    """
    overrides = {"run": {"out_dir": str(Path(out_dir).resolve())}} if out_dir else None
    params = load_params(params_path, overrides=overrides)
    run_dir = params.run_dir
    marker_dir = run_dir / ".done"
    marker_dir.mkdir(parents=True, exist_ok=True)
    parameters = _notebook_parameters(params_path, overrides)
    fingerprint = _fingerprint(params)
    rerun = force
    notebooks = list_notebooks(only, notebook_dir)
    bar = tqdm(notebooks, desc=params.experiment, unit="notebook")
    for notebook in bar:
        bar.set_postfix_str(notebook.stem)
        output = run_dir / notebook.name
        marker = marker_dir / f"{notebook.stem}.json"
        if not rerun and _is_complete(marker, output, fingerprint):
            logger.info("%s: complete, skipped (use --force to re-run)", notebook.stem)
            continue
        rerun = True
        marker.unlink(missing_ok=True)
        _execute(notebook, output, parameters, notebook_dir)
        _write_marker(marker, fingerprint)
    return run_dir


def _notebook_parameters(params_path: str | os.PathLike[str], overrides: dict | None) -> dict:
    """What papermill injects: the file itself plus overrides, as ``params_file`` + sections."""
    parameters: dict = {"params_file": str(Path(params_path).resolve())}
    parameters.update(overrides or {})
    return parameters


def _execute(notebook: Path, output: Path, parameters: dict, cwd: Path) -> None:
    partial = output.with_name(output.stem + ".partial.ipynb")
    try:
        papermill.execute_notebook(
            str(notebook),
            str(partial),
            parameters=parameters,
            cwd=str(cwd),
            progress_bar=False,
            kernel_name="python3",
        )
    except papermill.PapermillExecutionError as error:
        raise NotebookFailedError(
            f"notebook {notebook.stem} failed in cell {error.exec_count}: "
            f"{error.ename}: {error.evalue} (executed copy: {partial})"
        ) from None
    os.replace(partial, output)
    export_html(output)


def export_html(notebook: Path) -> Path:
    """Write ``notebook`` (executed) as a self-contained HTML page next to it; returns its path."""
    html, _ = nbconvert.HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    page = notebook.with_suffix(".html")
    with atomic_path(page) as temporary:
        temporary.write_text(html, encoding="utf-8")
    return page


def _fingerprint(params: Params) -> str:
    text = json.dumps(params.to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _is_complete(marker: Path, output: Path, fingerprint: str) -> bool:
    if not (marker.exists() and output.exists()):
        return False
    try:
        return json.loads(marker.read_text()).get("params_sha256") == fingerprint
    except (OSError, json.JSONDecodeError):
        return False


def _write_marker(marker: Path, fingerprint: str) -> None:
    write_text_atomic(marker, json.dumps({"params_sha256": fingerprint}))
