"""Loading (notebook 01): the memory arithmetic and the per-shard load timeline.

Every label stays inside its axes: a label that would run past the right edge widens the x range
until it fits (:func:`keep_inside`), so it never runs into the next panel.
"""

from __future__ import annotations

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ...config import LlamaConfig
from ...dtypes import BFLOAT16, FLOAT16, FLOAT32
from ...trace import LoadShardEvent
from .common import OTHER, labels, new_figure

# Common GPU memory sizes (GB) for the "does it fit?" lines.
GPU_SIZES_GB = {"RTX 3060 (12 GB)": 12, "T4 / RTX 4080 (16 GB)": 16, "RTX 4090 / A10 (24 GB)": 24,
                "A100 40GB": 40, "A100 / H100 80GB": 80}
DTYPE_COLOURS = {FLOAT32.name: "#9467bd", FLOAT16.name: "#2ca02c", BFLOAT16.name: "#17becf"}
KV_COLOUR = "#ff7f0e"
# Stored types in a weight file (safetensors dtypes, GGUF block formats), one colour each.
TYPE_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#8c564b", "#e377c2", "#7f7f7f")


def count_text(n: float) -> str:
    """A parameter count in words: ``6.33 million``, ``6.74 billion``."""
    for size, word in ((1e9, "billion"), (1e6, "million"), (1e3, "thousand")):
        if n >= size:
            return f"{n / size:.3g} {word}"
    return f"{n:.3g}"


def size_text(nbytes: float) -> str:
    """Bytes in the unit that reads best: ``25.3 MB``, ``13.5 GB`` (10^3 steps, as GPU makers count)."""
    for size, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if nbytes >= size:
            return f"{nbytes / size:.3g} {unit}"
    return f"{nbytes:.0f} B"


def casts_text(casts: dict[str, int]) -> str:
    """Dtype casts of a ``load_shard`` event as text: ``float16 → float32 (34 tensors)``."""
    parts = [f"{k.replace('->', ' → ')} ({v} tensor{'s' if v != 1 else ''})" for k, v in casts.items()]
    return ", ".join(parts) or "no casts"


def keep_inside(fig: Figure, ax, texts, *, widest: float = 0.6) -> None:
    """Widen ``ax``'s x range so that every text in ``texts`` (left aligned, anchored in data
    coordinates after a bar) ends inside the axes: labels never run into the next panel. A text
    wider than ``widest`` of the axes is set smaller first, so the bars keep some room."""
    lo, base = ax.get_xlim()  # the data's own range: the axis never gets narrower than this
    for _ in range(4):  # new tick labels change the axes' width a little: settle in a few passes
        fig.draw_without_rendering()
        box = ax.get_window_extent()
        for t in texts:
            w = t.get_window_extent().width
            if w > widest * box.width:
                t.set_fontsize(t.get_fontsize() * widest * box.width / w)
        fig.draw_without_rendering()
        need = base
        for t in texts:  # the text's anchor must sit at least the text's width left of the edge
            w = t.get_window_extent().width + 4
            need = max(need, lo + (t.get_position()[0] - lo) * box.width / max(box.width - w, 1.0))
        if abs(need - ax.get_xlim()[1]) <= 1e-3 * need:
            return
        ax.set_xlim(lo, need)


def _unit(nbytes: float) -> tuple[float, str]:
    return (1e9, "GB") if nbytes >= 1e9 else (1e6, "MB") if nbytes >= 1e6 else (1e3, "kB")


def _memory_panel(ax, name: str, cfg: LlamaConfig, kv_tokens: int, gpus: dict[str, float],
                  first: tuple[str, LlamaConfig] | None) -> list:
    """One model's row: weights (+ KV cache) per dtype, on a scale that fits this model."""
    rows = cfg.memory_table()
    weights = [r["bytes"] for r in rows]
    kv = [cfg.kv_cache_bytes(kv_tokens, r["dtype"]) for r in rows]
    top = max(w + k for w, k in zip(weights, kv))
    scale, unit = _unit(top)
    names = [r["dtype"] for r in rows]
    ax.barh(names, [w / scale for w in weights], color=[DTYPE_COLOURS[d] for d in names], label="weights")
    if kv_tokens:
        ax.barh(names, [k / scale for k in kv], left=[w / scale for w in weights], color=KV_COLOUR,
                alpha=0.7, label=f"KV cache, {kv_tokens} tokens")
    texts = [ax.text((w + k) / scale, y, f" {size_text(w)} ({r['bytes_per_param']} B/param)"
                     + (f" + KV {size_text(k)}" if k else ""), va="center", fontsize=8,
                     bbox={"fc": "white", "ec": "none", "alpha": 0.8, "pad": 1})
             for y, (w, k, r) in enumerate(zip(weights, kv, rows))]
    right = top / scale * 1.15
    gb_scale = 1e9 / scale
    shown = {g: s for g, s in gpus.items() if top >= 1e9 and s * gb_scale <= max(right, 1.6 * top / scale)}
    for size in shown.values():
        ax.axvline(size * gb_scale, color="0.4", ls="--", lw=0.8)
        right = max(right, size * gb_scale * 1.05)
    if shown:
        ax.secondary_xaxis("top").set_xticks([s * gb_scale for s in shown.values()], list(shown),
                                             rotation=20, ha="left", fontsize=7)
    ax.set_xlim(0, right)
    ax.set_xlabel(unit + (" (10^9 bytes)" if unit == "GB" else " (10^6 bytes)" if unit == "MB" else ""))
    ratio = "" if first is None else f", {cfg.num_parameters / first[1].num_parameters:,.0f}x {first[0]}"
    small = "" if shown or top >= 1e9 else f"; far below a {min(gpus.values(), default=0):g} GB GPU"
    ax.set_title(f"{name}: {count_text(cfg.num_parameters)} parameters{ratio}{small}", fontsize=10, loc="left")
    ax.invert_yaxis()
    if kv_tokens:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    return texts


def weights_memory(models: LlamaConfig | dict[str, LlamaConfig], *, name: str = "model",
                   gpus: dict[str, float] | None = None, kv_tokens: int | None = None) -> Figure:
    """Weights in fp32 / fp16 / bf16 (+ a KV cache), one row per model, each on its own scale.

    ``models``: one config (called ``name``) or ``{name: config}``; a 6M-parameter model and a 7B
    one differ 1000x, so a shared axis would hide the small one: each row gets its own unit (MB or
    GB), GPU sizes are drawn where they are on the same scale, and titles give the ratio.
    ``kv_tokens``: KV cache tokens; None = each model's full context (``max_position_embeddings``).
    """
    models = {name: models} if isinstance(models, LlamaConfig) else dict(models)
    gpus = GPU_SIZES_GB if gpus is None else gpus
    fig = new_figure(9, 0.7 + 2.2 * len(models))
    axes = fig.subplots(len(models), 1, squeeze=False)[:, 0]
    first = None
    for ax, (label, cfg) in zip(axes, models.items()):
        tokens = cfg.max_position_embeddings if kv_tokens is None else kv_tokens
        texts = _memory_panel(ax, label, cfg, tokens, gpus, first)
        keep_inside(fig, ax, texts)
        first = first or (label, cfg)
    fig.suptitle("memory = parameters x bytes per parameter (+ KV cache); each row on its own scale",
                 fontsize=10)
    return fig


def load_timeline(events) -> Figure:
    """One bar per weight file from ``load_shard`` events: when it was read and for how long,
    split by stored type (a GGUF mixes Q4_1, Q8_0, float32...: the legend counts them), and the
    runtime dtype and device (left); its bytes on disk vs in memory (right)."""
    shards = [e for e in events if isinstance(e, LoadShardEvent)]
    if not shards:
        raise ValueError("no load_shard events in this trace")
    t0 = min(e.time for e in shards)
    end = max(e.time - t0 + e.seconds for e in shards)
    scale, unit = (1.0, "seconds") if end > 10 else (1e3, "milliseconds")
    totals: dict[str, int] = {}
    for e in shards:
        for t, r in e.by_type.items():
            totals[t] = totals.get(t, 0) + r["tensors"]
    colour = {t: TYPE_COLOURS[i % len(TYPE_COLOURS)] for i, t in enumerate(totals)}
    fig = new_figure(10, 1.6 + 0.5 * len(shards))
    ax_t, ax_b = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    texts = []
    for y, e in enumerate(shards):
        left = (e.time - t0) * scale
        for t, r in e.by_type.items() or [(None, {"seconds": e.seconds})]:  # in the order they were read
            ax_t.barh(y, r["seconds"] * scale, left=left, color=colour.get(t, OTHER), height=0.6)
            left += r["seconds"] * scale
        took = f"{e.seconds:.1f} s" if scale == 1 else f"{e.seconds * 1e3:.1f} ms"
        texts.append(ax_t.text((e.time - t0 + e.seconds) * scale, y, f" {took} → {e.dtype} on {e.device}",
                               va="center", fontsize=8))
    ax_t.set_yticks(range(len(shards)), labels([e.file for e in shards], 40))
    ax_t.set_ylim(len(shards) - 0.4, -0.6)
    ax_t.set_xlabel(f"{unit} since the first shard started")
    ax_t.set_title("per-shard load timeline")
    ax_t.set_xlim(0, end * scale * 1.02)
    handles = [Patch(color=colour[t]) for t in totals]
    ax_t.legend(handles, [f"{t}: {n} tensors" for t, n in totals.items()], title="stored type (bar: its share of the time)",
                fontsize=7, title_fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.22 - 0.15 / len(shards)),
                ncol=min(len(totals), 4))
    mb_disk = [e.bytes_on_disk / 1e6 for e in shards]
    mb_mem = [e.bytes_in_memory / 1e6 for e in shards]
    ax_b.barh([v - 0.2 for v in range(len(shards))], mb_disk, height=0.4, color="0.6", label="on disk")
    ax_b.barh([v + 0.2 for v in range(len(shards))], mb_mem, height=0.4, color="#2ca02c", label="in memory")
    ax_b.set_xlabel("MB")
    ax_b.set_title("bytes per shard")
    ax_b.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    keep_inside(fig, ax_t, texts)
    return fig
