"""Pictures and widgets for the notebooks, on top of the tracer's lower modules (never imported by them).

- :mod:`tracer.viz.plots`: matplotlib figures as pure functions of events and tensors.
- :mod:`tracer.viz.tables`: small tables (rows as dicts) and :func:`html_table` to show them.
- :mod:`tracer.viz.widgets`: :class:`StepperApp`, one token per click with every sampling stage.
- :mod:`tracer.viz.explorers`: :class:`AttentionExplorer` and :class:`TraceExplorer`.
"""

from . import plots, tables
from .explorers import AttentionExplorer, TraceExplorer, patterns_of, summary_html
from .tables import html_table
from .widgets import StepperApp

__all__ = ["AttentionExplorer", "StepperApp", "TraceExplorer", "html_table", "patterns_of", "plots",
           "summary_html", "tables"]
