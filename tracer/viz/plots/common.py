"""What every figure shares: a figure without pyplot, PNG bytes, the colours, token labels."""

from __future__ import annotations

import io

from matplotlib.figure import Figure

from ..tokens import plot_label as label
from ..tokens import plot_labels as labels

CHOSEN = "#d62728"  # the chosen token, in every plot
OTHER = "#1f77b4"

__all__ = ["CHOSEN", "OTHER", "label", "labels", "new_figure", "to_png"]


def new_figure(width: float, height: float) -> Figure:
    """A figure with constrained layout (labels are not clipped), outside pyplot's registry."""
    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def to_png(fig: Figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (what the widgets put in their image outputs)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
