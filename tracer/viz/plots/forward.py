"""Prefill and attention (notebook 04): the residual stream, attention patterns, GQA, the logit
lens, and heads found by a score (:mod:`tracer.viz.heads`) then tested by zeroing them."""

from __future__ import annotations

import math

import torch
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from ...config import LlamaConfig
from ...trace import ForwardEvent
from ..heads import first_top_layer, top_heads
from ..tokens import legend, quoted
from .common import CHOSEN, OTHER, label, new_figure

CONTROL = "#8c8c8c"  # control heads: ablated to show that the tested heads' effect is specific


def token_labels(pieces, width: int = 14, *, byte_level: bool = False) -> list[str]:
    """Pieces as axis labels between the renderer's marks, so that a lone ``.`` is not a speck."""
    return [quoted(label(p, width, byte_level=byte_level)) for p in pieces]


def _footnote(fig: Figure, pieces, byte_level: bool) -> None:
    """The legend of the signs the pieces use, under the figure (nothing when none is used)."""
    text = legend(pieces, byte_level=byte_level)
    if text:
        fig.supxlabel("‹…› one token; " + text, fontsize=8, wrap=True)


def residual_norms(event: ForwardEvent) -> Figure:
    """L2 norm of the residual stream after each block, at the last position (needs lens=True)."""
    if not event.residual_norms:
        raise ValueError("this event has no residual_norms: generate with lens=True")
    norms = event.residual_norms
    fig = new_figure(6, 3)
    ax = fig.add_subplot()
    ax.plot(range(len(norms)), norms, marker="o")
    ax.set_xticks(range(len(norms)))
    ax.set_xlabel("layer (block output, resid_post)")
    ax.set_ylabel("||residual||  (L2)")
    ax.set_title(f"residual stream norm by layer, last position ({event.stage}, step {event.step})")
    ax.grid(alpha=0.3)
    return fig


def attention_heatmap(pattern: torch.Tensor, query_pieces, key_pieces, *, title: str = "attention",
                      ax=None, byte_level: bool = False) -> Figure:
    """One head's weights [T, S]: rows are the query tokens, columns the key tokens they look at.
    ``byte_level``: the pieces are from a byte-level BPE vocabulary (``Tokenizer.byte_level``)."""
    p = pattern.detach().float().cpu()
    if p.dim() != 2:
        raise ValueError(f"attention_heatmap wants a [T, S] pattern, got shape {tuple(p.shape)}")
    T, S = p.shape
    fig = None
    if ax is None:
        side = min(12.0, max(5.5, 0.24 * max(T, S) + 3.0))
        fig = new_figure(side + 1.2, side)
        ax = fig.add_subplot()
    im = ax.imshow(p.numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1), aspect="auto")
    size = 10 if max(T, S) <= 24 else 8
    ax.set_xticks(range(S), token_labels(key_pieces, byte_level=byte_level), rotation=90, fontsize=size)
    ax.set_yticks(range(T), token_labels(query_pieces, byte_level=byte_level), fontsize=size)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title)
    if fig is not None:
        _footnote(fig, list(key_pieces), byte_level)
    fig = fig or ax.figure
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention weight (√ scale)")
    return fig


def attention_heads(patterns: torch.Tensor, pieces, cfg: LlamaConfig, *, layer: int) -> Figure:
    """Every head of one layer [H, T, S], one column per KV group: heads in a column share K and V."""
    p = patterns.detach().float().cpu()
    H = p.shape[0]
    rep, groups = cfg.n_rep, cfg.num_key_value_heads
    # One row per KV head (its query heads side by side); plain MHA: a grid of up to 8 columns.
    cols = rep if rep > 1 else min(8, H)
    rows = groups if rep > 1 else -(-H // cols)
    fig = new_figure(1.9 * cols + 0.6, 1.9 * rows + 0.9)
    axes = fig.subplots(rows, cols, squeeze=False)
    for h in range(H):
        ax = axes[h // cols][h % cols]
        ax.imshow(p[h].numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"q head {h} (kv {h // rep})", fontsize=8)
    for ax in axes.flat[H:]:
        ax.axis("off")
    fig.suptitle(f"layer {layer}, {len(pieces)} tokens: {H} query heads, {groups} KV heads "
                 f"({cfg.attention_kind})\n" + ("each row shares one KV head" if rep > 1 else
                                                 "each query head has its own KV head"), fontsize=10)
    return fig


def gqa_groups(cfg: LlamaConfig) -> Figure:
    """Which query heads read which key/value head (repeat_kv's lesson)."""
    H, G, rep = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.n_rep
    fig = new_figure(max(6, 0.5 * H + 1), 2.4)
    ax = fig.add_subplot()
    colors = [f"C{g % 10}" for g in range(G)]
    for h in range(H):
        g = h // rep
        kv_x = (g + 0.5) * H / G - 0.5
        ax.plot([h, kv_x], [1, 0], color=colors[g], lw=1)
        ax.scatter([h], [1], s=120, color=colors[g], zorder=3)
        ax.text(h, 1.15, f"q{h}", ha="center", fontsize=8)
    for g in range(G):
        kv_x = (g + 0.5) * H / G - 0.5
        ax.scatter([kv_x], [0], s=300, marker="s", color=colors[g], zorder=3)
        ax.text(kv_x, -0.3, f"kv{g}", ha="center", fontsize=9)
    ax.set_ylim(-0.5, 1.4)
    ax.axis("off")
    ax.set_title(f"{cfg.attention_kind}: {H} query heads share {G} key/value heads ({rep} per KV head)")
    return fig


def logit_lens(event: ForwardEvent, piece, top: int = 5, *, byte_level: bool = False) -> Figure:
    """Each layer's residual read through the final norm and lm_head: top tokens and probabilities.
    ``piece``: id -> vocabulary piece; ``byte_level`` as in :func:`attention_heatmap`."""
    if not event.logit_lens:
        raise ValueError("this event has no logit_lens: generate with lens=True")
    rows = event.logit_lens
    top = min(top, len(rows[0]["ids"]))
    probs = torch.tensor([r["probs"][:top] for r in rows])
    fig = new_figure(min(9.5, 1.55 * top + 1.8), 0.3 * len(rows) + 1.6)
    ax = fig.add_subplot()
    im = ax.imshow(probs.numpy(), cmap="Blues", aspect="auto", vmin=0, vmax=1)
    for i, r in enumerate(rows):
        names = token_labels([piece(t) for t in r["ids"][:top]], 10, byte_level=byte_level)
        for j in range(top):
            ax.text(j, i, f"{names[j]} {r['probs'][j]:.2f}", ha="center", va="center", fontsize=9,
                    color="white" if probs[i, j] > 0.6 else "black")
    ax.set_yticks(range(len(rows)), [f"layer {r['layer']}" for r in rows], fontsize=8)
    ax.set_xticks(range(top), [f"guess #{j + 1}" for j in range(top)])
    ax.xaxis.tick_top()
    ax.set_title("logit lens: next-token guesses after each layer (last position)")
    fig.colorbar(im, ax=ax, label="probability", shrink=0.6)
    _footnote(fig, [piece(t) for r in rows for t in r["ids"][:top]], byte_level)
    return fig


# ---------------------------------------------------------------------------------------------
# Heads found by a score, and what removing them costs (tracer.viz.heads)


def head_scores(scores: dict[str, torch.Tensor], *, group: int = 1, baselines: dict[str, float] | None = None,
                top: int = 3) -> Figure:
    """One [layers x heads] grid per score (scores in 0..1, one colour scale); the ``top`` best heads
    of each grid carry their value. ``group``: query heads per KV head (GQA), drawn as white
    separators; ``baselines``: a reference value per score (e.g. a uniform head's), in the title."""
    L, H = next(iter(scores.values())).shape
    fig = new_figure(min(9.5, min(3.2, 0.3 * H + 0.6) * len(scores) + 1.2), 0.22 * L + 1.8)
    axes = fig.subplots(1, len(scores), squeeze=False, sharey=True)[0]
    for ax, (name, s) in zip(axes, scores.items(), strict=True):
        s = s.detach().float().cpu()
        im = ax.imshow(s.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
        for h in top_heads(s, top):
            ax.text(h.head, h.layer, f"{h.score:.2f}", ha="center", va="center", fontsize=7.5,
                    color="black" if h.score > 0.5 else "white")
        for g in range(group, H, group):
            ax.axvline(g - 0.5, color="white", lw=1.5)
        ax.set_xticks(range(H), [str(h) for h in range(H)], fontsize=8)
        ax.set_yticks(range(L), [str(i) for i in range(L)], fontsize=8)
        ax.set_xlabel("query head" + (f"\n(white lines: KV groups of {group})" if group > 1 else ""))
        base = f", {(baselines or {})[name]:.2f} if uniform" if name in (baselines or {}) else ""
        ax.set_title(f"{name}\nmean {s.mean():.2f}{base}", fontsize=10)
    axes[0].set_ylabel("layer")
    fig.colorbar(im, ax=list(axes), shrink=0.6, fraction=0.04, pad=0.02, label="score (mean attention weight)")
    return fig


def head_patterns(panels: list[tuple[str, torch.Tensor]], *, boundary: int | None = None) -> Figure:
    """Several heads' weights [T, T] side by side (positions on the axes); ``boundary``: the first
    position of a repeat, marked by dashed lines."""
    fig = new_figure(min(9.5, 3.0 * len(panels) + 0.8), 3.6)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, p) in zip(axes, panels, strict=True):
        p = p.detach().float().cpu()
        im = ax.imshow(p.numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1))
        if boundary is not None:
            for line in (ax.axvline, ax.axhline):
                line(boundary - 0.5, color="white", lw=0.8, ls="--")
        ax.set_xlabel("key position (attended to)")
        ax.set_ylabel("query position")
        ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=list(axes), shrink=0.8, fraction=0.04, pad=0.02, label="attention weight (√ scale)")
    if boundary is not None:
        fig.supxlabel(f"dashed lines: the repeat starts at position {boundary}", fontsize=9)
    return fig


def lens_probability(probs: torch.Tensor, token_id: int, piece, *, byte_level: bool = False) -> Figure:
    """The logit lens [L, V] followed for one token: its probability per layer next to the top
    guess's (log scale), and its rank; a line marks the first layer where it is the top guess."""
    probs = probs.detach().float().cpu()
    L = probs.shape[0]
    p = probs[:, token_id]
    rank = (probs > p[:, None]).sum(-1) + 1
    first = first_top_layer(probs, token_id)
    name = quoted(label(piece(token_id), 16, byte_level=byte_level))
    fig = new_figure(9.5, 3.8)
    ax_p, ax_r = fig.subplots(1, 2)
    layers = range(L)
    ax_p.plot(layers, p.numpy(), marker="o", ms=3, color=CHOSEN, label=f"P({name})")
    ax_p.plot(layers, probs.max(-1).values.numpy(), ls="--", color=OTHER, label="P(top guess)")
    ax_p.set_yscale("log")
    ax_p.set_ylabel("probability (log scale)")
    ax_p.legend(fontsize=8, loc="lower right")
    ax_r.plot(layers, rank.numpy(), marker="o", ms=3, color=CHOSEN)
    ax_r.set_yscale("log")
    ax_r.invert_yaxis()  # rank 1 at the top
    ax_r.set_ylabel(f"rank of {name} (1 = top guess)")
    for ax in (ax_p, ax_r):
        ax.set_xlabel("layer (its output read through final norm + lm_head)", fontsize=9)
        ax.grid(alpha=0.3)
        if first is not None:
            ax.axvline(first, color="black", lw=0.8, ls=":")
    if first is None:
        found = "never the top guess"
    elif first == L - 1:
        found = f"the top guess only after the last layer (layer {first}, p = {p[first]:.2f})"
    elif any(probs[first:].argmax(-1) != token_id):
        found = f"first the top guess after layer {first} (p = {p[first]:.2f})"
    else:
        found = f"the top guess from layer {first} on (p = {p[first]:.2f})"
    last = f"; p = {p[-1]:.2f} after the last layer" if first != L - 1 else ""
    fig.suptitle(f"logit lens for {name}: {found}{last}", fontsize=11)
    _footnote(fig, [piece(token_id)], byte_level)
    return fig


def ablation_losses(losses: dict[str, float], *, controls=(), title: str = "loss with heads zeroed") -> Figure:
    """Horizontal bars of mean loss per ablation; the first entry is the model untouched (a dashed
    line marks it), ``controls`` are drawn grey, the tested ablations red."""
    names = list(losses)
    fig = new_figure(8, 0.42 * len(names) + 1.3)
    ax = fig.add_subplot()
    colors = [OTHER if i == 0 else CONTROL if n in controls else CHOSEN for i, n in enumerate(names)]
    y = range(len(names))
    ax.barh(y, [losses[n] for n in names], color=colors)
    for i, n in zip(y, names, strict=True):
        ax.text(losses[n], i, f" {losses[n]:.2f}", va="center", fontsize=8)
    ax.axvline(losses[names[0]], color=OTHER, ls="--", lw=1)
    ax.set_yticks(y, names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, max(losses.values()) * 1.15)
    ax.set_xlabel("mean loss on the tokens of the repeat that copying can predict\n(nats; lower = better predicted)")
    ax.set_title(title)
    return fig


def loss_by_position(curves: dict[str, torch.Tensor], *, boundary: int, controls=(),
                     vocab_size: int | None = None) -> Figure:
    """Per-token loss [T] along a repeated sequence, one line per ablation (the first: the model
    untouched; ``controls`` grey); the repeat (from ``boundary``) shaded; ``vocab_size``: a line at
    ln(V), the loss of a uniform guess."""
    fig = new_figure(9.5, 4.2)
    ax = fig.add_subplot()
    T = len(next(iter(curves.values())))
    ax.axvspan(boundary - 0.5, T - 0.5, color="0.92", zorder=0, label="the repeat")
    tested = iter([CHOSEN, "#ff7f0e", "#9467bd", "#8c564b"])
    for i, (name, c) in enumerate(curves.items()):
        color = OTHER if i == 0 else CONTROL if name in controls else next(tested, None)
        # The untouched model on top: a control that changes nothing hides under it, not over it.
        ax.plot(range(len(c)), c.detach().float().cpu().numpy(), lw=1.6 if i == 0 else 1.2, label=name,
                color=color, zorder=4 if i == 0 else 3 if name in controls else 2, ls=":" if name in controls else "-")
    if vocab_size:
        ax.axhline(math.log(vocab_size), color="black", ls=":", lw=1,
                   label=f"uniform guess over {vocab_size:,} tokens (ln V)")
    ax.set_xlabel("position")
    ax.set_ylabel("loss of the token here (nats)")
    ax.set_ylim(bottom=0)
    fig.legend(fontsize=8, loc="outside lower center", ncols=3)
    ax.grid(alpha=0.3)
    ax.set_title("how well each token was predicted from the ones before it")
    return fig
