"""The notebook 01 gallery: one prepared biopsy per class in turn, titled by its grade."""

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pyvips

from repro.data.sources import POSITIVE
from repro.reporting.gallery import plot_gallery


def _manifest(params) -> pd.DataFrame:
    params.prepared.masks.mkdir(parents=True)
    rows = []
    grades = {"a": ("4+3", 4), "b": (np.nan, POSITIVE), "c": ("0+0", 0), "d": (np.nan, 0)}
    for image_id, (gleason, pattern) in grades.items():
        mask = np.zeros((8, 8), np.uint8)
        mask[2:6, 2:6] = 255
        pyvips.Image.new_from_array(mask).pngsave(str(params.prepared.mask(image_id)))
        rows.append(
            {
                "image_id": image_id,
                "status": "ok",
                "gleason_score": gleason,
                "primary_pattern": pattern,
                "label": int(pattern > 0),
                "tissue_fraction": 0.25,
                "path": params.prepared.image(image_id).relative_to(params.prepared.root),
                "mask_path": params.prepared.mask(image_id).relative_to(params.prepared.root),
            }
        )
    return pd.DataFrame(rows)


def test_gallery_titles_panda_grades_and_csv_labels(evaluated_run):
    figure = plot_gallery(evaluated_run, _manifest(evaluated_run), n=4, columns=2)
    titles = sorted(axis.get_title() for axis in figure.axes if axis.get_title())
    plt.close(figure)
    assert [title.split("\n")[0] for title in titles] == [
        "a  4+3 (pattern 4)",
        "b  positive",  # a CSV positive: no Gleason score, no "nan"
        "c  0+0 (negative)",
        "d  negative",
    ]
    assert all(title.endswith("tissue 25%") for title in titles)
