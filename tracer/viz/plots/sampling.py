"""Sampling (notebook 05): the candidates after every sampling stage, and two branches compared."""

from __future__ import annotations

from matplotlib.figure import Figure

from ...sampling import STAGES
from ...trace import SampleEvent
from .common import CHOSEN, OTHER, label, new_figure

STAGE_TITLES = {
    "raw": "raw logits",
    "repetition_penalty": "after repetition penalty",
    "temperature": "after temperature",
    "top_k": "after top-k",
    "top_p": "after top-p",
    "final": "final (drawn from)",
}


def _stage_bars(ax, event: SampleEvent, stage: str, piece, top: int, xlabel: bool = True) -> None:
    data = event.stages[stage]
    ids, probs = list(data["ids"][:top]), list(data["probs"][:top])
    names = [label(piece(i), 12) for i in ids]
    if event.chosen_id not in ids:  # show the chosen token below the top ones, with its rank
        rank, p = None, None
        if event.chosen_id in data["ids"]:
            rank = data["ids"].index(event.chosen_id)
            p = data["probs"][rank]
        elif stage == "final":
            rank, p = event.chosen_rank, event.chosen_prob
        if p is not None:
            ids.append(event.chosen_id)
            probs.append(p)
            names.append(f"#{rank + 1} {label(piece(event.chosen_id), 9)}")
    colors = [CHOSEN if i == event.chosen_id else OTHER for i in ids]
    y = range(len(ids))
    ax.barh(y, probs, color=colors)
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(max(probs, default=0) * 1.3, 1e-3))
    ax.set_title(STAGE_TITLES.get(stage, stage), fontsize=9)
    ax.tick_params(axis="x", labelsize=7)
    if xlabel:
        ax.set_xlabel("probability", fontsize=8)
    for yy, p in zip(y, probs, strict=True):
        ax.text(p, yy, f" {p:.3f}", va="center", fontsize=7)


def _chosen_note(event: SampleEvent, piece, top: int) -> str:
    how = "forced (branch)" if event.forced else ("sampled" if event.settings.get("do_sample") else "greedy")
    note = f"chosen {label(piece(event.chosen_id), 20)!r} ({how}), p={event.chosen_prob:.3f}, rank #{event.chosen_rank + 1}"
    if event.chosen_id not in event.stages["final"]["ids"][:top]:
        note += f" (outside the top {top} shown)"
    return note


def sampling_stages(event: SampleEvent, piece, *, top: int = 10) -> Figure:
    """Top candidates after every sampling stage, chosen token in red (probabilities: softmax of
    that stage's scores; a filtered token has probability 0). A chosen token outside the top
    ``top`` is added below them with its rank."""
    fig = new_figure(12, 1.6 + 0.28 * top * 2)
    axes = fig.subplots(2, 3).flatten()
    for n, (ax, stage) in enumerate(zip(axes, STAGES, strict=True)):
        _stage_bars(ax, event, stage, piece, top, xlabel=n >= 3)
    s = event.settings
    knobs = (f"T={s.get('temperature')}, top_k={s.get('top_k')}, top_p={s.get('top_p')}, "
             f"rep={s.get('repetition_penalty')}" if s.get("do_sample") else
             f"greedy, rep={s.get('repetition_penalty')}")
    fig.suptitle(f"step {event.step}: {knobs}; {event.candidates} tokens left\n{_chosen_note(event, piece, top)}",
                 fontsize=10)
    return fig


def compare_steps(a: SampleEvent, b: SampleEvent, piece, *, names=("A", "B"), top: int = 10) -> Figure:
    """Two branches' final distributions at the same step, side by side."""
    fig = new_figure(10, 1.4 + 0.3 * top)
    axes = fig.subplots(1, 2)
    for ax, ev, name in zip(axes, (a, b), names, strict=True):
        _stage_bars(ax, ev, "final", piece, top)
        ax.set_title(f"branch {name}: {_chosen_note(ev, piece, top)}", fontsize=8)
    fig.suptitle(f"step {a.step}: final distributions", fontsize=10)
    return fig
