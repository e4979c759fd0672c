"""Run the numbered notebooks of one experiment in order, with papermill.

Executed copies go to ``<out>/<experiment>/<notebook>.ipynb``, with an HTML export next to each
(``<notebook>.html``, readable without Jupyter). A notebook whose executed copy is
complete for the same params (recorded in ``<out>/<experiment>/.done/<notebook>.json``) is
skipped, unless ``force``; once one notebook runs, every later one runs too, since its inputs may
have changed.

The terminal shows one progress bar and, after each notebook, a line with its name and time.
papermill's log, the notebooks' printed output and the kernel process's own output (its start-up
warnings, anything written to its stdout/stderr file descriptors) go to the run's log file
(``<out>/<experiment>/run.log``, appended, one header per notebook); with ``verbose`` they are
shown on the terminal as well.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbconvert
import nbformat
import papermill
from jupyter_client import AsyncKernelManager
from nbclient.exceptions import DeadKernelError
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from repro.config import PROJECT_ROOT, Params, load_params
from repro.exceptions import NotebookFailedError
from repro.io.atomic import atomic_path, write_text_atomic

__all__ = ["NOTEBOOK_DIR", "NotebookFailedError", "export_html", "list_notebooks", "run_pipeline"]

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"
kernel_logger = logging.getLogger(f"{__name__}.kernel")
"""The kernel process's own stdout and stderr, one record per line."""

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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
    verbose: bool = False,
) -> Path:
    """Execute the notebooks for one params file; returns the experiment's run directory.

    ``verbose`` also shows papermill's log and the kernel's output on the terminal (they are
    always appended to the run's ``run.log``).

    Raises:
        ParamsError: the params file is invalid (checked before anything runs).
        NotebookFailedError: a notebook raised or its kernel died; later notebooks are not run.
    """
    overrides = {"run": {"out_dir": str(Path(out_dir).resolve())}} if out_dir else None
    params = load_params(params_path, overrides=overrides)
    run_dir = params.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    log = params.layout.log
    parameters = _notebook_parameters(params_path, overrides)
    fingerprint = _fingerprint(params)
    rerun = force
    notebooks = list_notebooks(only, notebook_dir)
    with logging_redirect_tqdm(), tqdm(total=len(notebooks), unit="notebook") as bar:
        for notebook in notebooks:
            bar.set_description(f"{params.experiment}: {notebook.stem}")
            output = params.layout.notebook(notebook.name)
            marker = params.layout.notebook_done(notebook.stem)
            if not rerun and _is_complete(marker, output, fingerprint):
                tqdm.write(f"{notebook.stem}: complete, skipped (--force re-runs it)")
                bar.update()
                continue
            rerun = True
            marker.unlink(missing_ok=True)
            start = time.monotonic()
            with _logging_to(log, f"{notebook.stem} ({params_path})", verbose):
                _execute(notebook, output, parameters, notebook_dir, log)
            _write_marker(marker, fingerprint)
            tqdm.write(f"{notebook.stem}: {_duration(time.monotonic() - start)}")
            bar.update()
        bar.set_description(params.experiment)
    return run_dir


def _notebook_parameters(params_path: str | os.PathLike[str], overrides: dict | None) -> dict:
    """What papermill injects: the file itself plus overrides, as ``params_file`` + sections."""
    parameters: dict = {"params_file": str(Path(params_path).resolve())}
    parameters.update(overrides or {})
    return parameters


def _execute(notebook: Path, output: Path, parameters: dict, cwd: Path, log: Path) -> None:
    partial = output.with_name(output.stem + ".partial.ipynb")
    try:
        with _kernel_output_to_log() as kernel_manager_class:
            papermill.execute_notebook(
                str(notebook),
                str(partial),
                parameters=parameters,
                cwd=str(cwd),
                progress_bar=False,
                log_output=True,
                kernel_name="python3",
                kernel_manager_class=kernel_manager_class,
            )
    except papermill.PapermillExecutionError as error:
        raise NotebookFailedError(
            f"notebook {notebook.stem} failed in cell {error.exec_count}: "
            f"{error.ename}: {error.evalue} (executed copy: {partial})"
        ) from None
    except DeadKernelError as error:
        raise NotebookFailedError(
            f"notebook {notebook.stem}: the kernel died ({error}); its output is in {log} "
            f"(executed copy: {partial})"
        ) from None
    os.replace(partial, output)
    export_html(output)


@contextmanager
def _logging_to(log: Path, title: str, verbose: bool) -> Iterator[None]:
    """Send papermill's and the kernel's records to ``log`` (after a header naming ``title``);
    to the terminal's handlers too only if ``verbose``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    with log.open("a", encoding="utf-8") as stream:
        stream.write(f"\n===== {title}, {stamp} =====\n")
    handler = logging.FileHandler(log, encoding="utf-8")
    handler.setFormatter(logging.Formatter(_LOG_FORMAT))
    loggers = [logging.getLogger("papermill"), kernel_logger]
    saved = [(each, each.level, each.propagate) for each in loggers]
    for each in loggers:
        each.addHandler(handler)
        each.setLevel(logging.INFO)
        each.propagate = verbose
    try:
        yield
    finally:
        for each, level, propagate in saved:
            each.removeHandler(handler)
            each.setLevel(level)
            each.propagate = propagate
        handler.close()


@contextmanager
def _kernel_output_to_log() -> Iterator[type[AsyncKernelManager]]:
    """A kernel manager class whose kernels write their stdout and stderr into a pipe that a
    thread reads into :data:`kernel_logger`, line by line, until the kernel has exited."""
    read_end, write_end = os.pipe()

    class _KernelManager(AsyncKernelManager):
        async def start_kernel(self, **kwargs: Any) -> None:
            await super().start_kernel(**{"stdout": write_end, "stderr": write_end, **kwargs})

    def forward() -> None:
        with open(read_end, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                kernel_logger.info(line.rstrip("\n"))

    reader = threading.Thread(target=forward, name="kernel-output", daemon=True)
    reader.start()
    try:
        yield _KernelManager
    finally:
        os.close(write_end)
        reader.join(timeout=10)


def _duration(seconds: float) -> str:
    """``"42.1 s"``, ``"3 min 05 s"`` or ``"1 h 02 min"``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


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
