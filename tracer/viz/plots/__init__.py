"""Matplotlib figures as pure functions of trace events and tensors, one module per lesson.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global figure
registry, nothing shown as a side effect); a notebook shows it by making it the cell's last value,
a widget turns it into a PNG with :func:`to_png`. Layout is "constrained", so labels are not clipped.
Token pieces are labelled through :mod:`tracer.viz.tokens`, the one renderer.
"""

from .common import CHOSEN, OTHER, label, labels, new_figure, to_png
from .forward import (
    ablation_losses,
    attention_heads,
    attention_heatmap,
    gqa_groups,
    head_patterns,
    head_scores,
    lens_probability,
    logit_lens,
    loss_by_position,
    residual_norms,
    token_labels,
)
from .loading import GPU_SIZES_GB, casts_text, count_text, load_timeline, size_text, weights_memory
from .sampling import STAGE_TITLES, compare_steps, sampling_stages
from .tensors import (
    dim_names,
    tensor_heatmap,
    tensor_histogram,
    tensor_slice,
    tensor_stats,
    tensor_vector,
)

__all__ = [
    "CHOSEN", "GPU_SIZES_GB", "OTHER", "STAGE_TITLES", "ablation_losses", "attention_heads", "attention_heatmap",
    "casts_text", "compare_steps", "count_text", "dim_names", "gqa_groups", "head_patterns", "head_scores", "label",
    "labels", "lens_probability", "load_timeline", "logit_lens", "loss_by_position", "new_figure", "residual_norms",
    "sampling_stages", "size_text", "tensor_heatmap", "tensor_histogram", "tensor_slice", "tensor_stats",
    "tensor_vector", "to_png", "token_labels", "weights_memory",
]
