"""Prefill and attention (notebook 04): the residual stream, attention patterns, GQA, logit lens."""

from __future__ import annotations

import torch
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from ...config import LlamaConfig
from ...trace import ForwardEvent
from .common import label, labels, new_figure


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
                      ax=None) -> Figure:
    """One head's weights [T, S]: rows are the query tokens, columns the key tokens they look at."""
    p = pattern.detach().float().cpu()
    if p.dim() != 2:
        raise ValueError(f"attention_heatmap wants a [T, S] pattern, got shape {tuple(p.shape)}")
    T, S = p.shape
    fig = None
    if ax is None:
        side = min(12.0, max(4.0, 0.24 * max(T, S) + 2.5))
        fig = new_figure(side + 1.2, side)
        ax = fig.add_subplot()
    im = ax.imshow(p.numpy(), cmap="viridis", norm=PowerNorm(0.5, vmin=0, vmax=1), aspect="auto")
    ax.set_xticks(range(S), labels(key_pieces), rotation=90, fontsize=8)
    ax.set_yticks(range(T), labels(query_pieces), fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(title)
    fig = fig or ax.figure
    fig.colorbar(im, ax=ax, shrink=0.8, label="attention weight (square-root colour scale)")
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


def logit_lens(event: ForwardEvent, piece, top: int = 5) -> Figure:
    """Each layer's residual read through the final norm and lm_head: top tokens and probabilities."""
    if not event.logit_lens:
        raise ValueError("this event has no logit_lens: generate with lens=True")
    rows = event.logit_lens
    top = min(top, len(rows[0]["ids"]))
    probs = torch.tensor([r["probs"][:top] for r in rows])
    fig = new_figure(1.6 * top + 1.5, 0.5 * len(rows) + 1.2)
    ax = fig.add_subplot()
    im = ax.imshow(probs.numpy(), cmap="Blues", aspect="auto", vmin=0)
    for i, r in enumerate(rows):
        for j in range(top):
            ax.text(j, i, f"{label(piece(r['ids'][j]), 10)}\n{r['probs'][j]:.2f}", ha="center", va="center",
                    fontsize=7, color="white" if probs[i, j] > 0.6 * probs.max() else "black")
    ax.set_yticks(range(len(rows)), [f"layer {r['layer']}" for r in rows])
    ax.set_xticks(range(top), [f"#{j + 1}" for j in range(top)])
    ax.set_title("logit lens: next-token guess after each layer (last position)")
    fig.colorbar(im, ax=ax, label="probability")
    return fig
