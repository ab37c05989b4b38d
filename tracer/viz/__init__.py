"""Pictures and widgets for the notebooks, on top of the tracer's lower modules (never imported by them).

- :mod:`tracer.viz.plots`: matplotlib figures as pure functions of events and tensors.
- :mod:`tracer.viz.tables`: small tables (rows as dicts) and :func:`html_table` to show them.
- :mod:`tracer.viz.widgets`: :class:`StepperApp`, one token per click with every sampling stage.
- :mod:`tracer.viz.attention`: :class:`AttentionExplorer`, patterns by layer and head.
- :mod:`tracer.viz.explorers`: :class:`TraceExplorer`, any saved trace.
- :mod:`tracer.viz.tokens`: the one way a token is shown as text, with its legend.
- :mod:`tracer.viz.quant`: a quantized block taken apart, and top-k guesses across formats (notebook 07).
"""

from . import plots, quant, tables, tokens
from .attention import AttentionExplorer, patterns_of
from .explorers import TraceExplorer, summary_html
from .tables import html_table
from .widgets import StepperApp

__all__ = ["AttentionExplorer", "StepperApp", "TraceExplorer", "html_table", "patterns_of", "plots",
           "quant", "summary_html", "tables", "tokens"]
