"""Named hook points: the places in the forward pass where a tensor can be read or replaced.

:data:`POINTS` below is the one declaration of them: each point's name, its shape (in the shape
alphabet :data:`DIMS`), the class of ``tracer/model.py`` whose forward fires it, what it is, and
TransformerLens' name for the same place. Everything else is derived from it: the names
(:func:`point_names`), the shapes (:func:`point_shapes`), the TransformerLens table, the README's
table (:func:`markdown_table`, checked by tests/test_hooks.py), and the model's own points (it
builds each from its declared :class:`Point`, e.g. ``ATTN_PATTERN.at(layer)``).

A hook point is a plain callable object (not an ``nn.Module``) so that an idle point costs one
attribute check in the hot loop. Functions attach only inside context managers that always detach
them (TransformerLens' ``hooks()`` idea), so no state leaks between runs.
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

# The shape alphabet: each letter a point's shape is written in, and what that dimension is.
DIMS = {"B": "batch", "T": "position", "S": "key position", "D": "hidden", "H": "head",
        "Hkv": "KV head", "hd": "head dim", "F": "MLP hidden", "V": "vocab"}
BLOCK_PREFIX = "blocks"  # a per-block point's full name: blocks.{layer}.{name}


@dataclass(frozen=True)
class Point:
    """One declared hook point.

    ``name`` is the full name of a top-level point ("embed") or, for a point in every block
    (``per_block``), its name inside the block ("attn.q"). ``shape`` is written in :data:`DIMS`'
    letters; ``fires_in`` is the ``tracer.model`` class whose forward passes the tensor through it.
    """

    name: str
    per_block: bool
    shape: tuple[str, ...]
    fires_in: str
    what: str
    transformerlens: str

    def at(self, layer: int | None = None) -> str:
        """The full name: ``ATTN_Q.at(3)`` -> "blocks.3.attn.q"; a top-level point takes no layer."""
        if self.per_block != (layer is not None):
            raise ValueError(f"{self.name!r}: a layer is needed exactly for a per-block point")
        return block_point(layer, self.name) if self.per_block else self.name

    @property
    def template(self) -> str:
        """The name with the layer as ``{i}`` ("blocks.{i}.attn.q"), as the docs write it."""
        return block_point("{i}", self.name) if self.per_block else self.name

    @property
    def glob(self) -> str:
        """The pattern matching this point in every layer ("blocks.*.attn.q")."""
        return block_point("*", self.name) if self.per_block else self.name


def _top(name: str, shape: str, fires_in: str, transformerlens: str, what: str) -> Point:
    return Point(name, False, tuple(shape.split()), fires_in, what, transformerlens)


def _block(name: str, shape: str, fires_in: str, transformerlens: str, what: str) -> Point:
    return Point(name, True, tuple(shape.split()), fires_in, what, block_point("{i}", transformerlens))


def block_point(layer: int | str, point: str) -> str:
    """The full name of a per-block point, e.g. ``block_point(3, "attn.pattern")``."""
    return f"{BLOCK_PREFIX}.{layer}.{point}"


# The declaration, in forward order (the per-block points run once per layer, in place of
# this group). Shapes in the alphabet of DIMS; S = cached + new keys.
#                   name            shape          fires in      TransformerLens            what
EMBED = _top(       "embed",        "B T D",       "LlamaModel", "hook_embed",              "token embeddings (the residual stream starts)")
LN1 = _block(       "ln1",          "B T D",       "Block",      "ln1.hook_normalized",     "RMSNorm before attention")
ATTN_Q = _block(    "attn.q",       "B T H hd",    "Attention",  "attn.hook_rot_q",         "queries after RoPE")
ATTN_K = _block(    "attn.k",       "B T Hkv hd",  "Attention",  "attn.hook_rot_k",         "keys of the new tokens after RoPE")
ATTN_V = _block(    "attn.v",       "B T Hkv hd",  "Attention",  "attn.hook_v",             "values of the new tokens")
ATTN_PATTERN = _block("attn.pattern", "B H T S",   "Attention",  "attn.hook_pattern",       "softmax attention weights (hooked: that layer computes them explicitly)")
ATTN_Z = _block(    "attn.z",       "B T H hd",    "Attention",  "attn.hook_z",             "per-head attention output, before o_proj")
ATTN_OUT = _block(  "attn.out",     "B T D",       "Attention",  "hook_attn_out",           "attention output after o_proj")
RESID_MID = _block( "resid_mid",    "B T D",       "Block",      "hook_resid_mid",          "residual after the attention add")
LN2 = _block(       "ln2",          "B T D",       "Block",      "ln2.hook_normalized",     "RMSNorm before the MLP")
MLP_ACT = _block(   "mlp.act",      "B T F",       "MLP",        "mlp.hook_post",           "silu(gate) * up")
MLP_OUT = _block(   "mlp.out",      "B T D",       "MLP",        "hook_mlp_out",            "MLP output after down_proj")
RESID_POST = _block("resid_post",   "B T D",       "Block",      "hook_resid_post",         "residual after the MLP add (block output)")
FINAL_NORM = _top(  "final_norm",   "B T D",       "LlamaModel", "ln_final.hook_normalized", "final RMSNorm")
LOGITS = _top(      "logits",       "B T V",       "LlamaModel", "(the model's output)",    "lm_head output")

POINTS = (EMBED, LN1, ATTN_Q, ATTN_K, ATTN_V, ATTN_PATTERN, ATTN_Z, ATTN_OUT, RESID_MID, LN2, MLP_ACT,
          MLP_OUT, RESID_POST, FINAL_NORM, LOGITS)

# Derived views of the declaration.
BLOCK_POINTS = tuple(p.name for p in POINTS if p.per_block)  # names inside a block, forward order
TRANSFORMERLENS_NAMES = {p.template: p.transformerlens for p in POINTS}  # for people porting habits
_BY_TEMPLATE = {p.template: p for p in POINTS}
_LAYER_IN_NAME = re.compile(rf"(?<=^{BLOCK_PREFIX})\.\d+\.")


def expand(num_layers: int) -> Iterator[tuple[str, Point]]:
    """(full name, declared point) for every hook point of a model of ``num_layers`` blocks, in
    forward order: the per-block points run once per layer where the first of them is declared."""
    block = [p for p in POINTS if p.per_block]
    for p in POINTS:
        if not p.per_block:
            yield p.at(), p
        elif p is block[0]:
            for i in range(num_layers):
                yield from ((q.at(i), q) for q in block)


def point_names(num_layers: int) -> list[str]:
    """Every hook point name in forward order."""
    return [name for name, _ in expand(num_layers)]


def declared(name: str) -> Point | None:
    """The declared :class:`Point` a full name is an instance of ("blocks.3.attn.q" -> ATTN_Q)."""
    return _BY_TEMPLATE.get(_LAYER_IN_NAME.sub(".{i}.", name, count=1))


def markdown_table() -> str:
    """The declaration as the README's table (tests/test_hooks.py checks that they are equal)."""
    def code(text: str) -> str:
        return text if " " in text else f"`{text}`"  # "(the model's output)" is no name

    rows = ["| name | shape | fires in | what | TransformerLens |", "|---|---|---|---|---|"]
    rows += [f"| `{p.template}` | [{', '.join(p.shape)}] | `{p.fires_in}` | {p.what} | {code(p.transformerlens)} |"
             for p in POINTS]
    legend = ", ".join(f"{letter} {word}" for letter, word in DIMS.items())
    return "\n".join(rows) + f"\n\nShapes: {legend} (S counts the cached keys and the new ones)."


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


def gather(owners: Iterable[object], num_layers: int) -> HookRegistry:
    """The registry of the :class:`HookPoint` attributes of ``owners`` (a model's modules), in
    declared order. Every declared point must be there once, and nothing else."""
    found: dict[str, HookPoint] = {}
    for owner in owners:
        for point in vars(owner).values():
            if isinstance(point, HookPoint):
                if point.name in found:
                    raise ValueError(f"hook point {point.name!r} is made twice")
                found[point.name] = point
    names = point_names(num_layers)
    if set(found) != set(names):
        raise ValueError(f"hook points not declared in tracer.hooks: {sorted(set(found) - set(names))}; "
                         f"declared but not made: {sorted(set(names) - set(found))}")
    return HookRegistry(found[n] for n in names)


def point_shapes(cfg, T: int, S: int, B: int = 1) -> dict[str, tuple[int, ...]]:
    """The shape of every point for a forward of T new tokens with S keys in total (S = cached + T)."""
    size = {"B": B, "T": T, "S": S, "D": cfg.hidden_size, "H": cfg.num_attention_heads,
            "Hkv": cfg.num_key_value_heads, "hd": cfg.head_dim, "F": cfg.intermediate_size,
            "V": cfg.vocab_size}
    shape = {p: tuple(size[d] for d in p.shape) for p in POINTS}
    return {name: shape[p] for name, p in expand(cfg.num_hidden_layers)}
