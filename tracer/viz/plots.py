"""Matplotlib figures as pure functions of trace events and tensors.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global figure
registry, nothing shown as a side effect); a notebook shows it by making it the cell's last value,
a widget turns it into a PNG with :func:`to_png`. Layout is "constrained", so labels are not clipped.
"""

from __future__ import annotations

import functools
import io

import torch
from matplotlib import font_manager, ft2font
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from ..config import LlamaConfig
from ..sampling import STAGES
from ..trace import ForwardEvent, LoadShardEvent, SampleEvent

# Common GPU memory sizes (GB) for the "does it fit?" lines.
GPU_SIZES_GB = {"RTX 3060 (12 GB)": 12, "T4 / RTX 4080 (16 GB)": 16, "RTX 4090 / A10 (24 GB)": 24,
                "A100 40GB": 40, "A100 / H100 80GB": 80}
CHOSEN = "#d62728"  # the chosen token, in every plot
OTHER = "#1f77b4"
STAGE_TITLES = {
    "raw": "raw logits",
    "repetition_penalty": "after repetition penalty",
    "temperature": "after temperature",
    "top_k": "after top-k",
    "top_p": "after top-p",
    "final": "final (drawn from)",
}


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained", dpi=100)


def to_png(fig: Figure, dpi: int = 80) -> bytes:
    """The figure as PNG bytes (what the widgets put in their image outputs)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Token labels


@functools.cache
def _font_chars() -> frozenset[int]:
    path = font_manager.findfont("DejaVu Sans")
    return frozenset(ft2font.FT2Font(path).get_charmap())


def label(piece: str, width: int = 14) -> str:
    """A token piece made printable on an axis: characters the font lacks (emoji) become U+XXXX,
    control characters become escapes, and long pieces are cut."""
    chars = _font_chars()
    out = []
    for c in piece:
        if c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif ord(c) < 32 or ord(c) not in chars:
            out.append(f"U+{ord(c):04X}")
        else:
            out.append(c)
    text = "".join(out).replace("$", r"\$")  # no mathtext
    return text if len(text) <= width else text[: width - 1] + "…"


def labels(pieces, width: int = 14) -> list[str]:
    return [label(p, width) for p in pieces]


# ---------------------------------------------------------------------------------------------
# Loading (notebook 01)


def weights_memory(cfg: LlamaConfig, *, name: str = "model", gpus: dict[str, float] | None = None,
                   kv_tokens: int | None = None) -> Figure:
    """Weights in fp32 / fp16 / bf16 (GB, from the config arithmetic) against common GPU sizes."""
    gpus = GPU_SIZES_GB if gpus is None else gpus
    rows = cfg.memory_table()
    fig = new_figure(9, 3.4)
    ax = fig.add_subplot()
    names = [r["dtype"] for r in rows]
    gb = [r["gb"] for r in rows]
    kv = [cfg.kv_cache_bytes(kv_tokens, d) / 1e9 if kv_tokens else 0.0 for d in names]
    ax.barh(names, gb, color=["#9467bd", "#2ca02c", "#17becf"], label="weights")
    if kv_tokens:
        ax.barh(names, kv, left=gb, color="#ff7f0e", alpha=0.7, label=f"KV cache, {kv_tokens} tokens")
        ax.legend(loc="lower right", fontsize=8)
    total = [g + k for g, k in zip(gb, kv, strict=True)]
    for y, (g, k, r) in enumerate(zip(gb, kv, rows, strict=True)):
        extra = f" + KV {k:.3g} GB" if k else ""
        ax.text(g + k, y, f" {g:.3g} GB ({r['bytes_per_param']} B/param){extra}", va="center", fontsize=8,
                bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})
    above = [v for v in gpus.values() if v >= max(total)]
    top = max(max(total) * 1.6, min(above, default=0) * 1.05)
    shown = {gpu: size for gpu, size in gpus.items() if size <= top}
    for size in shown.values():
        ax.axvline(size, color="0.4", ls="--", lw=0.8)
    gpu_axis = ax.secondary_xaxis("top")
    gpu_axis.set_xticks(list(shown.values()), list(shown), rotation=25, ha="left", fontsize=7)
    ax.set_xlim(0, top)
    ax.set_xlabel("GB (10^9 bytes)")
    ax.set_title(f"{name}: {cfg.num_parameters / 1e9:.3g}e9 parameters x bytes per parameter")
    ax.invert_yaxis()
    return fig


def load_timeline(events) -> Figure:
    """One bar per weight file from ``load_shard`` events: when it was read and for how long (left),
    and its bytes on disk vs in memory (right), annotated with dtype, casts and device."""
    shards = [e for e in events if isinstance(e, LoadShardEvent)]
    if not shards:
        raise ValueError("no load_shard events in this trace")
    t0 = min(e.time for e in shards)
    fig = new_figure(10, 1.2 + 0.45 * len(shards))
    ax_t, ax_b = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    y = list(range(len(shards)))
    names = [e.file for e in shards]
    ms = [e.seconds * 1e3 for e in shards]
    ax_t.barh(y, ms, left=[(e.time - t0) * 1e3 for e in shards], color=OTHER)
    for i, e in enumerate(shards):
        casts = ", ".join(f"{k} x{v}" for k, v in e.casts.items()) or "no casts"
        ax_t.text((e.time - t0) * 1e3 + ms[i], i, f" {ms[i]:.1f} ms -> {e.dtype} on {e.device} ({casts})",
                  va="center", fontsize=8)
    ax_t.set_yticks(y, labels(names, 40))
    ax_t.invert_yaxis()
    ax_t.set_xlabel("milliseconds since the first shard started")
    ax_t.set_title("per-shard load timeline")
    ax_t.margins(x=0.6)
    mb_disk = [e.bytes_on_disk / 1e6 for e in shards]
    mb_mem = [e.bytes_in_memory / 1e6 for e in shards]
    ax_b.barh([v - 0.2 for v in y], mb_disk, height=0.4, color="0.6", label="on disk")
    ax_b.barh([v + 0.2 for v in y], mb_mem, height=0.4, color="#2ca02c", label="in memory")
    ax_b.set_xlabel("MB")
    ax_b.set_title("bytes per shard")
    ax_b.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


# ---------------------------------------------------------------------------------------------
# Prefill and attention (notebook 03)


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


# ---------------------------------------------------------------------------------------------
# Sampling (notebook 04)


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


# ---------------------------------------------------------------------------------------------
# Any tensor (notebook 05)


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
