"""Quantization (notebook 07): one block taken apart, the same weights rounded to several formats,
and the next-token guesses of a model rounded to each, side by side.

The numbers come from :mod:`tracer.requant` (:class:`~tracer.requant.BlockParts`: a block's scale,
minimum, codes and values); these functions only draw them. Tokens are labelled through
:mod:`tracer.viz.tokens`, the one renderer.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from ..requant import BlockParts
from .plots.common import CHOSEN, OTHER, new_figure
from .plots.forward import token_labels
from .tokens import legend, quoted

LEVEL = "#b0b0b0"  # the grid of values a block's codes can stand for; tokens outside the reference's top-k
FLOAT = "#2ca02c"  # the float weights before rounding
MAX_LEVELS_DRAWN = 16  # a 4-bit grid is drawn line by line; Q8_0's 256 levels would be a grey wall


def formula(parts: BlockParts) -> str:
    """What the block's codes stand for, with its own numbers: ``w = d·q + m, d = 0.135, m = -0.602``."""
    d = float(parts.scales[0])
    if parts.minimums is not None:
        return f"w = d·q + m,  d = {d:.4g},  m = {float(parts.minimums[0]):.4g}"
    return f"w = d·(q − {parts.zero}),  d = {d:.4g}" if parts.zero else f"w = d·q,  d = {d:.4g}"


def _one(parts: BlockParts) -> BlockParts:
    if len(parts) != 1:
        raise ValueError(f"one block to draw, not {len(parts)}: pass parts.block(i)")
    return parts


def _codes_panel(ax, parts: BlockParts) -> None:
    """The stored integers: one bar per weight, its code written on it."""
    codes = parts.codes[0]
    lo, hi = parts.code_range
    x = range(codes.numel())
    ax.bar(x, codes.numpy(), color=OTHER, width=0.7)
    if codes.numel() <= 32:  # the code of each weight, readable
        for i, q in zip(x, codes.tolist(), strict=True):
            ax.text(i, q, str(q), ha="center", va="bottom" if q >= 0 else "top", fontsize=7)
    if parts.zero:
        ax.axhline(parts.zero, color=CHOSEN, lw=0.8, ls="--", label=f"q = {parts.zero} stands for 0")
        ax.legend(fontsize=8, loc="upper right")
    if hi - lo <= MAX_LEVELS_DRAWN:  # a 4-bit range: all of it, room for the numbers on top
        ax.set_ylim(lo, hi + 2)
    else:  # Q8_0: the codes used (gguf's rounding spends -127..127 on the block's largest |w|)
        top = max(abs(int(codes.min())), abs(int(codes.max())), 1)
        ax.set_ylim(-1.25 * top, 1.25 * top)
    ax.set_ylabel(f"code q\n({lo}..{hi})")
    ax.set_title(f"the {codes.numel()} codes, {parts.kind}: {hi - lo + 1} possible values each", fontsize=10)


def _values_panel(ax, parts: BlockParts, weights: torch.Tensor | None) -> None:
    """The values the codes stand for, on the grid of levels (the float weights beside them)."""
    values, levels = parts.values[0], parts.levels[0]
    x = range(values.numel())
    drawn = levels.numel() <= MAX_LEVELS_DRAWN
    if drawn:
        for v in levels.tolist():
            ax.axhline(v, color=LEVEL, lw=0.6, zorder=0)
    if weights is not None:
        w = weights.detach().float().cpu().reshape(-1)
        ax.vlines(x, w.numpy(), values.numpy(), color=CHOSEN, lw=1)
        ax.plot(x, w.numpy(), "x", color=FLOAT, label="float weight")
    ax.plot(x, values.numpy(), "o", ms=4, color=OTHER, label="value of its code")
    if drawn:  # the code each level stands for, on the right
        twin = ax.twinx()
        twin.set_ylim(ax.get_ylim())
        lo = parts.code_range[0]
        twin.set_yticks(levels.tolist(), [str(lo + i) for i in range(levels.numel())], fontsize=6)
        twin.set_ylabel("code of each level", fontsize=8)
    grid = (f"grey lines: the {levels.numel()} levels" if drawn
            else f"{levels.numel()} levels, d apart (too dense to draw)")
    ax.set_title(f"the values they stand for ({grid}; red: the rounding)", fontsize=10)
    ax.set_ylabel("value")
    ax.legend(fontsize=8, loc="lower right")


def _error_panel(ax, parts: BlockParts, weights: torch.Tensor) -> None:
    """value - float weight per weight, against the half step of nearest rounding."""
    err = parts.values[0] - weights.detach().float().cpu().reshape(-1)
    half = abs(float(parts.scales[0])) / 2
    ax.bar(range(err.numel()), err.numpy(), color=CHOSEN, width=0.7)
    for s in (half, -half):
        ax.axhline(s, color="black", lw=0.8, ls=":")
    ax.set_ylabel("value − float")
    rms = float(err.pow(2).mean().sqrt())
    ax.set_title(f"the error: max |error| = {float(err.abs().max()):.3g}, RMS = {rms:.3g}  "
                 f"(dotted: ±d/2 = ±{half:.3g}, nearest rounding's bound)", fontsize=10)


def block_figure(parts: BlockParts, weights: torch.Tensor | None = None, *, title: str | None = None) -> Figure:
    """One block taken apart (``parts``, one block: ``BlockParts.block(i)``): its codes, the values
    they stand for on the grid of levels, and, where the float ``weights`` [32] it rounds are
    known, those weights and the error."""
    parts = _one(parts)
    rows = 2 if weights is None else 3
    fig = new_figure(10, 2.4 * rows + 0.7)
    axes = fig.subplots(rows, 1, sharex=True, height_ratios=[1, 1.5, 1][:rows])
    _codes_panel(axes[0], parts)
    _values_panel(axes[1], parts, weights)
    if weights is not None:
        _error_panel(axes[2], parts, weights)
    axes[-1].set_xlabel("weight in the block")
    fig.suptitle(title or f"one {parts.kind} block: {formula(parts)}", fontsize=11)
    return fig


def rounding_errors(weights: torch.Tensor, rounded: dict[str, BlockParts]) -> Figure:
    """The same float ``weights`` [32] rounded to several formats (``{kind: its BlockParts}``): the
    error of each weight, one panel per format, on a shared scale."""
    w = weights.detach().float().cpu().reshape(-1)
    fig = new_figure(10, 1.6 * len(rounded) + 0.9)
    axes = fig.subplots(len(rounded), 1, sharex=True, sharey=True, squeeze=False)[:, 0]
    for ax, (kind, parts) in zip(axes, rounded.items(), strict=True):
        err = _one(parts).values[0] - w
        ax.bar(range(err.numel()), err.numpy(), color=CHOSEN, width=0.7)
        ax.axhline(0, color="black", lw=0.6)
        rms = float(err.pow(2).mean().sqrt())
        ax.set_title(f"{kind}: {formula(parts)};  max |error| = {float(err.abs().max()):.3g}, RMS = {rms:.3g}",
                     fontsize=9)
        ax.set_ylabel("error")
    axes[-1].set_xlabel("weight in the block")
    fig.suptitle("the same 32 weights rounded to each format: value − float weight", fontsize=11)
    return fig


def _top(logits: torch.Tensor, k: int) -> tuple[list[int], list[float]]:
    probs = torch.softmax(logits.detach().float().cpu().reshape(-1), dim=-1)
    p, ids = probs.topk(k)
    return ids.tolist(), p.tolist()


def top_k_rows(logits: dict[str, torch.Tensor], piece, k: int = 5, *, byte_level: bool = False) -> list[dict]:
    """The top ``k`` next tokens of each model side by side: one row per rank, one column per
    model (``{name: logits [V]}``), each cell the token as the renderer quotes it and its probability."""
    tops = {name: _top(v, k) for name, v in logits.items()}
    return [{"rank": r + 1, **{name: f"{quoted(piece(ids[r]), byte_level=byte_level)} {p[r]:.1%}"
                               for name, (ids, p) in tops.items()}} for r in range(k)]


def top_k_figure(logits: dict[str, torch.Tensor], piece, k: int = 5, *, byte_level: bool = False) -> Figure:
    """:func:`top_k_rows` as bars, one panel per model: the first model's top token is red in every
    panel, its other top-k tokens blue, tokens outside its top k grey."""
    tops = {name: _top(v, k) for name, v in logits.items()}
    ref_ids = next(iter(tops.values()))[0]
    fig = new_figure(min(16, 3.2 * len(tops) + 0.6), 0.38 * k + 1.6)
    axes = fig.subplots(1, len(tops), sharex=True, squeeze=False)[0]
    for ax, (name, (ids, p)) in zip(axes, tops.items(), strict=True):
        colors = [CHOSEN if i == ref_ids[0] else OTHER if i in ref_ids else LEVEL for i in ids]
        ax.barh(range(k), p, color=colors)
        for r, v in enumerate(p):
            ax.text(v, r, f" {v:.1%}", va="center", fontsize=8)
        ax.set_yticks(range(k), token_labels([piece(i) for i in ids], byte_level=byte_level), fontsize=11)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.25)  # room for the numbers after the bars
        ax.set_xticks([0, 0.5, 1])
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("probability")
    first = next(iter(tops))
    note = legend([piece(i) for ids, _ in tops.values() for i in ids], byte_level=byte_level)
    fig.suptitle(f"next token, top {k}: red = {first}'s first choice, grey = outside {first}'s top {k}", fontsize=11)
    if note:
        fig.supxlabel("‹…› one token; " + note, fontsize=8)
    return fig
