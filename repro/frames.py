"""Checks of the tables (pandas DataFrames) that pass between the package's steps."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd


def require_columns(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the missing columns when ``frame`` lacks any."""
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise ValueError(f"{name}: missing columns {missing}; got {list(frame.columns)}")
