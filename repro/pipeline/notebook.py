"""The notebooks' side of the params: what papermill injected, validated by :mod:`repro.config`.

Each notebook's setup cell calls ``params, dry_run = from_notebook(globals())`` right after its
``parameters`` cell; the top-level keys of a params file are the names in that cell.
"""

from __future__ import annotations

from typing import Any

from repro.config import (
    DEFAULT_PARAMS_FILE,
    TOP_LEVEL_KEYS,
    Params,
    build_params,
    load_params,
    resolve_path,
    unknown_key,
)
from repro.exceptions import ParamsError

_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
_YAML_TYPES = (dict, list, str, int, float, bool, type(None))


def from_notebook(namespace: dict[str, Any]) -> tuple[Params, bool]:
    """Params and the dry-run flag of a notebook run, from the variables papermill injected.

    Call it right after the ``parameters`` cell with ``globals()``. Every public global holding a
    plain YAML value (dict, list, str, number, bool, None) is a parameter: ``experiment``, the
    section dicts, ``params_file`` (a YAML read first, so ``-p params_file params/5pct.yaml
    -y '{train: {epochs: 2}}'`` overrides single keys; a ``base`` from the YAML acts the same)
    and ``dry_run``. An unknown name (a typo in the YAML) is an error. With no params at all,
    the demo experiment (``params/demo.yaml``) is used.
    """
    names = {
        key: value
        for key, value in namespace.items()
        if not key.startswith("_") and key not in _IPYTHON_NAMES and isinstance(value, _YAML_TYPES)
    }
    base = names.pop("base", None)
    params_file = names.pop("params_file", None) or base
    dry_run = parse_flag(names.pop("dry_run", False), "dry_run")
    unknown = [key for key in names if key not in TOP_LEVEL_KEYS]
    if unknown:
        hints = "; ".join(unknown_key(key, TOP_LEVEL_KEYS, "") for key in unknown)
        raise ParamsError(f"notebook parameters: {hints}")
    injected = {key: value for key, value in names.items() if value not in (None, {})}
    if params_file is None and not injected:
        params_file = DEFAULT_PARAMS_FILE
    if params_file is not None:
        return load_params(resolve_path(params_file), overrides=injected), dry_run
    return build_params(injected, source="notebook parameters"), dry_run


def parse_flag(value: Any, name: str) -> bool:
    """A boolean from YAML or the command line (papermill's ``-p x true`` passes a string)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in {"true", "yes", "1", "on"}:
        return True
    if text in {"false", "no", "0", "off", "none", ""}:
        return False
    raise ParamsError(f"{name}: expected true or false, got {value!r}")
