"""Any tensor (notebook 06): summary numbers, a histogram, and a slice drawn as what it is: a
vector (1-D, or 1 x N) as a line or bar plot, a matrix as a heatmap, axes named by their dims."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from ...dtypes import name_of
from ...hooks import DIMS, declared
from .common import CHOSEN, OTHER, new_figure
from .forward import token_labels

BARS_UP_TO = 64  # a vector this short is drawn as bars (one labelled tick each); longer, as a line


def dim_names(point: str) -> tuple[str, ...] | None:
    """The names of a hook point's dimensions, e.g. ``blocks.0.attn.pattern`` -> (batch, head,
    position, key position): its declared shape's letters, in words (tracer.hooks.DIMS); None for a
    name that is not a hook point."""
    declared_point = declared(point)
    return None if declared_point is None else tuple(DIMS[letter] for letter in declared_point.shape)


def tensor_stats(t: torch.Tensor) -> dict:
    """Shape, dtype and summary numbers of a tensor (non-finite values counted, not averaged)."""
    x = t.detach().float().cpu().flatten()
    finite = x[torch.isfinite(x)]
    stats = {"shape": list(t.shape), "dtype": name_of(t.dtype), "numel": t.numel(),
             "non_finite": int(x.numel() - finite.numel())}
    if finite.numel():
        stats.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()),
                     std=float(finite.std()) if finite.numel() > 1 else 0.0)
    return stats


def tensor_histogram(t: torch.Tensor, *, title: str = "", bins: int = 60) -> Figure:
    """Every finite value of ``t`` in one histogram."""
    x = t.detach().float().cpu().flatten()
    x = x[torch.isfinite(x)]
    fig = new_figure(5.5, 3.2)
    ax = fig.add_subplot()
    ax.hist(x.numpy(), bins=bins, color=OTHER)
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(f"{title} {tuple(t.shape)}: histogram of {x.numel()} values".strip(), fontsize=9, wrap=True)
    return fig


def _axis_label(names, i: int, n: int, fallback: str) -> str:
    return f"{names[i]} ({n})" if names else f"{fallback} ({n})"


def tensor_heatmap(t: torch.Tensor, *, title: str = "", xlabels=None, ylabels=None, names=None) -> Figure:
    """A matrix as an image (diverging colours centred on 0 when the values have both signs);
    ``xlabels``/``ylabels``: token pieces for the ticks; ``names``: the two dimensions' names
    (rows, columns) for the axis labels."""
    x = t.detach().float().cpu()
    if x.dim() != 2:
        raise ValueError(f"tensor_heatmap wants a 2-D slice, got shape {tuple(x.shape)}")
    lo, hi = float(x[torch.isfinite(x)].min()), float(x[torch.isfinite(x)].max())
    signed = lo < 0 < hi
    m = max(abs(lo), abs(hi))
    fig = new_figure(7, 4)
    ax = fig.add_subplot()
    im = ax.imshow(x.numpy(), aspect="auto", interpolation="nearest", cmap="RdBu_r" if signed else "viridis",
                   **({"vmin": -m, "vmax": m} if signed else {}))
    if xlabels is not None and len(xlabels) == x.shape[1]:
        ax.set_xticks(range(x.shape[1]), token_labels(xlabels), rotation=90, fontsize=7)
    if ylabels is not None and len(ylabels) == x.shape[0]:
        ax.set_yticks(range(x.shape[0]), token_labels(ylabels), fontsize=7)
    ax.set_xlabel(_axis_label(names, 1, x.shape[1], "last dim"))
    ax.set_ylabel(_axis_label(names, 0, x.shape[0], "second-to-last dim"))
    ax.set_title(f"{title} {tuple(x.shape)}".strip(), fontsize=10)
    fig.colorbar(im, ax=ax)
    return fig


def tensor_vector(t: torch.Tensor, *, title: str = "", name: str = "index", xlabels=None, top: int = 5) -> Figure:
    """A vector as bars (up to :data:`BARS_UP_TO` values, each tick labelled from ``xlabels``) or
    as a line (longer; the ``top`` largest values marked and labelled). ``xlabels``: a list, or a
    function of the index (a vocabulary: ``id -> piece``)."""
    x = t.detach().float().cpu().flatten()
    n = x.numel()
    at = xlabels if callable(xlabels) else (lambda i: xlabels[i]) if xlabels is not None and len(xlabels) == n else None
    fig = new_figure(7, 3.4)
    ax = fig.add_subplot()
    note = ""
    if n <= BARS_UP_TO:
        ax.bar(range(n), x.numpy(), color=OTHER)
        if at is not None:
            ax.set_xticks(range(n), token_labels([at(i) for i in range(n)]), rotation=90, fontsize=7)
    else:  # too many for ticks: mark the largest values, numbered, and list them under the title
        ax.plot(range(n), x.numpy(), color=OTHER, lw=0.8)
        best = torch.topk(torch.nan_to_num(x, nan=-float("inf")), min(top, n)).indices.tolist()
        ax.plot(best, x[best].numpy(), "o", color=CHOSEN, ms=4)
        for rank, i in enumerate(best, 1):
            ax.annotate(str(rank), (i, float(x[i])), textcoords="offset points", xytext=(3, 1), fontsize=7)
        named = [f"{rank}: {i}" + (f" {token_labels([at(i)])[0]}" if at is not None else "") + f" ({float(x[i]):.3g})"
                 for rank, i in enumerate(best, 1)]
        note = "largest  " + "   ".join(named)
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xlabel(f"{name} ({n})")
    ax.set_ylabel("value")
    ax.set_title(f"{title} {tuple(t.shape)}".strip() + (f"\n{note}" if note else ""), fontsize=9, wrap=True)
    return fig


def tensor_slice(t: torch.Tensor, *, title: str = "", names=None, xlabels=None, ylabels=None) -> Figure:
    """A slice of at most two dimensions drawn as what it is: a matrix (both sizes > 1) as a
    heatmap, a vector (1-D, 1 x N or N x 1) as :func:`tensor_vector`. ``names``/``xlabels``/
    ``ylabels``: the dimensions' names and tick labels (rows, columns), as for the heatmap."""
    if t.dim() > 2:
        raise ValueError(f"tensor_slice wants at most 2 dimensions, got shape {tuple(t.shape)}")
    if t.dim() == 2 and min(t.shape) > 1:
        return tensor_heatmap(t, title=title, xlabels=xlabels, ylabels=ylabels, names=names)
    along = -1 if t.dim() == 1 or t.shape[0] == 1 else 0  # the dimension with more than one value
    name = names[along] if names else "index"
    ticks = xlabels if along == -1 else ylabels
    return tensor_vector(t, title=title, name=name, xlabels=ticks)
