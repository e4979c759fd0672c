"""Public path of the streaming engine; the code lives in :mod:`repro.nn.streaming`."""

from repro.nn.streaming import (
    AxisGeometry,
    StreamingModule,
    Tile,
    TilePlan,
    estimate_peak_bytes,
    plan_tile_size,
)

__all__ = [
    "AxisGeometry",
    "StreamingModule",
    "Tile",
    "TilePlan",
    "estimate_peak_bytes",
    "plan_tile_size",
]
