"""Browsing attention (notebook 04): recorded patterns by layer and head."""

from __future__ import annotations

import ipywidgets as W
import torch

from ..config import LlamaConfig
from ..hooks import ATTN_PATTERN, declared
from ..trace import ForwardEvent
from .plots import attention_heads, attention_heatmap
from .widgets import show_png


def patterns_of(event: ForwardEvent) -> dict[int, torch.Tensor]:
    """layer -> attention weights [H, T, S] from an event recorded with points 'blocks.*.attn.pattern'."""
    out = {}
    for name, t in event.tensors.items():
        if declared(name) is ATTN_PATTERN:  # blocks.{layer}.attn.pattern
            out[int(name.split(".")[1])] = t[0]
    if not out:
        raise ValueError("no attention patterns in this event: record with capture='full', "
                         f"points={ATTN_PATTERN.glob!r}")
    return dict(sorted(out.items()))


class AttentionExplorer:
    """Layer dropdown + head slider over recorded patterns; 'all heads' groups heads by KV head."""

    def __init__(self, patterns: dict[int, torch.Tensor], pieces: list[str], cfg: LlamaConfig, *,
                 byte_level: bool = False) -> None:
        """``byte_level``: the pieces are from a byte-level BPE vocabulary (``Tokenizer.byte_level``)."""
        self.patterns, self.pieces, self.cfg, self.byte_level = patterns, list(pieces), cfg, byte_level
        H = next(iter(patterns.values())).shape[0]
        self.layer = W.Dropdown(options=list(patterns), description="layer").add_class("tracer-layer")
        self.head = W.IntSlider(value=0, min=0, max=H - 1, description="query head",
                                continuous_update=False).add_class("tracer-head")
        self.view = W.ToggleButtons(options=["one head", "all heads"], description="show")
        self.info = W.HTML()
        self.plot = W.Output().add_class("tracer-attention-plot")
        for w in (self.layer, self.head, self.view):
            w.observe(lambda _: self.draw(), names="value")
        self.widget = W.VBox([W.HBox([self.layer, self.head, self.view]), self.info, self.plot])
        self.draw()

    @classmethod
    def from_event(cls, event: ForwardEvent, pieces, cfg: LlamaConfig, *,
                   byte_level: bool = False) -> AttentionExplorer:
        return cls(patterns_of(event), pieces, cfg, byte_level=byte_level)

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    def draw(self) -> None:
        layer, h, cfg = self.layer.value, self.head.value, self.cfg
        p = self.patterns[layer]  # [H, T, S]
        T, S = p.shape[1], p.shape[2]
        kv = h // cfg.n_rep
        mates = [q for q in range(cfg.num_attention_heads) if q // cfg.n_rep == kv]
        self.info.value = (f"Query head {h} uses key/value head {kv}, shared with query heads {mates} "
                           f"({cfg.attention_kind}: {cfg.num_attention_heads} query heads, "
                           f"{cfg.num_key_value_heads} KV heads). Each row sums to 1; the upper triangle "
                           "is 0 because a token cannot attend to later tokens (causal mask).")
        self.head.disabled = self.view.value == "all heads"
        if self.view.value == "all heads":
            fig = attention_heads(p, self.pieces[:S], cfg, layer=layer)
        else:
            fig = attention_heatmap(p[h], self.pieces[S - T:S], self.pieces[:S],
                                    title=f"layer {layer}, query head {h} (KV head {kv})",
                                    byte_level=self.byte_level)
        show_png(self.plot, fig)
