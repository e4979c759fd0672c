"""What the two methods share in their public functions."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd


class Predictions(NamedTuple):
    """A method's predictions for a set of biopsies (``predict`` of either method).

    Attributes:
        biopsies: DataFrame(image_id, label, score) in the order of the rows asked for, with
            ``score`` the cancer probability.
        patches: MIL only: DataFrame(image_id, x, y, score) of every patch; None for streaming.
    """

    biopsies: pd.DataFrame
    patches: pd.DataFrame | None = None
