"""Any tensor (notebook 06): summary numbers, a histogram, a heatmap of a 2-D slice."""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from .common import OTHER, labels, new_figure


def tensor_stats(t: torch.Tensor) -> dict:
    """Shape, dtype and summary numbers of a tensor (non-finite values counted, not averaged)."""
    x = t.detach().float().cpu().flatten()
    finite = x[torch.isfinite(x)]
    stats = {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""), "numel": t.numel(),
             "non_finite": int(x.numel() - finite.numel())}
    if finite.numel():
        stats.update(min=float(finite.min()), max=float(finite.max()), mean=float(finite.mean()),
                     std=float(finite.std()) if finite.numel() > 1 else 0.0)
    return stats


def tensor_histogram(t: torch.Tensor, *, title: str = "", bins: int = 60) -> Figure:
    x = t.detach().float().cpu().flatten()
    x = x[torch.isfinite(x)]
    fig = new_figure(6, 3)
    ax = fig.add_subplot()
    ax.hist(x.numpy(), bins=bins, color=OTHER)
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.set_title(f"{title} {tuple(t.shape)}: histogram of {x.numel()} values".strip(), fontsize=10)
    return fig


def tensor_heatmap(t: torch.Tensor, *, title: str = "", xlabels=None, ylabels=None) -> Figure:
    """A 2-D slice as an image (diverging colours centred on 0 when the values have both signs)."""
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
        ax.set_xticks(range(x.shape[1]), labels(xlabels), rotation=90, fontsize=7)
    if ylabels is not None and len(ylabels) == x.shape[0]:
        ax.set_yticks(range(x.shape[0]), labels(ylabels), fontsize=7)
    ax.set_xlabel(f"last dim ({x.shape[1]})")
    ax.set_ylabel(f"second-to-last dim ({x.shape[0]})")
    ax.set_title(f"{title} {tuple(x.shape)}".strip(), fontsize=10)
    fig.colorbar(im, ax=ax)
    return fig
