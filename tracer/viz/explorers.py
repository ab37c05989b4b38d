"""Browsing any saved trace (notebook 06): a readable header, its events (times relative to the
start, token pieces beside ids), each stage's counterpart in transformers, and the tensors the
events kept: stats, a histogram, a slice drawn as what it is (a vector as a line or bars, a matrix
as a heatmap) and, with treescope installed (the ``lab`` extra), every slice at once."""

from __future__ import annotations

import html

import ipywidgets as W
import torch

from ..trace import (
    ConfigEvent,
    DetokenizeEvent,
    ForwardEvent,
    LoadShardEvent,
    SampleEvent,
    TokenizeEvent,
    Trace,
)
from ..walkthrough import IN_TRANSFORMERS
from .plots import (
    casts_text,
    count_text,
    dim_names,
    size_text,
    tensor_histogram,
    tensor_slice,
    tensor_stats,
)
from .tables import by_type_rows, html_table
from .tokens import legend, quoted, shown
from .widgets import show_png

SHOW_ITEMS = 12  # a long list of ids or numbers shows this many, then how many there are in all
TOP_ROWS = 5  # candidates shown per sampling stage, and per layer of the logit lens
TREESCOPE_MAX_VALUES = 300_000  # treescope embeds every value in the page: bigger tensors get a note


class Pieces:
    """Token ids -> vocabulary pieces, shown with :mod:`tracer.viz.tokens`.

    With a tokenizer every id has its piece; a trace opened without one knows the pieces it
    recorded (prompt, chosen and detokenized tokens), and shows the other ids bare."""

    def __init__(self, trace: Trace, tokenizer=None) -> None:
        known: dict[int, str] = {}
        for e in trace.events:
            if isinstance(e, (TokenizeEvent, DetokenizeEvent)):
                known.update(zip(e.ids if isinstance(e, TokenizeEvent) else e.new_ids, e.pieces))
            elif isinstance(e, SampleEvent):
                known[e.chosen_id] = e.chosen_piece
        self.known = known
        self.tokenizer = tokenizer
        # Without the tokenizer, a byte-level vocabulary shows itself by its space mark Ġ.
        self.byte_level = (bool(tokenizer.byte_level) if tokenizer is not None
                           else any(p.startswith("Ġ") for p in known.values()))

    def __call__(self, i: int) -> str | None:
        """The piece of id ``i`` (None when unknown)."""
        if self.tokenizer is not None:
            return self.tokenizer.id_to_piece(int(i))
        return self.known.get(int(i))

    def shown(self, i: int) -> str:
        """The piece with visible signs for spaces and newlines ("" when unknown)."""
        p = self(i)
        return "" if p is None else shown(p, byte_level=self.byte_level)

    def quoted(self, i: int) -> str:
        p = self(i)
        return "" if p is None else quoted(p, byte_level=self.byte_level)

    def id_piece(self, i: int) -> str:
        """``653 ‹▁It›`` (the id alone when its piece is unknown)."""
        return f"{int(i)} {self.quoted(i)}".rstrip()


def relative_times(trace: Trace) -> list[float]:
    """Each event's start in seconds after the trace's earliest start (wall-clock times are
    absolute: 1.7e9 s since 1970, the same number to five digits for every event)."""
    t0 = min((e.time for e in trace.events), default=0.0)
    return [e.time - t0 for e in trace.events]


def _esc(v) -> str:
    return html.escape(str(v))


def _mini(rows: list[list[str]], head: list[str] | None = None) -> str:
    """A small nested HTML table (cells already escaped)."""
    top = "<tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table class='tracer-mini'>{top}{body}</table>"


def _num(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _listed(items: list[str]) -> str:
    more = f" … ({len(items)} in all)" if len(items) > SHOW_ITEMS else ""
    return " · ".join(items[:SHOW_ITEMS]) + more


def _ranked(ids, values, pieces: Pieces, what: str) -> str:
    rows = [[str(r + 1), _esc(pieces.id_piece(i)), _num(v)] for r, (i, v) in enumerate(zip(ids, values))]
    return _mini(rows[:TOP_ROWS], ["#", "token", what]) + (f"<i>top {TOP_ROWS} of {len(rows)}</i>"
                                                            if len(rows) > TOP_ROWS else "")


def _stages(stages: dict, pieces: Pieces) -> str:
    rows = []
    for name, s in stages.items():
        top = [f"{_esc(pieces.id_piece(i))} <small>p={p:.3f}</small>"
               for i, p in zip(s.get("ids", []), s.get("probs", []))][:TOP_ROWS]
        rows.append([_esc(name), " · ".join(top)])
    return _mini(rows, ["stage", f"top {TOP_ROWS} after it (id, piece, probability)"])


def _at_candidates(event, pieces: Pieces) -> str:
    """The sampling stages side by side on one list of tokens: each stage's probability (0 where
    it cut the token), and the raw logit."""
    cols = event.at_candidates
    stages = list(cols)
    rows = []
    for r, i in enumerate(event.candidate_ids[:SHOW_ITEMS]):
        raw = cols[stages[0]]["scores"][r] if stages else float("nan")
        cells = [f"{cols[s]['probs'][r]:.3f}" if cols[s]["probs"][r] else "<i>cut</i>" for s in stages]
        mark = " <b>(chosen)</b>" if i == event.chosen_id else ""
        rows.append([_esc(pieces.id_piece(i)) + mark, f"{raw:.3f}", *cells])
    more = len(event.candidate_ids) - SHOW_ITEMS
    head = ["token", "raw logit", *(_esc(s).replace("_", "_<wbr>") for s in stages)]
    return ("<i>probability after each stage</i>" + _mini(rows, head)
            + (f"<i>{more} more</i>" if more > 0 else ""))


def _lens(layers: list[dict], pieces: Pieces) -> str:
    rows = [[str(r["layer"]), " · ".join(f"{_esc(pieces.id_piece(i))} <small>{p:.3f}</small>"
                                        for i, p in list(zip(r["ids"], r["probs"]))[:3])] for r in layers]
    return _mini(rows, ["layer", "top 3 guesses for the next token"])


def field_html(event, key: str, value, pieces: Pieces, t0: float) -> str:
    """One field of an event as readable HTML: relative time, sizes, pieces beside every id."""
    if key == "time":
        return f"+{value - t0:.4f} s after the trace's first event started"
    if key == "seconds":
        return f"{value * 1e3:.3f} ms" if value < 1 else f"{value:.3f} s"
    if key == "memory":
        return _esc(", ".join(f"{k.removesuffix('_bytes')} {size_text(v)}" for k, v in value.items()) or "not read")
    if key.endswith("ids") and isinstance(value, list):
        return _esc(_listed([pieces.id_piece(i) for i in value])) or "none"
    if key.endswith("_id") and isinstance(value, int):
        return _esc(pieces.id_piece(value))
    if key in ("pieces", "chosen_piece"):
        items = value if isinstance(value, list) else [value]
        return _esc(_listed([quoted(p, byte_level=pieces.byte_level) for p in items]))
    if key == "top_logits" and value:
        return _ranked(value["ids"], value["values"], pieces, "logit")
    if key == "stages" and value:
        return _stages(value, pieces)
    if key == "at_candidates" and value and getattr(event, "candidate_ids", None):
        return _at_candidates(event, pieces)
    if key == "logit_lens" and value:
        return _lens(value, pieces)
    if key == "casts":
        return _esc(casts_text(value))
    if key == "by_type" and value:
        rows = by_type_rows(event)
        return _mini([[_esc(_num(v)) for v in r.values()] for r in rows], [_esc(k) for k in rows[0]])
    if key == "kv_cache" and value:
        return _esc(f"{value['length']} of {value['max_len']} positions filled; K and V per layer "
                    f"{value['shape_per_layer']}; {value['bytes_used']:,} bytes used of {value['bytes_allocated']:,}")
    return _esc(_plain(value))


def _plain(value) -> str:
    """Anything else, short: dicts as ``key: value``, long lists cut, floats to 4 digits."""
    if isinstance(value, dict):
        return "; ".join(f"{k}: {_plain(v)}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return _listed([_plain(v) for v in value]) if value else "none"
    return _num(value)


def transformers_html(stage: str) -> str:
    """Where transformers does this stage's work (:data:`tracer.walkthrough.IN_TRANSFORMERS`)."""
    refs = IN_TRANSFORMERS.get(stage, ())
    items = "".join(f"<li><code>{_esc(r.name)}</code>: {_esc(r.note)}</li>" for r in refs)
    return f"<div class='tracer-in-transformers'><b>in transformers</b><ul style='margin:2px 0'>{items}</ul></div>"


def event_html(event, pieces: Pieces, t0: float) -> str:
    """An event's fields as a two-column table, then its stage's counterpart in transformers."""
    skip = ("stage", "seq", "tensor_names") + (("config",) if isinstance(event, ConfigEvent) else ())
    rows = [f"<tr><th>{_esc(k)}</th><td>{field_html(event, k, v, pieces, t0)}</td></tr>"
            for k, v in event.to_json().items() if k not in skip]
    if isinstance(event, ConfigEvent):  # the config itself: one compact line
        rows.append(f"<tr><th>config</th><td>{_esc(_plain({k: v for k, v in event.config.items() if k != 'rope'}))}</td></tr>")
    title = f"<b>event {event.seq}: {_esc(event.stage)}</b>"
    return f"{title}<table class='tracer-fields'>{''.join(rows)}</table>{transformers_html(event.stage)}"


def _option(e, rel: float, pieces: Pieces) -> str:
    """The event list's line: number, start time, stage, step, and the token involved."""
    what = {ForwardEvent: lambda: (f"{len(e.input_ids)} tokens" if len(e.input_ids) > 1
                                   else " ".join(pieces.quoted(i) or str(i) for i in e.input_ids)),
            SampleEvent: lambda: f"→ {pieces.quoted(e.chosen_id) or e.chosen_id}",
            TokenizeEvent: lambda: f"{len(e.ids)} tokens",
            LoadShardEvent: lambda: e.file}
    extra = next((f() for cls, f in what.items() if isinstance(e, cls)), "")
    step = f" {e.step}" if isinstance(e, (ForwardEvent, SampleEvent)) else ""
    kept = f"  [{len(e.tensors)} tensors]" if e.tensors else ""
    return f"{e.seq:3d} {f'+{rel:.3f} s':>10}  {e.stage}{step}  {extra}{kept}"


def header_rows(trace: Trace) -> list[dict]:
    """The trace at a glance: model, device, dtype, tokens, seconds."""
    meta, rows = trace.meta, []
    cfg = next((e for e in trace.events if isinstance(e, ConfigEvent)), None)
    about = (f" ({count_text(cfg.num_parameters)} parameters, {cfg.config.get('num_hidden_layers')} layers, "
             f"{cfg.config.get('attention_kind')})") if cfg else ""
    rows.append({"": "model", "value": f"{meta.get('source', '?')}{about}"})
    rows.append({"": "device, dtype", "value": f"{meta.get('device', '?')}, {meta.get('dtype', '?')}"
                 f" (weights from {meta.get('format', '?')}; decode path {meta.get('step', '?')})"})
    tok = next((e for e in trace.events if isinstance(e, TokenizeEvent)), None)
    new = len(trace.of("sample"))
    if tok:
        rows.append({"": "tokens", "value": f"{len(tok.ids)} in the prompt + {new} generated"})
        rows.append({"": "prompt", "value": tok.text})
    det = next((e for e in trace.events if isinstance(e, DetokenizeEvent)), None)
    if det:
        rows.append({"": "generated", "value": f"{det.text!r} (stopped: {det.finish_reason})"})
    times = relative_times(trace)
    wall = max((t + e.seconds for t, e in zip(times, trace.events)), default=0.0)
    load = sum(e.seconds for e in trace.events if e.stage in ("config", "resolve", "load_shard"))
    rows.append({"": "seconds", "value": f"{wall:.3f} from the first event's start to the last one's end "
                 f"(loading {load:.3f})"})
    return rows


def summary_html(trace: Trace) -> str:
    """A readable header (model, device, dtype, tokens, seconds), then one line per stage: events,
    when the first started, seconds, kept tensors."""
    times = relative_times(trace)
    rows = []
    for stage in dict.fromkeys(trace.stages):
        evs = [(t, e) for t, e in zip(times, trace.events) if e.stage == stage]
        rows.append({"stage": stage, "events": len(evs), "first at (s)": f"+{min(t for t, _ in evs):.3f}",
                     "seconds": sum(e.seconds for _, e in evs), "tensors": sum(len(e.tensors) for _, e in evs),
                     "tensor bytes": size_text(sum(t.numel() * t.element_size() for _, e in evs
                                                   for t in e.tensors.values()))})
    head = html_table(header_rows(trace), title=f"trace: {len(trace)} events").data
    left = "<style>.tracer-summary-head td { text-align: left; }</style>"  # words, not numbers
    return (f"<div class='tracer-summary'>{left}<div class='tracer-summary-head'>{head}</div>"
            f"{html_table(rows, title='stages').data}</div>")


def treescope_html(t: torch.Tensor, names=None, item_labels=None) -> str:
    """Every slice of ``t`` at once, with its values on hover: treescope's faceted array view
    (imported here only: the runtime never needs it). Its torch adapter reads ``Tensor.names``,
    which torch 2.13 no longer has, so the tensor goes in as a NumPy array."""
    try:
        import treescope
    except ImportError:
        return "<i>treescope is not installed: pip install treescope (the lab extra) for this view</i>"
    if t.numel() > TREESCOPE_MAX_VALUES:
        return f"<i>{t.numel():,} values: too many to embed in the page; use the sliders and plots</i>"
    labels = {i: f"{n} ({s})" for i, (n, s) in enumerate(zip(names, t.shape))} if names else None
    # As the slice plots draw it: the last dimension across, the one before it down; the leading
    # ones (head, batch) facet the picture, alternately across and down.
    d = t.dim()
    columns, rows = [d - 1], [d - 2] if d > 1 else []
    for k, axis in enumerate(range(d - 3, -1, -1)):
        (columns if k % 2 == 0 else rows).append(axis)
    fig = treescope.render_array(t.detach().float().cpu().numpy(), columns=columns, rows=rows,
                                 axis_labels=labels, trim_outliers=False, axis_item_labels=item_labels or None)
    return fig._repr_html_()  # the figure itself (render_to_html would draw the figure object's tree)


def position_pieces(trace: Trace) -> list[str]:
    """The piece at every position: the prompt's, then each chosen token's."""
    tok = next((e for e in trace.events if isinstance(e, TokenizeEvent)), None)
    pieces = list(tok.pieces) if tok else []
    return pieces + [e.chosen_piece for e in trace.events if isinstance(e, SampleEvent)]


# Monospace for the event list, so its columns (number, time, stage) line up; the field tables
# wrap long values instead of running out of their box.
_STYLE = """<style>
.tracer-events select { font-family: monospace; font-size: 12px; }
.tracer-fields, .tracer-mini { border-collapse: collapse; table-layout: auto; line-height: 1.35; }
.tracer-fields { font-size: 13px; }
.tracer-mini { font-size: 12px; }
.tracer-fields th, .tracer-fields td, .tracer-mini th, .tracer-mini td {
  padding: 1px 6px; text-align: left; vertical-align: top; }
.tracer-fields th, .tracer-mini td:first-child { white-space: nowrap; }
.tracer-fields td, .tracer-mini td { overflow-wrap: anywhere; }
.tracer-in-transformers li, .tracer-in-transformers code { overflow-wrap: anywhere; white-space: normal; }
</style>"""


class TraceExplorer:
    """Every event of a trace (start time, stage, the token involved), its fields (pieces beside
    ids, and where transformers does the same work), and any recorded tensor: stats, a histogram,
    a slice drawn as a line/bar plot or a heatmap (sliders, named by dimension, pick the leading
    indices) and treescope's view of every slice. ``tokenizer``: the model's, to show the piece of
    every id (without it, the pieces the trace recorded)."""

    def __init__(self, trace: Trace, tokenizer=None) -> None:
        self.trace = trace
        self.pieces = Pieces(trace, tokenizer)
        self.positions = position_pieces(trace)
        self.times = relative_times(trace)
        self.t0 = min((e.time for e in trace.events), default=0.0)
        opts = [(_option(e, t, self.pieces), e.seq) for t, e in zip(self.times, trace.events)]
        self.events = W.Select(options=opts, rows=16, layout=W.Layout(width="460px")).add_class("tracer-events")
        # Full width, below the list: wide tables (the sampling stages side by side) fit unclipped,
        # and anything wider still scrolls instead of being cut.
        self.details = W.HTML(layout=W.Layout(width="100%", overflow="auto")).add_class("tracer-details")
        self.tensor = W.Dropdown(description="tensor", layout=W.Layout(width="440px")).add_class("tracer-tensor")
        self.indices = W.VBox()
        self.stats = W.HTML()
        self.hist = W.Output().add_class("tracer-hist")
        self.heat = W.Output().add_class("tracer-heatmap")
        # An Output, not an HTML widget: treescope's page runs scripts, which only outputs execute.
        self.facets = W.Output().add_class("tracer-treescope")
        self._facets_for = None  # (event, tensor) the treescope view shows
        self.views = W.Tab(children=[W.HBox([self.hist, self.heat]), self.facets]).add_class("tracer-views")
        self.views.titles = ("plots", "all slices")
        self.events.observe(lambda _: self.show_event(), names="value")
        self._quiet = False
        self.tensor.observe(lambda _: self._quiet or self.show_tensor(), names="value")
        self.views.observe(lambda _: self.show_facets(), names="selected_index")
        signs = legend(self.pieces.known.values(), byte_level=self.pieces.byte_level)
        head = W.HTML(_STYLE + (f"<small>tokens: {_esc(signs)}</small>" if signs else ""))
        controls = W.VBox([self.tensor, self.indices, self.stats], layout=W.Layout(margin="0 0 0 12px"))
        self.widget = W.VBox([head, W.HBox([self.events, controls]), self.details, self.views]
                             ).add_class("tracer-trace-explorer")
        first = next((e.seq for e in trace.events if e.tensors), trace.events[0].seq if trace.events else None)
        self.events.value = first

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def event(self):
        return self.trace.events[self.events.value]

    def show_event(self) -> None:
        e = self.event
        self.details.value = event_html(e, self.pieces, self.t0)
        names = sorted(e.tensors)
        keep = self.tensor.value if self.tensor.value in names else (names[0] if names else None)
        self._quiet = True  # the tensor list changes under the dropdown: draw once, below
        try:
            self.tensor.options = names
            self.tensor.value = keep
        finally:
            self._quiet = False
        self.tensor.disabled = not names
        self.show_tensor()

    def _names(self, name: str, t: torch.Tensor) -> tuple[str, ...] | None:
        names = dim_names(name)
        return names if names is not None and len(names) == t.dim() else None

    def _ticks(self, dim: str | None, n: int):
        """Tick labels along one dimension: pieces for positions, ``id -> piece`` for the vocab."""
        e = self.event
        at = [shown(p, byte_level=self.pieces.byte_level) for p in self.positions]
        if dim == "position" and isinstance(e, ForwardEvent) and e.positions[1] - e.positions[0] + 1 == n:
            return at[e.positions[0]:e.positions[1] + 1]
        if dim == "key position" and len(at) >= n:
            return at[:n]
        if dim == "vocab":
            return self.pieces.shown
        return None

    def show_tensor(self) -> None:
        name = self.tensor.value
        if name is None:
            self.stats.value = "<i>no tensors in this event (record with capture='full' and points=...)</i>"
            self.indices.children = ()
            self.hist.outputs = self.heat.outputs = self.facets.outputs = ()
            self._facets_for = None
            self.views.layout.display = "none"
            return
        self.views.layout.display = None
        t = self.event.tensors[name]
        self.stats.value = str(html_table([tensor_stats(t)], title=name).data)
        names = self._names(name, t)
        sliders = [W.IntSlider(value=0, min=0, max=n - 1, description=names[d] if names else f"dim {d}",
                               continuous_update=False, style={"description_width": "initial"},
                               layout=W.Layout(width="300px"))
                   for d, n in enumerate(t.shape[:-2])]
        for sl in sliders:
            sl.observe(lambda _: self.show_slice(), names="value")
        self.indices.children = sliders
        show_png(self.hist, tensor_histogram(t, title=name))
        self.show_slice()
        self.show_facets()

    def show_slice(self) -> None:
        name = self.tensor.value
        t = self.event.tensors[name]
        idx = tuple(sl.value for sl in self.indices.children)
        x = t[idx] if idx else t
        names = self._names(name, t)
        last = names[-x.dim():] if names else None
        ticks = [self._ticks(d, n) for d, n in zip(last, x.shape)] if last else [None] * x.dim()
        rows, cols = (ticks if x.dim() == 2 else [None, ticks[0]])
        where = "".join(f"[{i}]" for i in idx)
        heat_rows = rows if not callable(rows) else None
        heat_cols = cols if not callable(cols) or x.dim() == 1 or x.shape[0] == 1 else None
        show_png(self.heat, tensor_slice(x, title=f"{name}{where}", names=last, xlabels=heat_cols,
                                         ylabels=heat_rows))

    def show_facets(self) -> None:
        """treescope's view of the current tensor, built when its tab is open (it is heavy)."""
        name = self.tensor.value
        key = (self.events.value, name)
        if self.views.selected_index != 1 or name is None or self._facets_for == key:
            return
        t = self.event.tensors[name]
        names = self._names(name, t)
        items = {i: [str(p) for p in ticks] for i, (d, n) in enumerate(zip(names or (), t.shape))
                 if isinstance(ticks := self._ticks(d, n), list)}
        self.facets.outputs = ({"output_type": "display_data", "metadata": {},
                                "data": {"text/html": treescope_html(t, names, items), "text/plain": name}},)
        self._facets_for = key
