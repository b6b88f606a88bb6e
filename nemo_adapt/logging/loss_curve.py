"""loss_curve.png: train and validation loss against step, drawn from metrics.jsonl."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TRAIN_LOSS = "train/loss"
VAL_LOSS = "val/loss"


def loss_points(records: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and finite values of one metric, in step order, the last record winning per step.

    A resumed run may log a step twice (a crash between the checkpoint and truncation); the later
    record is what the run continued from.

    Args:
        records: metrics.jsonl records (`{"step": ..., key: value, ...}`).
        key: The metric, e.g. `train/loss`.

    Returns:
        (steps, values), both sorted by step; NaN/inf and non-numbers skipped.
    """
    by_step: dict[int, float] = {}
    for record in records:
        value = record.get(key)
        step = record.get("step")
        if isinstance(value, bool) or not isinstance(value, int | float) or not isinstance(step, int):
            continue
        if math.isfinite(value):
            by_step[step] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def write_loss_curve(records: Iterable[Mapping[str, Any]], path: str | Path, title: str) -> Path | None:
    """Plot train loss (line) and validation loss (markers) against step into a PNG.

    Args:
        records: metrics.jsonl records.
        path: Where to write the PNG (written atomically: a partial file never appears).
        title: Plot title, usually the run name.

    Returns:
        The path written, or None when there is no loss point to plot.
    """
    records = list(records)
    train = loss_points(records, TRAIN_LOSS)
    val = loss_points(records, VAL_LOSS)
    if not train[0] and not val[0]:
        return None

    # The Agg canvas renders to files only: no display on compute nodes, no GUI backend imported.
    # A bare Figure on its own canvas (not pyplot) leaves matplotlib's global backend and figure list
    # alone, so it is safe inside a notebook or a process that plots elsewhere, and needs no close().
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train[0]:
        ax.plot(*train, label="train loss", linewidth=1.2)
    if val[0]:
        ax.plot(*val, label="val loss", marker="o", markersize=4, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()

    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out
