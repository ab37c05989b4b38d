"""The compiled decode step, beside the model: one compiled graph serves every layer.

``tracer.load(..., compile=True)`` (:meth:`tracer.api.Llama.compile_step`) makes untraced decoding
(capture="off") run :class:`CompiledStep` instead of the eager model. It computes what
:meth:`tracer.model.LlamaModel.step` computes (one token at a tensor position, attention over the
whole preallocated cache with the unwritten slots masked, so that every step has the same shapes),
but only the repeated part is compiled: a run of consecutive blocks, :func:`decode_blocks`.

This is torch's "regional compilation". Dynamo inlines ``nn.Module`` calls and makes their
parameters graph inputs, so runs of blocks that execute the same code on same-shaped weights pass
the same guards and share one compiled graph: the graph is compiled once, whatever the number of
layers. For that, nothing layer-specific may reach the compiled code as a constant: each block gets
its own layer's key and value cache tensors (:meth:`tracer.model.KVCache.layer`), never an index
into the cache (an int that Dynamo would bake in, one graph per layer).

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
1.04x in two runs: no gain for one more compile). The C kernels of ``tracer/matvec.py``
and ``tracer/attend.py`` are torch custom ops, so the compiled graph calls them as it calls any op.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch._dynamo.utils import counters

from .model import KVCache, LlamaModel

# Blocks one compiled graph spans at most (see the table above): 5 for SmolLM2's 30 layers, 4 for
# Llama-3.2-1B's 16, 2 for TinyLlama's 22, 1 (a graph per block) for a prime number above 5.
MAX_BLOCKS_PER_GRAPH = 5


def _options() -> dict:
    """torch.compile options of the compiled runs (a new dict each time: torch.compile takes
    guard_filter_fn out of the dict it is given)."""
    return {
        # Guards on the blocks' modules are skipped: checked at every call they would cost more
        # than fusing saves. The graph still reads the weights at each call (they are inputs, so
        # in-place edits show), but module attributes (use_kernel, hooks) are read once, at
        # compile time: the Decoder takes the eager model whenever a hook is attached.
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        # Inductor's first compile in a cache folder otherwise builds and loads a test program
        # for each vector instruction set the CPU reports (a third of a cold compile on two
        # cores); this trusts the CPU's flags, as torch's own kernels do.
        "cpp.vec_isa_ok": True,
    }


def choose_blocks_per_graph(num_layers: int, most: int = MAX_BLOCKS_PER_GRAPH) -> int:
    """The largest divisor of ``num_layers`` up to ``most``: runs of that many blocks tile the
    model exactly, so one graph serves every run."""
    return max(k for k in range(1, most + 1) if num_layers % k == 0)


def decode_blocks(
    blocks: nn.ModuleList, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position: torch.Tensor,
    keys: tuple[torch.Tensor, ...], values: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """A run of consecutive layers of :meth:`LlamaModel.step`: ``h`` [B, 1, D] through ``blocks``
    at ``position`` [1], each writing its own layer's ``keys``/``values`` [B, Hkv, max_len, hd] in
    place. The compiled region."""
    for block, k, v in zip(blocks, keys, values):
        h = block(h, cos, sin, position, (k, v))
    return h


class CompiledStep:
    """``LlamaModel.step`` with the blocks on one compiled graph that every run of blocks shares.

    Call it as ``step(token [B, 1], position [1], cache) -> logits [B, V]``; like
    ``LlamaModel.step`` it neither reads nor advances ``cache.length``. Shapes are static: the
    first step with a cache of a new size compiles, a cache of another size compiles once more.
    :attr:`compile_seconds` lists the wall time of each step that compiled (the compile and that
    one step), and ``on_compile(seconds)`` is told of each. ``blocks_per_graph`` (default:
    :func:`choose_blocks_per_graph`) must divide the number of layers; the runs are the model's
    blocks as they are when the step is made. Hooks are not run: use the eager model while any is
    attached (the Decoder does).
    """

    kind = "compiled-block"  # what trace meta["step"] says when decode steps run here

    def __init__(
        self, model: LlamaModel, *, blocks_per_graph: int | None = None,
        on_compile: Callable[[float], None] | None = None,
    ) -> None:
        layers = len(model.blocks)
        k = blocks_per_graph or choose_blocks_per_graph(layers)
        if k < 1 or layers % k:
            raise ValueError(f"blocks_per_graph={k} does not divide the model's {layers} layers")
        self.model, self.on_compile = model, on_compile
        self.blocks_per_graph = k
        self.compile_seconds: list[float] = []
        self._runs = [(slice(i, i + k), model.blocks[i : i + k]) for i in range(0, layers, k)]
        # isolate_recompiles: this model's graphs count against its own recompile limit, not against
        # those of every model compiled in the process (each CompiledStep compiles decode_blocks).
        self._compiled = torch.compile(decode_blocks, dynamic=False, options=_options(), isolate_recompiles=True)

    def __call__(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        logits = self._step(token, position, cache)
        if counters["stats"]["unique_graphs"] != graphs:  # Dynamo compiled a graph in this step
            self.compile_seconds.append(time.perf_counter() - t0)
            if self.on_compile is not None:
                self.on_compile(self.compile_seconds[-1])
        return logits

    def _step(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        model = self.model
        cos = cache.cos.index_select(0, position)[None, :, None, :]  # [1, 1, 1, hd], for every layer
        sin = cache.sin.index_select(0, position)[None, :, None, :]
        h = model.embed(token)  # [B, 1, D]
        for layers, blocks in self._runs:  # one graph, every run
            h = self._compiled(blocks, h, cos, sin, position, tuple(cache.keys[layers]), tuple(cache.values[layers]))
        return model.unembed(h)[:, -1]  # [B, V]
