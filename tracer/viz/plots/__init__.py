"""Matplotlib figures as pure functions of trace events and tensors, one module per lesson.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global figure
registry, nothing shown as a side effect); a notebook shows it by making it the cell's last value,
a widget turns it into a PNG with :func:`to_png`. Layout is "constrained", so labels are not clipped.
Token pieces are labelled through :mod:`tracer.viz.tokens`, the one renderer.
"""

from .common import CHOSEN, OTHER, label, labels, new_figure, to_png
from .forward import attention_heads, attention_heatmap, gqa_groups, logit_lens, residual_norms
from .loading import GPU_SIZES_GB, load_timeline, weights_memory
from .sampling import STAGE_TITLES, compare_steps, sampling_stages
from .tensors import tensor_heatmap, tensor_histogram, tensor_stats

__all__ = [
    "CHOSEN", "GPU_SIZES_GB", "OTHER", "STAGE_TITLES", "attention_heads", "attention_heatmap", "compare_steps",
    "gqa_groups", "label", "labels", "load_timeline", "logit_lens", "new_figure", "residual_norms",
    "sampling_stages", "tensor_heatmap", "tensor_histogram", "tensor_stats", "to_png", "weights_memory",
]
