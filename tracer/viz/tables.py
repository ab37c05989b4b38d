"""Small tables for the notebooks: rows as plain dicts (testable), shown with :func:`html_table`."""

from __future__ import annotations

import html

from IPython.display import HTML

from ..config import LlamaConfig, dtype_bytes
from ..trace import ForwardEvent, LoadShardEvent
from .heads import top_heads
from .plots import GPU_SIZES_GB, casts_text, size_text
from .tokens import quoted


def html_table(rows: list[dict], columns: list[str] | None = None, *, title: str | None = None) -> HTML:
    """A list of dicts as an HTML table (floats shown with 4 significant digits)."""
    columns = columns or (list(rows[0]) if rows else [])

    def cell(v) -> str:
        if isinstance(v, float):
            v = f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    caption = f"<caption style='text-align:left'><b>{html.escape(title)}</b></caption>" if title else ""
    return HTML(f"<table class='tracer-table'>{caption}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")


# What a GPU needs beyond weights and KV cache: activations, the CUDA context, fragmentation.
# "1-2 GB in practice"; the table takes the safe end, so a "yes" means it really fits.
HEADROOM_GB = 2.0


def _shown_gb(v: float) -> float:
    """A part of a memory sum as the table shows it: GB to two decimals, or exact (MB, kB)."""
    return round(v, 2) if v >= 1 else v


def _sum_text(parts: tuple[float, ...]) -> str:
    each = [f"{v:.2f} GB" if v >= 1 else size_text(v * 1e9) for v in parts]
    return " + ".join(each) + f" = {sum(_shown_gb(v) for v in parts):.2f} GB"


def fits_table(cfg: LlamaConfig, *, gpus: dict[str, float] | None = None, kv_tokens: int = 4096,
               headroom_gb: float = HEADROOM_GB) -> list[dict]:
    """For each GPU size and dtype: do weights + a ``kv_tokens`` KV cache + ``headroom_gb`` fit?

    The first row says what is needed, as a sum; then "yes, N GB spare" or "no, N GB short"
    (decided on the exact bytes; the numbers shown are the rounded ones, so that they add up).
    """
    gpus = GPU_SIZES_GB if gpus is None else gpus
    dtypes = [r["dtype"] for r in cfg.memory_table()]
    parts = {d: (cfg.memory_bytes(d) / 1e9, cfg.kv_cache_bytes(kv_tokens, d) / 1e9, headroom_gb) for d in dtypes}
    rows = [{"GPU": "needs: weights + KV cache + headroom", **{d: _sum_text(p) for d, p in parts.items()}}]
    for gpu, size in gpus.items():
        row = {"GPU": gpu}
        for d, p in parts.items():
            fits = sum(p) <= size
            spare = abs(size - sum(_shown_gb(v) for v in p))
            row[d] = f"yes, {spare:.2f} GB spare" if fits else f"no, {spare:.2f} GB short"
        rows.append(row)
    return rows


def params_table(cfg: LlamaConfig) -> list[dict]:
    """Where the parameters are: embedding, per-layer attention and MLP, norms, lm_head."""
    c = cfg.param_counts()
    L = cfg.num_hidden_layers
    norms = c["layers"] - L * (c["attention_per_layer"] + c["mlp_per_layer"])
    rows = [
        {"part": "embed_tokens (V x D)", "parameters": c["embed_tokens"]},
        {"part": f"attention ({L} layers x {c['attention_per_layer']:,})", "parameters": L * c["attention_per_layer"]},
        {"part": f"MLP ({L} layers x {c['mlp_per_layer']:,})", "parameters": L * c["mlp_per_layer"]},
        {"part": "RMSNorm weights (2 per layer + final)", "parameters": norms + c["norm"]},
        {"part": "lm_head (V x D)" + (" - tied to embed_tokens" if cfg.tie_word_embeddings else ""),
         "parameters": c["lm_head"]},
    ]
    total = sum(r["parameters"] for r in rows)
    assert total == cfg.num_parameters
    for r in rows:
        r["share"] = f"{r['parameters'] / total:.1%}"
        r["parameters"] = f"{r['parameters']:,}"
    rows.append({"part": "total", "parameters": f"{total:,}", "share": "100%"})
    return rows


def shard_rows(events) -> list[dict]:
    """One row per ``load_shard`` event: the file, its size on disk and in memory, time, casts."""
    return [{"file": e.file, "tensors": e.num_tensors, "MB on disk": e.bytes_on_disk / 1e6,
             "MB in memory": e.bytes_in_memory / 1e6, "seconds": e.seconds, "runtime": f"{e.dtype} on {e.device}",
             "casts": casts_text(e.casts), "mapped, not copied": e.tensors_mapped}
            for e in events if isinstance(e, LoadShardEvent)]


def _block(stored: str) -> str:
    """A GGUF block format's layout, from the gguf library's table (``Q4_1``: 32 weights in 20 bytes)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    if stored not in GGMLQuantizationType.__members__:
        return "one value per weight"
    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[stored]]
    return f"{block} weights in {nbytes} bytes" if block > 1 else "one value per weight"


def by_type_rows(event: LoadShardEvent) -> list[dict]:
    """Per stored type of one weight file ("Q4_1", "float16"...): tensors, weights, bytes on disk
    and in memory (as the runtime dtype, or as the file's blocks where a quantized load kept them),
    bits per weight on disk, seconds. What a quantized format means in bytes."""
    per = dtype_bytes(event.dtype)
    rows = []
    for stored, r in event.by_type.items():
        weights = r.get("weights", r["bytes_in_memory"] // per)  # traces saved before "weights" was counted
        rows.append({"stored type": stored, "block": _block(stored), "tensors": r["tensors"],
                     "weights": f"{weights:,}", "MB on disk": r["bytes_on_disk"] / 1e6,
                     "bits per weight on disk": 8 * r["bytes_on_disk"] / max(weights, 1),
                     "in memory as": f"{stored} blocks" if r.get("kept_quantized") else event.dtype,
                     "MB in memory": r["bytes_in_memory"] / 1e6,
                     "memory / disk": f"{r['bytes_in_memory'] / max(r['bytes_on_disk'], 1):.2f}x",
                     "seconds": r["seconds"]})
    return rows


def tokens_table(tokenizer, ids) -> list[dict]:
    """One row per token: position, id, vocabulary piece, and what it decodes to on its own."""
    rows = []
    for pos, i in enumerate(ids):
        piece = tokenizer.id_to_piece(int(i))
        rows.append({"pos": pos, "id": int(i), "piece": piece,
                     "special": "yes" if int(i) in tokenizer.special_tokens.values() else "",
                     "byte": "yes" if piece.startswith("<0x") and piece.endswith(">") else ""})
    return rows


def kv_cache_rows(events) -> list[dict]:
    """The KV cache after each forward (prefill and decode steps)."""
    rows = []
    for e in events:
        if isinstance(e, ForwardEvent) and e.kv_cache:
            kv = e.kv_cache
            rows.append({"event": e.stage, "step": e.step, "new tokens": len(e.input_ids),
                         "positions": f"{e.positions[0]}..{e.positions[1]}",
                         "K (and V) per layer [B, Hkv, S, hd]": str(kv["shape_per_layer"]),
                         "bytes used": f"{kv['bytes_used']:,}", "allocated": f"{kv['bytes_allocated']:,}"})
    return rows


def logit_lens_rows(event: ForwardEvent, piece, top: int = 3, *, byte_level: bool = False) -> list[dict]:
    """The logit lens as rows: per layer, the top guesses for the next token, each piece shown by
    the one renderer (:func:`tracer.viz.tokens.quoted`; ``byte_level`` as ``Tokenizer.byte_level``)."""
    if not event.logit_lens:
        raise ValueError("this event has no logit_lens: generate with lens=True")
    rows = []
    for r, norm in zip(event.logit_lens, event.residual_norms or [None] * len(event.logit_lens), strict=True):
        row = {"layer": r["layer"], "||resid||": norm}
        for j in range(min(top, len(r["ids"]))):
            row[f"#{j + 1}"] = f"{quoted(piece(r['ids'][j]), byte_level=byte_level)} {r['probs'][j]:.3f}"
        rows.append(row)
    return rows


def head_rows(scores: dict, *, k: int = 3, group: int = 1, baselines: dict | None = None) -> list[dict]:
    """The ``k`` best heads of each [L, H] score grid (:mod:`tracer.viz.heads`), with the KV head
    they share (``group`` query heads per KV head) and the baselines: every head's mean and, from
    ``baselines``, a uniform head's score."""
    rows = []
    for kind, s in scores.items():
        for rank, h in enumerate(top_heads(s, k), 1):
            rows.append({"kind": kind, "rank": rank, "head (layer.head)": h.name, "KV head": h.head // group,
                         "score": h.score, "mean of all heads": float(s.mean()),
                         "uniform head": (baselines or {}).get(kind, "")})
    return rows
