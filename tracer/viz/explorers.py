"""Browsing any saved trace (notebook 06): its events, their fields, and the tensors they kept."""

from __future__ import annotations

import json

import ipywidgets as W
import torch

from ..trace import ForwardEvent, SampleEvent, TokenizeEvent, Trace
from .plots import tensor_heatmap, tensor_histogram, tensor_stats
from .tables import html_table
from .widgets import show_png


def _short(v, n: int = 8):
    """Long lists and dicts cut for display."""
    if isinstance(v, list) and len(v) > n:
        return [_short(x, n) for x in v[:n]] + [f"... ({len(v)} items)"]
    if isinstance(v, dict):
        return {k: _short(x, n) for k, x in v.items()}
    if isinstance(v, float):
        return float(f"{v:.5g}")
    return v


def position_pieces(trace: Trace) -> list[str]:
    """The piece at every position: the prompt's, then each chosen token's."""
    tok = next((e for e in trace.events if isinstance(e, TokenizeEvent)), None)
    pieces = list(tok.pieces) if tok else []
    return pieces + [e.chosen_piece for e in trace.events if isinstance(e, SampleEvent)]


class TraceExplorer:
    """Every event of a trace (Select), its fields, and any recorded tensor: stats, histogram, a
    2-D slice as a heatmap (sliders pick the leading indices)."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.pieces = position_pieces(trace)
        opts = [(f"{e.seq:3d}  {e.stage:<11}" + (f" step {e.step}" if hasattr(e, "step") else "")
                 + (f"  [{len(e.tensors)} tensors]" if e.tensors else ""), e.seq) for e in trace.events]
        self.events = W.Select(options=opts, rows=14, description="events",
                               layout=W.Layout(width="330px")).add_class("tracer-events")
        self.details = W.HTML(layout=W.Layout(width="640px", max_height="340px", overflow="auto"))
        self.tensor = W.Dropdown(description="tensor", layout=W.Layout(width="420px")).add_class("tracer-tensor")
        self.indices = W.HBox()
        self.stats = W.HTML()
        self.hist = W.Output().add_class("tracer-hist")
        self.heat = W.Output().add_class("tracer-heatmap")
        self.events.observe(lambda _: self.show_event(), names="value")
        self.tensor.observe(lambda _: self.show_tensor(), names="value")
        self.widget = W.VBox([W.HBox([self.events, self.details]), self.tensor, self.indices, self.stats,
                              W.HBox([self.hist, self.heat])])
        first = next((e.seq for e in trace.events if e.tensors), trace.events[0].seq if trace.events else None)
        self.events.value = first

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @property
    def event(self):
        return self.trace.events[self.events.value]

    def show_event(self) -> None:
        e = self.event
        fields = {k: v for k, v in e.to_json().items() if k not in ("stage", "seq")}
        rows = [{"field": k, "value": json.dumps(_short(v), ensure_ascii=False)} for k, v in fields.items()]
        self.details.value = str(html_table(rows, title=f"event {e.seq}: {e.stage}").data)
        names = sorted(e.tensors)
        self.tensor.options = names
        self.tensor.disabled = not names
        if self.tensor.value is None and names:
            self.tensor.value = names[0]  # -> show_tensor
        elif not names:
            self.show_tensor()

    def _slice_labels(self, name: str, t: torch.Tensor):
        e = self.event
        if not isinstance(e, ForwardEvent) or t.dim() < 2:
            return None, None
        p0, p1 = e.positions
        rows = self.pieces[p0:p1 + 1] if t.shape[-2] == p1 - p0 + 1 else None
        cols = self.pieces[: t.shape[-1]] if name.endswith("attn.pattern") else None
        return cols, rows

    def show_tensor(self) -> None:
        name = self.tensor.value
        if name is None:
            self.stats.value = "<i>no tensors in this event (record with capture='full' and points=...)</i>"
            self.indices.children = ()
            self.hist.outputs = self.heat.outputs = ()
            return
        t = self.event.tensors[name]
        s = tensor_stats(t)
        self.stats.value = str(html_table([s], title=name).data)
        sliders = [W.IntSlider(value=0, min=0, max=n - 1, description=f"dim {d}", continuous_update=False,
                               layout=W.Layout(width="260px"))
                   for d, n in enumerate(t.shape[:-2])]
        for sl in sliders:
            sl.observe(lambda _: self.show_slice(), names="value")
        self.indices.children = sliders
        show_png(self.hist, tensor_histogram(t, title=name))
        self.show_slice()

    def show_slice(self) -> None:
        name = self.tensor.value
        t = self.event.tensors[name]
        idx = tuple(sl.value for sl in self.indices.children)
        x = t[idx] if idx else t
        if x.dim() == 1:
            x = x[None]
        where = "".join(f"[{i}]" for i in idx)
        xl, yl = self._slice_labels(name, t)
        show_png(self.heat, tensor_heatmap(x, title=f"{name}{where}", xlabels=xl, ylabels=yl))


def summary_html(trace: Trace) -> str:
    """One line per stage: how many events, total seconds, kept tensor bytes."""
    rows = []
    for stage in dict.fromkeys(trace.stages):
        evs = trace.of(stage)
        rows.append({"stage": stage, "events": len(evs), "seconds": sum(e.seconds for e in evs),
                     "tensors": sum(len(e.tensors) for e in evs),
                     "tensor bytes": sum(t.numel() * t.element_size() for e in evs for t in e.tensors.values())})
    return str(html_table(rows, title=f"{len(trace)} events, meta {json.dumps(trace.meta)}").data)
