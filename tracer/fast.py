"""The fast path, beside the model: CPU kernels swapped in, and a compiled static-shape decode step.

``tracer/model.py`` is the network, one eager path. Two things make untraced decoding faster
without changing it, both decided here:

- **The kernels** (:func:`use_kernels`, ``tracer.load(matvec=...)``): on the CPU, the model's
  ``nn.Linear`` layers become :class:`~tracer.matvec.KernelLinear` and its
  :class:`~tracer.model.Stacked` products (q/k/v, gate/up) :class:`~tracer.matvec.KernelStacked`,
  over the same weight Parameters (a mapped checkpoint stays mapped). Trace meta ``"matvec"``
  says which products run (:func:`products`).
- **The static step** (:class:`StaticStep`, and :class:`CompiledStep`, ``tracer.load(compile=True)``):
  one token at a tensor position, its keys and values written into the preallocated cache in
  place, attention over every slot with the unwritten ones masked (``tracer.attend.masked``, or
  the attention kernel, ``tracer.attend.OnKernel``, when the kernels are in). Every step has the
  same shapes, so one compiled graph serves them all. It is made of the model's own layers and
  their pieces (:meth:`~tracer.model.Attention.project`, :meth:`~tracer.model.Attention.output`,
  the MLP) but attends its own way, without a pattern: the Decoder takes the eager model whenever
  a hook is attached. Trace meta ``"step"`` says which ran (``"compiled-block"`` or ``"eager"``).

The compiled step compiles only the repeated part: a run of consecutive blocks,
:func:`decode_blocks`. This is torch's "regional compilation". Dynamo inlines ``nn.Module`` calls
and makes their parameters graph inputs, so runs of blocks that execute the same code on
same-shaped weights pass the same guards and share one compiled graph: the graph is compiled once,
whatever the number of layers. For that, nothing layer-specific may reach the compiled code as a
constant: each block gets its own layer's key and value cache tensors
(:meth:`tracer.model.KVCache.layer`), never an index into the cache (an int that Dynamo would
bake in, one graph per layer).

How many blocks one graph spans is a trade. Each call of a compiled graph costs about a tenth of a
millisecond of Dynamo and AOTAutograd bookkeeping (3 ms a token over 30 calls), while compiling
grows with the code in the graph, faster than linearly. Measured side by side on SmolLM2-135M
(30 layers, float32, 2 cores of an AVX-512 Xeon; the variants' decoding interleaved in one process,
each cold compile in a fresh one with an empty inductor cache):

    blocks per graph      1      2      3      5      30 (the whole step as one graph)
    decode, vs eager      1.08x  1.13x  1.14x  1.20x  1.26x
    cold compile, s       5.5    6.6    7.6    9.5    35 (41.7 without cpp.vec_isa_ok, as before)

So a graph spans the largest number of blocks up to :data:`MAX_BLOCKS_PER_GRAPH` that divides
the layer count (equal runs: a shorter last run would be a second graph to compile).

The embedding lookup, RoPE's table lookup, the final norm and lm_head stay eager around the
graphs: one row each, a few microseconds of work besides lm_head's product, which is one call to
the CPU kernel either way (a second small graph for the final norm and lm_head measured 0.96x to
1.04x in two runs: no gain for one more compile). The kernels are torch operators
(``tracer.kernels.ops``), so the compiled graph calls them as it calls any op.

torch._dynamo (and sympy) cost seconds to import: only :class:`CompiledStep` imports them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn

from . import attend, kernels
from .errors import DeviceError
from .kernels import ops
from .matvec import KernelLinear, KernelStacked, sharing
from .model import KVCache, LlamaModel, Stacked

MATVEC_CHOICES = ("auto", "kernel", "torch")
# Blocks one compiled graph spans at most (see the table above): 5 for SmolLM2's 30 layers, 4 for
# Llama-3.2-1B's 16, 2 for TinyLlama's 22, 1 (a graph per block) for a prime number above 5.
MAX_BLOCKS_PER_GRAPH = 5

# ---------------------------------------------------------------------------------------------
# The kernels, swapped in


def use_kernels(model: LlamaModel, matvec: str = "auto") -> str:
    """Choose what computes the model's products, and swap it in: "auto", "kernel" or "torch".

    "kernel" (and "auto" where it can be built: x86-64 with AVX2 and a C compiler) runs them on
    ``tracer/kernels`` (one-row products of decode, 16-bit prompt rows, and the static step's
    attention over large caches); "torch" keeps ``F.linear`` everywhere. A model off the CPU
    always keeps torch's, and neither it nor "torch" builds anything. Returns what is in use:
    "kernel" or "torch" (:func:`products`).
    """
    if matvec not in MATVEC_CHOICES:
        raise ValueError(f"matvec must be 'auto', 'kernel' or 'torch', not {matvec!r}")
    lib = _library_for(model, matvec)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            swapped = _swapped(child, lib)
            if swapped is not child:
                setattr(parent, name, swapped)
    return products(model)


def _library_for(model: LlamaModel, matvec: str) -> kernels.Library | None:
    """The kernels to swap in, or None for torch's products. Builds them only where they may run."""
    if matvec == "torch" or model.device.type != "cpu":
        return None
    lib = kernels.library()  # built the first time (once per machine), loaded once per process
    if not lib.available:
        if matvec == "kernel":
            raise DeviceError(f"matvec='kernel' asked for, but {lib.reason}; use matvec='auto' or 'torch'")
        return None
    ops.register()  # the operators a compiled graph calls
    return lib


def _swapped(module: nn.Module, lib: kernels.Library | None) -> nn.Module:
    """``module`` on the kernels of ``lib`` (or on torch's products where ``lib`` is None)."""
    kind = type(module)
    if lib is not None and kind is nn.Linear:
        return sharing(KernelLinear, module)
    if lib is not None and kind is Stacked:
        return KernelStacked(lib.limits.max_parts)
    if lib is None and kind is KernelLinear:
        return sharing(nn.Linear, module)
    if lib is None and kind is KernelStacked:
        return Stacked()
    return module


def products(model: LlamaModel) -> str:
    """What computes ``model``'s products: "kernel" or "torch" (:func:`use_kernels` swaps all of
    them together, lm_head with the rest)."""
    return "kernel" if isinstance(model.lm_head, KernelLinear) else "torch"


def step_attention(model: LlamaModel) -> Callable:
    """The static step's attention for ``model``: on the kernel where its products are."""
    if products(model) == "kernel":
        return attend.OnKernel(kernels.library().limits)
    return attend.masked


# ---------------------------------------------------------------------------------------------
# The static step


def decode_blocks(
    blocks: nn.ModuleList, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor,
    keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...], attention: Callable,
) -> torch.Tensor:
    """A run of consecutive layers for one token: ``h`` [B, 1, D] through ``blocks`` at
    ``position`` [1], each writing its own layer's ``keys``/``values`` [B, Hkv, max_len, hd] in
    place and attending with ``attention`` (``tracer.attend``). The compiled region."""
    for block, k, v in zip(blocks, keys, values):
        h = decode_block(block, h, cos, sin, position, k, v, attention)
    return h


def decode_block(block, h, cos, sin, position, keys, values, attention) -> torch.Tensor:
    """:meth:`tracer.model.Block.forward` for one token at a tensor ``position``, over all of
    its layer's cache slots (``keys``/``values`` [B, Hkv, max_len, hd]): the same shapes at every
    position."""
    attn = block.attn
    q, k, v = attn.project(block.ln1(h), cos, sin)  # [B, H, 1, hd], [B, Hkv, 1, hd], [B, Hkv, 1, hd]
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
    B, H, _, hd = q.shape
    # The query heads sharing a KV head as its rows, [B, Hkv, n_rep, hd] (tracer.attend's layout).
    z = attention(q.reshape(B, attn.n_kv, H // attn.n_kv, hd), keys, values, position, attn.scale)
    h = h + attn.output(z.reshape(B, H, 1, hd))
    return h + block.mlp(block.ln2(h))


class StaticStep:
    """One decode token through the model with static shapes, eager (what :class:`CompiledStep`
    compiles): ``step(token [B, 1], position [1], cache) -> logits [B, V]``.

    The position is a tensor, not a Python int, and attention spans the whole preallocated cache
    with the unwritten slots masked, so every step has the same shapes. It neither reads nor
    advances ``cache.length`` (an int that a compiled graph would bake in); the caller does.
    ``attention`` defaults to :func:`step_attention` of the model as it is now.
    """

    def __init__(self, model: LlamaModel, *, attention: Callable | None = None, blocks_per_graph: int | None = None):
        layers = len(model.blocks)
        k = blocks_per_graph or layers
        if k < 1 or layers % k:
            raise ValueError(f"blocks_per_graph={k} does not divide the model's {layers} layers")
        self.model, self.blocks_per_graph = model, k
        self.attention = attention or step_attention(model)
        self._runs = [(slice(i, i + k), model.blocks[i : i + k]) for i in range(0, layers, k)]
        self._blocks = decode_blocks

    def __call__(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        model = self.model
        cos = cache.cos.index_select(0, position)[None, :, None, :]  # [1, 1, 1, hd], for every layer
        sin = cache.sin.index_select(0, position)[None, :, None, :]
        h = model.embed(token)  # [B, 1, D]
        for layers, blocks in self._runs:
            h = self._blocks(
                blocks, h, cos, sin, position, tuple(cache.keys[layers]), tuple(cache.values[layers]), self.attention
            )
        return model.unembed(h)[:, -1]  # [B, V]


def choose_blocks_per_graph(num_layers: int, most: int = MAX_BLOCKS_PER_GRAPH) -> int:
    """The largest divisor of ``num_layers`` up to ``most``: runs of that many blocks tile the
    model exactly, so one graph serves every run."""
    return max(k for k in range(1, most + 1) if num_layers % k == 0)


def _options() -> dict:
    """torch.compile options of the compiled runs (a new dict each time: torch.compile takes
    guard_filter_fn out of the dict it is given)."""
    return {
        # Guards on the blocks' modules are skipped: checked at every call they would cost more
        # than fusing saves. The graph still reads the weights at each call (they are inputs, so
        # in-place edits show), but module attributes (swapped products, hooks) are read once, at
        # compile time: the Decoder takes the eager model whenever a hook is attached.
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        # Inductor's first compile in a cache folder otherwise builds and loads a test program
        # for each vector instruction set the CPU reports (a third of a cold compile on two
        # cores); this trusts the CPU's flags, as torch's own kernels do.
        "cpp.vec_isa_ok": True,
    }


class CompiledStep(StaticStep):
    """:class:`StaticStep` with the blocks on one compiled graph that every run of blocks shares.

    Shapes are static: the first step with a cache of a new size compiles, a cache of another size
    compiles once more. :attr:`compile_seconds` lists the wall time of each step that compiled (the
    compile and that one step), and ``on_compile(seconds)`` is told of each. ``blocks_per_graph``
    (default: :func:`choose_blocks_per_graph`) must divide the number of layers; the runs are the
    model's blocks, and its products, as they are when the step is made. Hooks are not run: use the
    eager model while any is attached (the Decoder does).
    """

    kind = "compiled-block"  # what trace meta["step"] says when decode steps run here

    def __init__(
        self, model: LlamaModel, *, blocks_per_graph: int | None = None, attention: Callable | None = None,
        on_compile: Callable[[float], None] | None = None,
    ) -> None:
        from torch._dynamo.utils import counters  # seconds to import: paid by compile=True only

        per_graph = blocks_per_graph or choose_blocks_per_graph(len(model.blocks))
        super().__init__(model, attention=attention, blocks_per_graph=per_graph)
        self.on_compile, self._counters = on_compile, counters
        self.compile_seconds: list[float] = []
        # isolate_recompiles: this model's graphs count against its own recompile limit, not against
        # those of every model compiled in the process (each CompiledStep compiles decode_blocks).
        self._blocks = torch.compile(decode_blocks, dynamic=False, options=_options(), isolate_recompiles=True)

    def __call__(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        stats = self._counters["stats"]
        graphs, t0 = stats["unique_graphs"], time.perf_counter()
        logits = super().__call__(token, position, cache)
        if stats["unique_graphs"] != graphs:  # Dynamo compiled a graph in this step
            self.compile_seconds.append(time.perf_counter() - t0)
            if self.on_compile is not None:
                self.on_compile(self.compile_seconds[-1])
        return logits
