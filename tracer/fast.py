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

On CUDA the same runs of blocks are compiled with CUDA graphs (:func:`compile_options`): at batch
1 a step is a few hundred small kernels, bound by launching them, and a graph replays each run as
one launch. A graph reads its inputs where they were when it was recorded, so the KV cache's
tensors and the step's token and position buffers are marked static (their addresses do not
change), and the step takes plain ints (:meth:`StaticStep.at`) that land in those buffers,
rather than a new tensor per step, whose host-to-device copy would wait for the GPU. A new cache
(each generation makes its own) has new addresses: the graphs are recorded again over it, once
per generation (torch 2.11 stops recording a function after 128 such re-records and runs it
without graphs from then on; torch 2.13 does not count them). The kernels (``tracer.kernels``)
are CPU code: nothing of them is built for a CUDA model.

torch._dynamo (and sympy) cost seconds to import: only :class:`CompiledStep` imports them.
"""

from __future__ import annotations

import time
import types
import warnings
import weakref
from collections.abc import Callable

import torch
from torch import nn

from . import attend, dtypes, kernels, matvec
from .errors import DeviceError
from .kernels import ops
from .matvec import KernelLinear, KernelStacked, sharing
from .model import KVCache, LlamaModel, Stacked
from .quant import QuantLinear

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
    attention over large caches); "torch" keeps ``F.linear`` everywhere. The kernels are CPU code:
    a model off the CPU keeps torch's products under "auto", "kernel" there is a
    :class:`~tracer.errors.DeviceError`, and neither builds anything (no compiler is run for a
    CUDA load), nor does "torch". Returns what is in use: "kernel" or "torch" (:func:`products`).
    """
    if matvec not in MATVEC_CHOICES:
        raise ValueError(f"matvec must be 'auto', 'kernel' or 'torch', not {matvec!r}")
    lib = _library_for(model, matvec)
    rows = lib is not None and rows_on_kernel(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            swapped = _swapped(child, lib, rows)
            if swapped is not child:
                setattr(parent, name, swapped)
    return products(model)


def _library_for(model: LlamaModel, matvec: str) -> kernels.Library | None:
    """The kernels to swap in, or None for torch's products. Builds them only where they may run."""
    if matvec == "torch":
        return None
    if model.device.type != "cpu":  # decided before any build: a CUDA load never runs the compiler
        if matvec == "kernel":
            raise DeviceError(f"matvec='kernel' runs on the CPU only, but the model is on {model.device}; "
                              "use matvec='auto' or 'torch' there (both mean torch's products off the CPU)")
        return None
    lib = kernels.library()  # built the first time (once per machine), loaded once per process
    if not lib.available:
        if matvec == "kernel":
            raise DeviceError(f"matvec='kernel' asked for, but {lib.reason}; use matvec='auto' or 'torch'")
        return None
    ops.register()  # the operators a compiled graph calls
    return lib


def rows_on_kernel(model: LlamaModel, *, timer: Callable[[], float] = time.perf_counter) -> bool:
    """Whether a 16-bit prompt's rows run faster on the kernel than on torch's matmul, on this CPU.

    Measured once per load on one MLP-sized product of 64 rows (about 0.1 s for 7B shapes), as the
    answer depends on the machine: the kernel widens 16-bit weights to float32 (several times
    torch's speed on AVX2), while torch's float16/bfloat16 matmul uses AVX512-FP16 or AMX where the
    CPU has them (faster than the kernel there). Float32 prompts always use torch's BLAS.
    """
    if model.dtype not in matvec.ROWS_DTYPES:
        return False
    cfg = model.config
    # Any values time the same; small constants keep float16 finite.
    w = torch.full((cfg.intermediate_size, cfg.hidden_size), 0.01, dtype=model.dtype)
    x = torch.full((matvec.ROWS_PER_CALL, cfg.hidden_size), 0.01, dtype=model.dtype)
    seconds = {}
    with torch.inference_mode():
        for name, fn in (("kernel", lambda: matvec.product(x, w)), ("torch", lambda: torch.nn.functional.linear(x, w))):
            fn()  # warm: pages touched, threads up
            start = timer()
            fn()
            fn()
            seconds[name] = timer() - start
    return seconds["kernel"] < seconds["torch"]


def _swapped(module: nn.Module, lib: kernels.Library | None, rows: bool = True) -> nn.Module:
    """``module`` on the kernels of ``lib`` (or on torch's products where ``lib`` is None); ``rows``:
    a 16-bit prompt's rows on the kernel too (:func:`rows_on_kernel`)."""
    kind = type(module)
    if kind is QuantLinear:  # its blocks stay; only where its one-row products run changes
        module.use_kernel = lib is not None and module.type_id in lib.quant_formats
        return module
    if lib is not None and kind in (KernelLinear, KernelStacked):
        module.rows = rows
        return module
    if lib is not None and kind is nn.Linear:
        swapped = sharing(KernelLinear, module)
        swapped.rows = rows
        return swapped
    if lib is not None and kind is Stacked:
        return KernelStacked(lib.limits.max_parts, rows)
    if lib is None and kind is KernelLinear:
        return sharing(nn.Linear, module)
    if lib is None and kind is KernelStacked:
        return Stacked()
    return module


def products(model: LlamaModel) -> str:
    """What computes ``model``'s products: "kernel" or "torch" (:func:`use_kernels` swaps all of
    them together, lm_head with the rest; a quantized lm_head says where its blocks' products run)."""
    head = model.lm_head
    on_kernel = head.use_kernel if isinstance(head, QuantLinear) else isinstance(head, KernelLinear)
    return "kernel" if on_kernel else "torch"


def prompt_products(model: LlamaModel) -> str:
    """What computes a 16-bit prompt's several rows: "kernel" or "torch" (:func:`rows_on_kernel`)."""
    return "kernel" if isinstance(model.lm_head, KernelLinear) and model.lm_head.rows else "torch"


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
    compiles): ``step(token [B, 1], position [1], cache) -> logits [B, V]``, or
    :meth:`at` with the position as a Python int.

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
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

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

    def at(self, token: int | torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        """The step for ``token`` at ``position``, a Python int: logits [B, V].

        Both are written into this step's own input buffers on the cache's device (one per batch
        size, made once): the position with a fill, the token with a fill (an int id) or a
        device-to-device copy (a [B, 1] tensor of ids already there). A step so makes no new
        tensor and no host-to-device copy, which on a GPU waits for the whole queue; and the
        buffers stay where they are, which a CUDA graph needs (:class:`CompiledStep`).
        """
        tokens, where = self._inputs(cache)
        if isinstance(token, torch.Tensor):
            tokens.copy_(token)
        else:
            tokens.fill_(token)
        where.fill_(position)
        return self(tokens, where, cache)

    def _inputs(self, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """The (token [B, 1], position [1]) buffers for ``cache``'s device and batch size."""
        keys = cache.keys[0]
        key = (keys.device, keys.shape[0])
        if key not in self._buffers:
            # Plain tensors even when made under inference_mode (the Decoder's steps are): an
            # inference tensor could not be written outside it.
            with torch.inference_mode(False):
                tokens = torch.zeros(keys.shape[0], 1, dtype=torch.long, device=keys.device)
                self._buffers[key] = (tokens, torch.zeros(1, dtype=torch.long, device=keys.device))
        return self._buffers[key]


def choose_blocks_per_graph(num_layers: int, most: int = MAX_BLOCKS_PER_GRAPH) -> int:
    """The largest divisor of ``num_layers`` up to ``most``: runs of that many blocks tile the
    model exactly, so one graph serves every run."""
    return max(k for k in range(1, most + 1) if num_layers % k == 0)


def compile_options(device: torch.device) -> dict:
    """torch.compile options of the compiled runs on ``device`` (a new dict each time: torch.compile
    takes guard_filter_fn out of the dict it is given).

    CUDA: CUDA graphs (inductor's ``triton.cudagraphs``, what ``mode="reduce-overhead"`` sets). A
    batch-1 decode step is a few hundred small kernels, so it is bound by launching them; a graph
    replays each run of blocks as one launch. Every guard is kept, the weights' device and dtype
    among them. CPU: no graphs, and guards on the blocks' modules are skipped (checked at every
    call they would cost more than fusing saves). Without them the graph still reads the weights
    at each call (they are inputs, so in-place edits show), but module attributes (swapped
    products, hooks) are read once, at compile time: the Decoder takes the eager model whenever a
    hook is attached, and :class:`CompiledStep` compiles again when the model's device, dtype or
    products change (:func:`placement`).
    """
    if device.type == "cuda":
        return {"triton.cudagraphs": True}
    return {
        "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
        # Inductor's first compile in a cache folder otherwise builds and loads a test program
        # for each vector instruction set the CPU reports (a third of a cold compile on two
        # cores); this trusts the CPU's flags, as torch's own kernels do.
        "cpp.vec_isa_ok": True,
    }


def placement(model: LlamaModel) -> tuple[torch.device, torch.dtype, str]:
    """What a compiled step was compiled for: the model's device, dtype and products."""
    return model.device, model.dtype, products(model)


def _own_copy(fn: Callable) -> Callable:
    """``fn`` over a code object of its own. Dynamo keeps a function's compiled variants, and
    counts them against its recompile limit, per code object: with a copy each
    :class:`CompiledStep` has its own (what ``torch.compile(isolate_recompiles=True)`` does from
    torch 2.12 on; torch 2.11 has no such argument)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class CompiledStep(StaticStep):
    """:class:`StaticStep` with the blocks on one compiled graph that every run of blocks shares.

    Shapes are static: the first step with a cache of a new size compiles, a cache of another size
    compiles once more. :attr:`compile_seconds` lists the wall time of each step that compiled (the
    compile and that one step), and ``on_compile(seconds)`` is told of each. ``blocks_per_graph``
    (default: :func:`choose_blocks_per_graph`) must divide the number of layers; the runs are the
    model's blocks. Hooks are not run: use the eager model while any is attached (the Decoder does).

    Before each step it checks what the graph was compiled for (:func:`placement`): a model moved,
    cast or given other products since compiles again, and a cache whose device or dtype is not
    the model's is refused. Each step compiles ``compile_options(model.device)``; on CUDA that is
    CUDA graphs, with the cache's tensors and the :meth:`~StaticStep.at` buffers marked static
    (graphs read and write them where they are) and every step begun as a new graph replay
    (``torch.compiler.cudagraph_mark_step_begin``). Past torch's recompile limit
    (``torch._dynamo.config.recompile_limit`` cache shapes), where torch would fall back to the
    uncompiled step, it warns and starts a fresh compile cache instead (:attr:`fresh_starts`).
    """

    kind = "compiled-block"  # what trace meta["step"] says when decode steps run here

    def __init__(
        self, model: LlamaModel, *, blocks_per_graph: int | None = None, attention: Callable | None = None,
        on_compile: Callable[[float], None] | None = None, options: dict | None = None,
    ) -> None:
        import torch._dynamo  # seconds to import: paid by compile=True only
        from torch._dynamo.utils import counters

        per_graph = blocks_per_graph or choose_blocks_per_graph(len(model.blocks))
        super().__init__(model, attention=attention, blocks_per_graph=per_graph)
        self.on_compile, self._counters, self._dynamo = on_compile, counters, torch._dynamo
        self._attention_given, self._options_given = attention, options
        self.compile_seconds: list[float] = []
        self.fresh_starts = 0  # compile caches started anew at the recompile limit
        self._marked: weakref.ref | None = None  # the cache whose tensors are marked static
        self._compile()

    def _compile(self) -> None:
        """A new compiled function (no variants yet) for the model as it is now."""
        model = self.model
        self.placement = placement(model)
        self.attention = self._attention_given or step_attention(model)
        options = dict(self._options_given if self._options_given is not None else compile_options(model.device))
        self.cuda_graphs = bool(options.get("triton.cudagraphs"))
        self._shapes: set[tuple[int, ...]] = set()
        self._graphs = 0  # graphs this compiled function made (a shape can take more than one)
        self._marked = None
        self._blocks = torch.compile(_own_copy(decode_blocks), dynamic=False, options=options)
        for tokens, where in self._buffers.values():
            self._mark_static(tokens, where)

    def __call__(self, token: torch.Tensor, position: torch.Tensor, cache: KVCache) -> torch.Tensor:
        self._prepare(cache)
        stats = self._counters["stats"]
        graphs, t0 = stats["unique_graphs"], time.perf_counter()
        logits = super().__call__(token, position, cache)
        if stats["unique_graphs"] != graphs:  # Dynamo compiled a graph in this step
            self._graphs += stats["unique_graphs"] - graphs
            self.compile_seconds.append(time.perf_counter() - t0)
            if self.on_compile is not None:
                self.on_compile(self.compile_seconds[-1])
        return logits

    def _prepare(self, cache: KVCache) -> None:
        """Checks before a step (a few attribute reads), and what CUDA graphs need."""
        model = self.model
        if placement(model) != self.placement:  # moved, cast or other products since compiled
            self._compile()
        keys = cache.keys[0]
        if keys.device != model.device or keys.dtype != model.dtype:
            raise DeviceError(
                f"the KV cache is {dtypes.name_of(keys.dtype)} on {keys.device} but the model is now "
                f"{dtypes.name_of(model.dtype)} on {model.device}; start a new generation after moving "
                "or casting the model"
            )
        if tuple(keys.shape) not in self._shapes:
            self._count_shape(tuple(keys.shape))
        if self.cuda_graphs:
            if self._marked is None or self._marked() is not cache:
                self._mark_static(*cache.keys, *cache.values)
                self._marked = weakref.ref(cache)
            torch.compiler.cudagraph_mark_step_begin()  # this step's replays may reuse the last one's memory

    def _count_shape(self, shape: tuple[int, ...]) -> None:
        """A cache shape this compiled function has not seen: Dynamo compiles it, unless the
        function already holds as many variants as torch's recompile limit lets it."""
        limit, held = self._dynamo.config.recompile_limit, max(len(self._shapes), self._graphs)
        if held >= limit:
            warnings.warn(
                f"compiled decode step: {held} variants compiled, torch's recompile limit "
                f"(torch._dynamo.config.recompile_limit = {limit}); starting a fresh compile cache for "
                f"shape {list(shape)} rather than running the step uncompiled (earlier shapes compile again "
                "when they come back)",
                RuntimeWarning,
                stacklevel=4,
            )
            self.fresh_starts += 1
            self._compile()
        self._shapes.add(shape)

    def _inputs(self, cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        fresh = len(self._buffers)
        buffers = super()._inputs(cache)
        if len(self._buffers) != fresh:
            self._mark_static(*buffers)
        return buffers

    def _mark_static(self, *tensors: torch.Tensor) -> None:
        """Tell the compiler these tensors keep their address (unguarded: another cache of the
        same shape re-records the CUDA graphs rather than compiling again). Only with CUDA graphs."""
        if self.cuda_graphs:
            for t in tensors:
                self._dynamo.mark_static_address(t, guard=False)
