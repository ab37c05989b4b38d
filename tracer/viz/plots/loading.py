"""Loading (notebook 01): the memory arithmetic and the per-shard load timeline."""

from __future__ import annotations

from matplotlib.figure import Figure

from ...config import LlamaConfig
from ...trace import LoadShardEvent
from .common import OTHER, labels, new_figure

# Common GPU memory sizes (GB) for the "does it fit?" lines.
GPU_SIZES_GB = {"RTX 3060 (12 GB)": 12, "T4 / RTX 4080 (16 GB)": 16, "RTX 4090 / A10 (24 GB)": 24,
                "A100 40GB": 40, "A100 / H100 80GB": 80}


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
