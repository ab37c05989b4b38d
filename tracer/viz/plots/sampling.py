"""Sampling (notebook 05): what each sampling stage did to the candidates, and two branches compared.

Every panel shows the same rows: the best tokens after the repetition penalty (the warpers never
reorder them), then the chosen token if it ranks lower. So a token that top-k or top-p cuts stays
where it was, drawn as the hatched outline of the probability it had before the cut. Each panel
states its stage's effect in numbers (tokens kept, probability mass kept, the temperature's effect
on the top probability, the tokens the repetition penalty hit), read from the ``sample`` event.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass

from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from matplotlib.transforms import blended_transform_factory

from ... import knobs
from ...sampling import GREEDY_STAGES, LOGIT_STAGES, STAGES
from ...trace import SampleEvent
from .common import CHOSEN, OTHER, label, new_figure

# The stages by name, in the order of tracer.sampling.CHAIN (a stage set by a knob has its name).
RAW, PENALTY, TEMPERATURE, TOP_K, TOP_P, FINAL = STAGES
STAGE_TITLES = {
    RAW: "raw logits",
    PENALTY: "after repetition penalty",
    TEMPERATURE: "after temperature",
    TOP_K: "after top-k",
    TOP_P: "after top-p",
    FINAL: "final (drawn from)",
}
# Greedy applies the processors, then takes the highest score: no warpers, no draw (GREEDY_STAGES).
GREEDY_FINAL_TITLE = "greedy: argmax"
# LOGIT_STAGES (before any warper): panels in score units; the others in probability.
CUT = "#b0b0b0"  # a token a stage removed
PENALIZED = "#ff7f0e"  # a token the repetition penalty lowered
LEGEND = ("red: the chosen token   orange: lowered by the repetition penalty   "
          "outline: the value before this stage   grey × and hatched: cut by this stage")
GREEDY_LEGEND = "red: the chosen token   orange: lowered by the repetition penalty (outline: the raw score)"
# gids: the token labels, the cut tokens' outlines and their crosses, the numbers by the bars
ROW_LABEL, CUT_GID, CUT_MARKS, VALUE = "row-label", "cut", "cut-marks", "value"
NOTE_LINES, NOTE_WIDTH = 2, 62  # each panel's note: at most two lines of about 62 characters
BAR = 0.7  # a bar's height, in rows


@dataclass
class Rows:
    """The candidates every panel shows, and each stage's scores and probabilities at them
    (``nan`` where an old trace did not record a value)."""

    ids: list[int]
    scores: dict[str, list[float]]
    probs: dict[str, list[float]]
    extra: bool  # the last row is the chosen token, below the top ones


def rows_of(event: SampleEvent, top: int) -> Rows:
    """The ``top`` best candidates after the repetition penalty, plus the chosen token if lower."""
    if event.candidate_ids:
        ids, cols = list(event.candidate_ids), event.at_candidates
        scores = {s: list(cols[s]["scores"]) for s in STAGES}
        probs = {s: list(cols[s]["probs"]) for s in STAGES}
    else:  # a trace recorded before the common candidates: read each stage's own top list
        ids = list(event.stages[PENALTY]["ids"])
        scores, probs = {}, {}
        for s in STAGES:
            table = event.stages[s]
            where = dict(zip(table["ids"], zip(table["scores"], table["probs"], strict=True)))
            # A list holding -inf holds every token still in play: the rest were cut.
            absent = (-math.inf, 0.0) if -math.inf in table["scores"] else (math.nan, math.nan)
            scores[s] = [where.get(i, absent)[0] for i in ids]
            probs[s] = [where.get(i, absent)[1] for i in ids]
        if event.chosen_id not in ids:
            ids.append(event.chosen_id)
            for s in STAGES:
                scores[s].append(math.nan)
                probs[s].append(event.chosen_prob if s == FINAL else math.nan)
    keep = list(range(min(top, len(ids))))
    if event.chosen_id in ids and ids.index(event.chosen_id) >= top:
        keep.append(ids.index(event.chosen_id))
    return Rows([ids[i] for i in keep], {s: [v[i] for i in keep] for s, v in scores.items()},
                {s: [v[i] for i in keep] for s, v in probs.items()},
                extra=len(keep) > top)


def _greedy(event: SampleEvent) -> bool:
    """Greedy decoding skipped the warpers (a token chosen by the user included)."""
    return not event.settings.get(knobs.DO_SAMPLE.name, True)


def _pct(x: float) -> str:
    """A share as a percentage that never rounds a cut up to 100% (or a kept sliver down to 0%)."""
    if 0.999 <= x < 1:
        return "> 99.9%"
    if 0 < x < 0.001:
        return "< 0.1%"
    return f"{100 * x:.1f}%"


def stage_note(event: SampleEvent, stage: str, piece, *, shown_ids=None, byte_level: bool = False) -> str:
    """What ``stage`` did, in words and numbers (the event's recorded counts); ``shown_ids``: the
    rows on show, to say how many of them the repetition penalty hit."""
    s, kept, mass = event.settings, event.kept, event.mass_kept
    before = STAGES[STAGES.index(stage) - 1] if stage != RAW else None
    tok = f"‹{label(piece(event.chosen_id), 16, byte_level=byte_level)}›"
    if stage == RAW:
        return f"the model's score for each of {kept[RAW]:,} tokens" if kept else "the model's scores"
    if stage == PENALTY:
        pen = s.get(knobs.REPETITION_PENALTY.name, 1.0)
        if pen == 1.0:
            return "penalty 1.0: off, scores unchanged"
        here = [i for i in event.penalized_ids if shown_ids is None or i in shown_ids]
        return (f"÷{pen:g} (×{pen:g} if < 0) for the {event.penalized} tokens already in the text"
                + (f", {len(here)} of them here (orange)" if here else ""))
    if stage == FINAL:
        if _greedy(event) and not event.forced:
            return f"takes the highest score: {tok} (its softmax p = {event.chosen_prob:.3f}; no draw)"
        if _greedy(event):
            return (f"you chose {tok} instead of the highest score: p = {event.chosen_prob:.3f}, "
                    f"rank #{event.chosen_rank + 1}")
        if event.forced and event.chosen_prob == 0:
            return f"you chose {tok}, a token the filters had cut (p = 0)"
        how = "you chose" if event.forced else "drew"
        pool = f" of {kept[FINAL]:,} in play" if kept else ""
        return f"{how} {tok}: p = {event.chosen_prob:.3f}, rank #{event.chosen_rank + 1}{pool}"
    if stage == TEMPERATURE:
        t = s.get(knobs.TEMPERATURE.name, 1.0)
        if t == 1.0:
            return "T = 1: unchanged"
        p0, p1 = (event.stages[x]["probs"][0] for x in (before, stage))
        return f"T = {t:g} {'sharpens' if t < 1 else 'flattens'}: top probability {p0:.3f} → {p1:.3f}"
    knob, off, name = (knobs.TOP_K.name, 0, "top-k") if stage == TOP_K else (knobs.TOP_P.name, 1.0, "top-p")
    if s.get(knob, off) == off:
        return f"{name} = {off:g}: off, keeps all {kept[stage]:,}" if kept else f"{name} off"
    if not kept:
        return f"{name} = {s.get(knob):g}"
    return (f"{name} = {s.get(knob):g}: kept {kept[stage]:,} of {kept[before]:,} tokens "
            f"({_pct(mass[stage])} of the probability)")


def _limits(rows: Rows, stages) -> tuple[tuple[float, float], tuple[float, float]]:
    """One x range for the score panels and one for the probability panels."""
    sc = [v for s in stages if s in LOGIT_STAGES for v in rows.scores[s] if math.isfinite(v)]
    pr = [v for s in stages if s not in LOGIT_STAGES for v in rows.probs[s] if math.isfinite(v)]
    if TEMPERATURE in stages:  # the outline of the temperature panel: the probabilities before it
        pr += [v for v in rows.probs[PENALTY] if math.isfinite(v)]
    lo, hi = min(sc + [0.0]), max(sc + [0.0])
    span = max(hi - lo, 1e-3)
    return (lo - 0.02 * span, hi + 0.3 * span), (0.0, max(pr + [1e-3]) * 1.3)


def _row_labels(ax, event: SampleEvent, rows: Rows, piece, byte_level: bool, penalized: bool = True) -> None:
    """The tokens, once per row of panels: the chosen one red and bold, penalised ones orange (where
    a repetition penalty panel shows them). Plain texts left of the axes (gid ``ROW_LABEL``): a
    fraction of what tick labels cost to draw."""
    names = [label(piece(i), 12, byte_level=byte_level) for i in rows.ids]
    if rows.extra:
        names[-1] = f"#{event.chosen_rank + 1} {label(piece(rows.ids[-1]), 9, byte_level=byte_level)}"
    hit = set(event.penalized_ids) if penalized else set()
    at = blended_transform_factory(ax.transAxes, ax.transData)  # x in the axes, y in rows
    for y, (name, i) in enumerate(zip(names, rows.ids, strict=True)):
        ax.text(-0.015, y, name, transform=at, ha="right", va="center", fontsize=8, gid=ROW_LABEL,
                color=CHOSEN if i == event.chosen_id else PENALIZED if i in hit else "black",
                fontweight="bold" if i == event.chosen_id else "normal")


def _box(row: int, width: float) -> list[tuple[float, float]]:
    """A horizontal bar's corners: from 0 to ``width`` at ``row`` (rows go down from 0)."""
    return [(0, row - BAR / 2), (width, row - BAR / 2), (width, row + BAR / 2), (0, row + BAR / 2)]


def _bars(ax, event: SampleEvent, rows: Rows, values, before, cut, hit) -> None:
    """This stage's values as bars, the previous stage's as outlines (hatched where this stage
    cut the token, orange where the penalty hit it). One collection each: a bar chart's patches
    cost ten times as much to make. The chosen token's bar is a patch of its own, red."""
    y = range(len(rows.ids))
    width = [0 if c or math.isnan(v) else v for v, c in zip(values, cut, strict=True)]
    others = [r for r in y if rows.ids[r] != event.chosen_id]
    ax.add_collection(PolyCollection([_box(r, width[r]) for r in others], edgecolors="none",
                                     facecolors=[CUT if cut[r] else OTHER for r in others]), autolim=False)
    if event.chosen_id in rows.ids:
        r = rows.ids.index(event.chosen_id)
        ax.add_patch(Rectangle((0, r - BAR / 2), width[r], BAR, color=CUT if cut[r] else CHOSEN))
    for hatched in (False, True):
        keep = [r for r, (b, v, c) in enumerate(zip(before, values, cut, strict=True))
                if c == hatched and (c or b != v) and math.isfinite(b)]
        edges = [PENALIZED if rows.ids[r] in hit else "#888" if hatched else "#333" for r in keep]
        if keep:
            ax.add_collection(PolyCollection([_box(r, before[r]) for r in keep], facecolors="none", edgecolors=edges,
                                             linewidths=0.8, hatch="////" if hatched else None,
                                             gid=CUT_GID if hatched else None), autolim=False)


def _panel(ax, event: SampleEvent, rows: Rows, stage: str, *, title: str, note: str, xlim,
           previous: str | None = None) -> None:
    """One stage: bars of its values at the rows, the previous stage's as outlines, cuts hatched."""
    logit = stage in LOGIT_STAGES
    values = (rows.scores if logit else rows.probs)[stage]
    before = (rows.scores if logit else rows.probs)[previous] if previous else [math.nan] * len(values)
    scores = rows.scores[STAGES[-2] if stage == FINAL else stage]  # final draws from what top-p kept
    hit = set(event.penalized_ids) if stage == PENALTY else set()
    cut = [sc == -math.inf for sc in scores]
    _bars(ax, event, rows, values, before, cut, hit)
    # Cut tokens: a grey cross at 0 (one marker collection). Numbers right of the bars for the
    # chosen token (its way through the chain), the tokens the penalty hit, and every row of the
    # final panel; elsewhere the shared axis reads the bars. Each text costs a millisecond or two
    # to draw, and the figure is redrawn on every click.
    crosses = [r for r, c in enumerate(cut) if c]
    if crosses:  # just right of the axis, so the spine does not hide them; the first one says "cut"
        at = blended_transform_factory(ax.transAxes, ax.transData)
        ax.scatter([0.025] * len(crosses), crosses, marker="x", s=22, color="#666", linewidths=1.2, zorder=3,
                   transform=at, gid=CUT_MARKS)
        ax.text(0.045, crosses[0], "cut", transform=at, va="center", fontsize=7, color="#666")
    for yy, (i, v, b, c) in enumerate(zip(rows.ids, values, before, cut, strict=True)):
        if c or not (stage == FINAL or i == event.chosen_id or i in hit) or (not logit and v < 0.0005):
            continue
        end = max(x for x in (v, b, 0.0) if math.isfinite(x))
        ax.text(end, yy, " ?" if math.isnan(v) else f" {v:.2f}" if logit else f" {v:.3f}", va="center",
                fontsize=7, gid=VALUE)
    ax.set_ylim(len(rows.ids) - 0.5, -0.5)  # the best on top
    ax.set_xlim(*xlim)
    ax.set_yticks([])  # the rows are labelled once per row of panels (_row_labels)
    ax.xaxis.set_major_locator(MaxNLocator(3))
    if not logit:  # room for the numbers right of the bars, but no probability above 1 on the axis
        ax.set_xticks([t for t in ax.get_xticks() if 0 <= t <= 1.0001])
    elif xlim[0] < 0:
        ax.axvline(0, color="#999", linewidth=0.6)
    ax.set_title(title, fontsize=9, fontweight="bold", pad=NOTE_LINES * 9.5 + 4)
    ax.annotate(note, (0, 1), xycoords="axes fraction", xytext=(0, 3), textcoords="offset points",
                fontsize=7.5, va="bottom", color="#333", linespacing=1.1)
    ax.tick_params(axis="both", labelsize=7, length=2)
    ax.set_xlabel("score (logit)" if logit else "probability", fontsize=8, labelpad=1)


def _wrap(note: str) -> str:
    return "\n".join(textwrap.wrap(note, NOTE_WIDTH)[:NOTE_LINES])


def _knobs(event: SampleEvent) -> str:
    """The settings in the title: the knobs this step ran with (the penalty alone when greedy)."""
    def shown(knob: knobs.Knob):
        return event.settings.get(knob.name)

    penalty = f"repetition penalty {shown(knobs.REPETITION_PENALTY)}"
    if not shown(knobs.DO_SAMPLE):
        return f"greedy, {penalty}"
    return (f"T {shown(knobs.TEMPERATURE)}, top-k {shown(knobs.TOP_K)}, top-p {shown(knobs.TOP_P)}, "
            f"{penalty}")


def _grid(fig: Figure, n_rows: int, n_cols: int, top_in: float, row_in: float) -> list:
    """Axes at fixed places (in inches): faster to draw than a layout engine, and the same on
    every step. Room on the left for the token labels, above each panel for its title and note."""
    W, H = fig.get_size_inches()
    left, right, gap, above, below = 1.05, 0.15, 0.42, 0.2 + 0.135 * NOTE_LINES, 0.42
    width = (W - left - right - gap * (n_cols - 1)) / n_cols
    axes = []
    for r in range(n_rows):
        bottom = H - top_in - (r + 1) * row_in + below
        for c in range(n_cols):
            x = left + c * (width + gap)
            axes.append(fig.add_axes((x / W, bottom / H, width / W, (row_in - above - below) / H)))
    return axes


def sampling_stages(event: SampleEvent, piece, *, top: int = 10, byte_level: bool = False) -> Figure:
    """What every sampling stage did at one step, one panel each, the chosen token in red.

    Sampling: raw logits -> repetition penalty (scores) -> temperature -> top-k -> top-p -> final
    (probabilities: the softmax of that stage's scores). Greedy (``do_sample=False``): raw logits
    -> repetition penalty -> argmax; the warpers it skips are not drawn. Every panel shows the same
    rows (labelled once per row of panels). ``piece``: id -> vocabulary piece; ``byte_level``: the
    vocabulary is byte-level BPE (``Tokenizer.byte_level``).
    """
    rows = rows_of(event, top)
    greedy = _greedy(event)
    stages = GREEDY_STAGES if greedy else STAGES
    n_rows, top_in = (1 if greedy else 2), 0.45
    row_in = 0.2 + 0.135 * NOTE_LINES + 0.42 + 0.155 * len(rows.ids)
    # Sized so that the controls, the text and these panels fit on a 1440 x 900 screen (80 dpi).
    fig = Figure(figsize=(12, top_in + n_rows * row_in + 0.05), dpi=100)
    axes = _grid(fig, n_rows, 3, top_in, row_in)
    xlims = _limits(rows, stages)
    for i, (ax, stage) in enumerate(zip(axes, stages, strict=True)):
        title = GREEDY_FINAL_TITLE if greedy and stage == FINAL else STAGE_TITLES[stage]
        note = _wrap(stage_note(event, stage, piece, shown_ids=rows.ids, byte_level=byte_level))
        previous = None if i == 0 or stage == FINAL else stages[i - 1]
        _panel(ax, event, rows, stage, title=title, note=note, xlim=xlims[stage not in LOGIT_STAGES],
               previous=previous)
        if i % 3 == 0:
            _row_labels(ax, event, rows, piece, byte_level)
    how = "you chose" if event.forced else "greedy took" if greedy else "drew"
    tok = label(piece(event.chosen_id), 20, byte_level=byte_level)
    fig.suptitle(f"step {event.step}: {how} ‹{tok}› · {_knobs(event)}\n{GREEDY_LEGEND if greedy else LEGEND}",
                 fontsize=9.5, y=1 - 0.05 / fig.get_size_inches()[1], va="top")
    return fig


def compare_steps(a: SampleEvent, b: SampleEvent, piece, *, names=("A", "B"), top: int = 10,
                  byte_level: bool = False) -> Figure:
    """Two branches' final distributions at the same step, side by side, on one x scale."""
    rows = [rows_of(ev, top) for ev in (a, b)]
    n = max(len(r.ids) for r in rows)
    fig = new_figure(10, 1.3 + 0.2 * n)
    axes = fig.subplots(1, 2)
    hi = max([v for r in rows for v in r.probs[FINAL] if math.isfinite(v)] + [1e-3]) * 1.3
    for ax, ev, r, name in zip(axes, (a, b), rows, names, strict=True):
        note = _wrap(stage_note(ev, FINAL, piece, byte_level=byte_level))
        _panel(ax, ev, r, FINAL, title=f"branch {name}", note=note, xlim=(0.0, hi))
        _row_labels(ax, ev, r, piece, byte_level, penalized=False)
    fig.suptitle(f"step {a.step}: final distributions", fontsize=10)
    return fig
