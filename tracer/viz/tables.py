"""Small tables for the notebooks: rows as plain dicts (testable), shown with :func:`html_table`."""

from __future__ import annotations

import html

from IPython.display import HTML

from ..config import LlamaConfig
from ..trace import ForwardEvent
from .plots import GPU_SIZES_GB


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


def fits_table(cfg: LlamaConfig, *, gpus: dict[str, float] | None = None, kv_tokens: int = 4096) -> list[dict]:
    """For each GPU size: do the weights (+ a KV cache of ``kv_tokens`` tokens) fit, per dtype?

    Weights only; activations, the CUDA context and fragmentation need another ~1-2 GB in practice.
    """
    gpus = GPU_SIZES_GB if gpus is None else gpus
    rows = []
    for gpu, size in gpus.items():
        row = {"GPU": gpu}
        for d in ("float32", "float16", "bfloat16"):
            need = (cfg.memory_bytes(d) + cfg.kv_cache_bytes(kv_tokens, d)) / 1e9
            row[d] = f"{'yes' if need <= size else 'no'} ({need:.1f} of {size} GB)"
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


def logit_lens_rows(event: ForwardEvent, piece, top: int = 3) -> list[dict]:
    """The logit lens as rows: per layer, the top guesses for the next token."""
    if not event.logit_lens:
        raise ValueError("this event has no logit_lens: generate with lens=True")
    rows = []
    for r, norm in zip(event.logit_lens, event.residual_norms or [None] * len(event.logit_lens), strict=True):
        row = {"layer": r["layer"], "||resid||": norm}
        for j in range(min(top, len(r["ids"]))):
            row[f"#{j + 1}"] = f"{piece(r['ids'][j])!r} {r['probs'][j]:.3f}"
        rows.append(row)
    return rows
