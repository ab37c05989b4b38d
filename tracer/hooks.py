"""Named hook points: the places in the forward pass where a tensor can be read or replaced.

Every name is built here, once (``point_names``), and the model, the trace, the notebooks and the
tests all use these names. A hook point is a plain callable object (not an ``nn.Module``) so that an
idle point costs one attribute check in the hot loop. Functions attach only inside context managers
that always detach them (TransformerLens' ``hooks()`` idea), so no state leaks between runs.

Names, with shapes (B batch, T new tokens, S keys so far, D hidden, H heads, Hkv KV heads, hd head
dim, F intermediate, V vocab):

=========================  ======================  =============================================
name                       shape                   what
=========================  ======================  =============================================
embed                      [B, T, D]               token embeddings (the residual stream starts)
blocks.{i}.ln1             [B, T, D]               RMSNorm before attention
blocks.{i}.attn.q          [B, T, H, hd]           queries after RoPE
blocks.{i}.attn.k          [B, T, Hkv, hd]         keys of the new tokens after RoPE
blocks.{i}.attn.v          [B, T, Hkv, hd]         values of the new tokens
blocks.{i}.attn.pattern    [B, H, T, S]            softmax attention weights (explicit path)
blocks.{i}.attn.z          [B, T, H, hd]           per-head attention output, before o_proj
blocks.{i}.attn.out        [B, T, D]               attention output after o_proj
blocks.{i}.resid_mid       [B, T, D]               residual after the attention add
blocks.{i}.ln2             [B, T, D]               RMSNorm before the MLP
blocks.{i}.mlp.act         [B, T, F]               silu(gate) * up
blocks.{i}.mlp.out         [B, T, D]               MLP output after down_proj
blocks.{i}.resid_post      [B, T, D]               residual after the MLP add (block output)
final_norm                 [B, T, D]               final RMSNorm
logits                     [B, T, V]               lm_head output
=========================  ======================  =============================================
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .errors import TraceError

BLOCK_POINTS = (
    "ln1",
    "attn.q",
    "attn.k",
    "attn.v",
    "attn.pattern",
    "attn.z",
    "attn.out",
    "resid_mid",
    "ln2",
    "mlp.act",
    "mlp.out",
    "resid_post",
)
TOP_POINTS_BEFORE = ("embed",)
TOP_POINTS_AFTER = ("final_norm", "logits")

# TransformerLens names for the same places, for people porting their habits.
TRANSFORMERLENS_NAMES = {
    "embed": "hook_embed",
    "blocks.{i}.ln1": "blocks.{i}.ln1.hook_normalized",
    "blocks.{i}.attn.q": "blocks.{i}.attn.hook_rot_q",
    "blocks.{i}.attn.k": "blocks.{i}.attn.hook_rot_k",
    "blocks.{i}.attn.v": "blocks.{i}.attn.hook_v",
    "blocks.{i}.attn.pattern": "blocks.{i}.attn.hook_pattern",
    "blocks.{i}.attn.z": "blocks.{i}.attn.hook_z",
    "blocks.{i}.attn.out": "blocks.{i}.hook_attn_out",
    "blocks.{i}.resid_mid": "blocks.{i}.hook_resid_mid",
    "blocks.{i}.ln2": "blocks.{i}.ln2.hook_normalized",
    "blocks.{i}.mlp.act": "blocks.{i}.mlp.hook_post",
    "blocks.{i}.mlp.out": "blocks.{i}.hook_mlp_out",
    "blocks.{i}.resid_post": "blocks.{i}.hook_resid_post",
    "final_norm": "ln_final.hook_normalized",
    "logits": "(model output)",
}


def block_point(layer: int, point: str) -> str:
    """The full name of a per-block point, e.g. ``block_point(3, "attn.pattern")``."""
    return f"blocks.{layer}.{point}"


def point_names(num_layers: int) -> list[str]:
    """Every hook point name in forward order."""
    names = list(TOP_POINTS_BEFORE)
    for i in range(num_layers):
        names += [block_point(i, p) for p in BLOCK_POINTS]
    return names + list(TOP_POINTS_AFTER)


class UnknownHookPoint(TraceError, KeyError):
    """A hook point name or glob that matches no point. A :class:`TraceError` (one line, with the
    close names), and a ``KeyError`` too: it is a failed lookup by name."""

    __str__ = TraceError.__str__  # KeyError's own would print the message in quotes


# A layer index inside a name ("blocks.12.ln1"): names differ by it only, so close matches are
# looked for among the names with it replaced by "*", then it is put back.
_LAYER = re.compile(r"(?<=\.)\d+(?=\.)")


def unknown_point(pattern: str, names: Iterable[str]) -> UnknownHookPoint:
    """The error for a ``pattern`` matching none of ``names``, naming the closest ones."""
    names = list(names)
    layers = sorted({int(m.group()) for n in names if (m := _LAYER.search(n))})
    typed = _LAYER.search(pattern)
    generic = _LAYER.sub("*", pattern)
    shapes = list(dict.fromkeys(_LAYER.sub("*", n) for n in names))
    if typed and generic in shapes:  # the right point, a layer the model lacks
        hint = (f"this model's layers are {layers[0]} to {layers[-1]}." if layers else "this model has no blocks.")
    else:
        close = _closest(generic, shapes)
        if typed:
            close = [c.replace("*", typed.group(), 1) for c in close]
        hint = f"did you mean {' or '.join(map(repr, close))}?" if close else "no name is close to it."
    return UnknownHookPoint(f"no hook point matches {pattern!r}; {hint} Names look like 'embed', "
                            "'blocks.0.attn.pattern', 'blocks.*.resid_post', 'logits' (see tracer.hooks)")


def _closest(word: str, candidates: list[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates close to ``word``: the best, and those nearly as close (difflib)."""
    scored = sorted(((difflib.SequenceMatcher(None, word, c).ratio(), c) for c in candidates), reverse=True)
    best = scored[0][0] if scored else 0.0
    return [c for r, c in scored[:n] if r >= 0.6 and r >= best - 0.05]


# A hook function sees the tensor and the point's name; it returns None (read only) or a
# replacement tensor of the same shape (to ablate a head, patch a residual...).
HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]


class HookPoint:
    """One named place in the forward pass. Calling it passes the tensor through its functions."""

    __slots__ = ("name", "fns")

    def __init__(self, name: str) -> None:
        self.name = name
        self.fns: list[HookFn] = []

    @property
    def active(self) -> bool:
        """True when some function is attached (the model then takes explicit paths if needed)."""
        return bool(self.fns)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fns:
            return x
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                if out.shape != x.shape:
                    raise ValueError(
                        f"hook on {self.name!r} returned shape {tuple(out.shape)}, "
                        f"expected {tuple(x.shape)}"
                    )
                x = out
        return x

    def __repr__(self) -> str:
        return f"HookPoint({self.name!r}, {len(self.fns)} fn)"


@dataclass
class Recording:
    """Tensors recorded by :meth:`HookRegistry.record`: one list per point, one entry per forward."""

    tensors: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        """The last recorded tensor at ``name``."""
        return self.tensors[name][-1]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def names(self) -> list[str]:
        return list(self.tensors)


class HookRegistry:
    """The table of a model's hook points, with glob selection and scoped attachment."""

    def __init__(self, points: Iterable[HookPoint]) -> None:
        self.points: dict[str, HookPoint] = {p.name: p for p in points}

    def __iter__(self) -> Iterator[str]:
        return iter(self.points)

    def __getitem__(self, name: str) -> HookPoint:
        if name not in self.points:
            raise unknown_point(name, self.points)
        return self.points[name]

    def select(self, patterns: str | Iterable[str]) -> list[str]:
        """Names matching any glob pattern (``"blocks.*.attn.pattern"``); unknown patterns fail."""
        if isinstance(patterns, str):
            patterns = [patterns]
        chosen: list[str] = []
        for pat in patterns:
            hits = [n for n in self.points if fnmatch.fnmatchcase(n, pat)]
            if not hits:
                raise unknown_point(pat, self.points)
            chosen += [h for h in hits if h not in chosen]
        return [n for n in self.points if n in chosen]  # forward order

    @property
    def any_active(self) -> bool:
        return any(p.fns for p in self.points.values())

    @contextmanager
    def attach(self, patterns: str | Iterable[str], fn: HookFn) -> Iterator[list[str]]:
        """Attach ``fn`` to every matching point for the duration of the ``with`` block."""
        names = self.select(patterns)
        for n in names:
            self.points[n].fns.append(fn)
        try:
            yield names
        finally:
            for n in names:
                fns = self.points[n].fns
                if fn in fns:
                    fns.remove(fn)

    @contextmanager
    def record(
        self, patterns: str | Iterable[str], *, to_cpu: bool = True, dtype: torch.dtype | None = None
    ) -> Iterator[Recording]:
        """Record (detached copies of) the tensors at matching points during the ``with`` block."""
        rec = Recording()

        def keep(x: torch.Tensor, point: HookPoint) -> None:
            t = x.detach()
            if dtype is not None:
                t = t.to(dtype)
            t = t.to("cpu", copy=True) if to_cpu else t.clone()
            rec.tensors.setdefault(point.name, []).append(t)

        with self.attach(patterns, keep):
            yield rec


def point_shapes(cfg, T: int, S: int, B: int = 1) -> dict[str, tuple[int, ...]]:
    """The shape of every point for a forward of T new tokens with S keys in total (S = cached + T)."""
    D, H, Hkv, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    per_block = {
        "ln1": (B, T, D),
        "attn.q": (B, T, H, hd),
        "attn.k": (B, T, Hkv, hd),
        "attn.v": (B, T, Hkv, hd),
        "attn.pattern": (B, H, T, S),
        "attn.z": (B, T, H, hd),
        "attn.out": (B, T, D),
        "resid_mid": (B, T, D),
        "ln2": (B, T, D),
        "mlp.act": (B, T, cfg.intermediate_size),
        "mlp.out": (B, T, D),
        "resid_post": (B, T, D),
    }
    shapes = {"embed": (B, T, D)}
    for i in range(cfg.num_hidden_layers):
        shapes.update({block_point(i, p): s for p, s in per_block.items()})
    shapes["final_norm"] = (B, T, D)
    shapes["logits"] = (B, T, cfg.vocab_size)
    return shapes
