"""tracer/fast.py: the static decode step (eager and compiled, one compiled block shared by every
layer) and the kernels swapped into the model."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_cuda import cpu_tests  # noqa: F401  (the fixture)
from test_model import small_model
from torch._dynamo.utils import counters

import tracer
from tracer import attend, fast, kernels
from tracer.errors import DeviceError
from tracer.fast import CompiledStep, StaticStep
from tracer.matvec import KernelLinear, KernelStacked
from tracer.model import LlamaModel, Stacked, init_weights

KERNEL = kernels.library()
needs_kernel = pytest.mark.skipif(not KERNEL.available, reason=f"no kernel here: {KERNEL.reason}")
# CPU tests: tracer.load without device= fails here (on a GPU host "auto" would be CUDA).
pytestmark = pytest.mark.usefixtures("cpu_tests")


def _graphs() -> int:
    """Graphs compiled so far in this process (Dynamo's count: one per compile or recompile)."""
    return counters["stats"]["unique_graphs"]


def _model(cfg, **changes) -> LlamaModel:
    model = LlamaModel(dataclasses.replace(cfg, **changes)).eval()
    init_weights(model, torch.Generator().manual_seed(1))
    return model


def _prefilled(model: LlamaModel, ids: list[int], size: int):
    cache = model.new_cache(size)
    model(torch.tensor([ids]), cache, last_only=True)
    return cache


@torch.inference_mode()
def _compare(model: LlamaModel, compiled: CompiledStep, steps: int, size: int, atol: float = 1e-5) -> list[int]:
    """Decode ``steps`` tokens with the eager :class:`StaticStep` (same attention) and with
    ``compiled`` from the same prompt, each on its own cache; the logits must agree at every step.
    Returns the tokens."""
    ids = [1, 5, 9, 3]
    eager_cache, fast_cache = _prefilled(model, ids, size), _prefilled(model, ids, size)
    eager = StaticStep(model, attention=compiled.attention)
    token, tokens = torch.tensor([[7]]), []
    for p in range(len(ids), len(ids) + steps):
        want = eager(token, torch.tensor([p]), eager_cache)
        got = compiled(token, torch.tensor([p]), fast_cache)
        torch.testing.assert_close(got, want, atol=atol, rtol=atol, msg=lambda m, p=p: f"position {p}: {m}")
        assert torch.equal(got.argmax(-1), want.argmax(-1)), p
        token = want.argmax(-1, keepdim=True)
        tokens.append(int(token))
    # Every layer wrote its own keys and values (a layer writing another's would show here).
    for layer in range(model.config.num_hidden_layers):
        for a, b in zip(eager_cache.layer(layer), fast_cache.layer(layer)):
            torch.testing.assert_close(b[:, :, : p + 1], a[:, :, : p + 1], atol=atol, rtol=atol)
    return tokens


@pytest.mark.parametrize("per_graph", [1, None])  # a graph per block (called for each), and the default
def test_compiled_step_equals_the_eager_step(tiny_llm, per_graph):
    """float32: the compiled step's logits equal the eager static step's within 1e-5 over 40
    decode steps, and its greedy tokens are the same."""
    model = tiny_llm.model
    tokens = _compare(model, CompiledStep(model, blocks_per_graph=per_graph), steps=40, size=64)
    assert len(set(tokens)) > 1  # the tokens move: the comparison covers more than one input


@pytest.mark.parametrize("per_graph", [1, None])  # a graph per block, and the default runs of blocks
def test_one_compiled_graph_serves_every_layer_whatever_the_layer_count(tiny_llm, per_graph):
    """Regional compilation: the graph compiles once (per cache size) for 2 layers and for 6.
    Anything layer-specific baked into the compiled code as a constant (a layer index) would
    compile once per layer (or run of layers) here; a second cache size compiles once more, and
    going back to the first compiles nothing."""
    for model in (tiny_llm.model, _model(tiny_llm.config, num_hidden_layers=6)):
        compiled = CompiledStep(model, blocks_per_graph=per_graph)
        runs = model.config.num_hidden_layers // compiled.blocks_per_graph
        assert runs > 1 or model.config.num_hidden_layers == 2  # the 6-layer model calls the graph repeatedly
        where = f"{model.config.num_hidden_layers} layers, {compiled.blocks_per_graph} per graph"
        before = _graphs()
        _compare(model, compiled, steps=3, size=32)
        assert _graphs() - before == 1, where
        _compare(model, compiled, steps=3, size=48)  # another size: one more graph
        assert _graphs() - before == 2, where
        _compare(model, compiled, steps=3, size=32)  # back to the first: reused
        assert _graphs() - before == 2, where
        assert len(compiled.compile_seconds) == 2 and all(s > 0 for s in compiled.compile_seconds)


def test_runs_of_blocks_tile_the_layers():
    """A graph spans the largest divisor of the layer count up to MAX_BLOCKS_PER_GRAPH."""
    assert fast.MAX_BLOCKS_PER_GRAPH == 5
    got = {layers: fast.choose_blocks_per_graph(layers) for layers in (1, 2, 6, 7, 16, 22, 30, 32)}
    assert got == {1: 1, 2: 2, 6: 3, 7: 1, 16: 4, 22: 2, 30: 5, 32: 4}


def test_blocks_per_graph_must_divide_the_layers(tiny_llm):
    with pytest.raises(ValueError, match="does not divide"):
        CompiledStep(_model(tiny_llm.config, num_hidden_layers=6), blocks_per_graph=4)


def test_models_of_other_shapes_get_their_own_graphs(tiny_llm):
    """Guards on the modules are skipped, and every CompiledStep compiles the same function: a
    model whose weights alone differ in shape (intermediate size) must still get its own graph."""
    wider = _model(tiny_llm.config, intermediate_size=2 * tiny_llm.config.intermediate_size)
    for model in (tiny_llm.model, wider):
        _compare(model, CompiledStep(model), steps=4, size=32)


@needs_kernel
def test_the_cpu_kernels_run_inside_the_compiled_block(tiny_llm):
    """The matvec and attention kernels are custom ops: the compiled block calls them, and its
    logits still equal the eager step's (which runs them too)."""
    model = _model(tiny_llm.config)
    assert fast.use_kernels(model, "kernel") == "kernel"
    # min_keys=0: this cache is far below the size where the step would use the attention kernel.
    compiled = CompiledStep(model, attention=attend.OnKernel(KERNEL.limits, min_keys=0))
    _compare(model, compiled, steps=8, size=32)


def test_generation_meta_says_which_step_ran_and_what_compiling_cost(tiny_checkpoint):
    """load(compile=True): the generation that compiled carries compile_seconds in its trace meta,
    the load trace keeps the first one, later generations in the same cache bucket compile
    nothing; meta["step"] says "compiled-block" for untraced decoding and "eager" elsewhere."""
    fast = tracer.load(tiny_checkpoint, device="cpu", progress=False, compile=True)
    eager = tracer.load(tiny_checkpoint, device="cpu", progress=False)
    assert fast.load_trace.meta["step"] == "compiled-block" and eager.load_trace.meta["step"] == "eager"
    assert "compile_seconds" not in fast.load_trace.meta  # nothing compiled yet
    kw = dict(max_new_tokens=30, do_sample=False, capture="off")
    first = fast.generate("The people", **kw)
    assert first.new_ids == eager.generate("The people", **kw).new_ids
    assert first.trace.meta["step"] == "compiled-block"
    assert first.trace.meta["compile_seconds"] > 0
    assert fast.load_trace.meta["compile_seconds"] == first.trace.meta["compile_seconds"]
    again = fast.generate("The people", **{**kw, "max_new_tokens": 20})  # same bucket: no compile
    assert again.trace.meta["step"] == "compiled-block" and "compile_seconds" not in again.trace.meta
    traced = fast.generate("The people", max_new_tokens=2, do_sample=False)  # light: the eager model
    assert traced.trace.meta["step"] == "eager" and "compile_seconds" not in traced.trace.meta


# --- The compiled step on CUDA, and what it checks before each step ---------------------------


def test_the_compile_options_keep_guards_and_take_cuda_graphs_on_cuda():
    """CUDA: CUDA graphs, every guard kept (the weights' device and dtype among them). CPU: no
    graphs, guards on the modules skipped (the step checks placement itself)."""
    cuda, cpu = fast.compile_options(torch.device("cuda")), fast.compile_options(torch.device("cpu"))
    assert cuda.get("triton.cudagraphs") is True and "guard_filter_fn" not in cuda
    assert not cpu.get("triton.cudagraphs") and cpu["guard_filter_fn"] is torch.compiler.skip_guard_on_all_nn_modules_unsafe
    assert fast.compile_options(torch.device("cpu")) is not cpu  # a new dict: torch.compile pops from it


def test_the_cuda_compile_path_runs_here_with_static_inputs_and_one_graph_for_every_layer(tiny_llm, monkeypatch):
    """CUDA's options on a CPU model (inductor skips the graphs off the GPU, the rest is the same):
    guards kept, one graph still serves every run of blocks; the cache's tensors and the step's
    buffers are marked static (where a CUDA graph reads and writes them), and each step begins a
    new replay."""
    from torch._dynamo.utils import get_static_address_type

    begun = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: begun.append(1))
    model = _model(tiny_llm.config, num_hidden_layers=6)
    compiled = CompiledStep(model, blocks_per_graph=2, options=fast.compile_options(torch.device("cuda")))
    assert compiled.cuda_graphs
    before = _graphs()
    _compare(model, compiled, steps=3, size=32)
    assert _graphs() - before == 1  # 3 runs of 2 blocks, one graph: no per-layer guard failed
    assert len(begun) == 3
    cache, steps = _prefilled(model, [1, 5, 9, 3], 32), len(begun)
    with torch.inference_mode():
        compiled.at(7, 4, cache)
    assert len(begun) == steps + 1
    tokens, position = compiled._inputs(cache)
    for t in (*cache.keys, *cache.values, tokens, position):
        assert get_static_address_type(t) == "unguarded"
    plain = CompiledStep(model)  # the CPU's options: nothing is marked
    assert not plain.cuda_graphs
    other = _prefilled(model, [1, 5, 9, 3], 32)
    with torch.inference_mode():
        plain.at(7, 4, other)
    assert get_static_address_type(other.keys[0]) is None


@torch.inference_mode()
def test_at_writes_ints_into_the_steps_own_buffers_and_makes_no_tensor_from_host_data(tiny_llm):
    """step.at(token, position, cache) with Python ints (or the token as a device tensor) equals
    step(token tensor, position tensor, cache); the buffers are made once, and a step builds no
    tensor from host data (torch.tensor(...) per step would be a host-to-device copy on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    model = tiny_llm.model
    step = StaticStep(model)
    a, b = _prefilled(model, [1, 5, 9, 3], 16), _prefilled(model, [1, 5, 9, 3], 16)
    token = 7
    for p in range(4, 9):
        want = step(torch.tensor([[token]]), torch.tensor([p]), a)
        with Ops() as ops:
            got = step.at(token if p % 2 else torch.tensor([[token]]), p, b)
        torch.testing.assert_close(got, want, atol=0, rtol=0)
        if p % 2:  # an int token: nothing of the step comes from host data
            assert not [n for n in ops.names if "lift_fresh" in n or "_to_copy" in n], ops.names
        token = int(want.argmax())
    assert len(step._buffers) == 1
    tokens, position = step._inputs(b)
    assert int(position) == 8 and tokens.shape == (1, 1)


def test_a_moved_or_cast_model_compiles_again_and_an_old_cache_is_refused(tiny_llm):
    """The compiled step checks what it was compiled for before each step: a cast model compiles
    again (and computes in the new dtype, equal to the eager step), a cache left in the old dtype
    is refused with a one-line DeviceError rather than fed to the wrong graph."""
    model = _model(tiny_llm.config)
    compiled = CompiledStep(model)
    _compare(model, compiled, steps=2, size=32)
    old = _prefilled(model, [1, 5, 9, 3], 32)
    model.to(torch.bfloat16)
    assert compiled.placement[1] == torch.float32
    _compare(model, compiled, steps=2, size=32, atol=2e-2)
    assert compiled.placement == (torch.device("cpu"), torch.bfloat16, "torch") and len(compiled.compile_seconds) == 2
    with pytest.raises(DeviceError, match="the KV cache is float32 on cpu but the model is now bfloat16"):
        with torch.inference_mode():
            compiled.at(7, 4, old)


def test_past_the_recompile_limit_the_step_says_so_and_compiles_afresh(tiny_llm):
    """torch runs a function uncompiled once it holds recompile_limit variants (a generation whose
    cache reaches a new size would then run the slow masked loops without a word): the step warns
    and starts a fresh compile cache. Each step has its own count: a second step on the same model
    compiles its first shape whatever the first one holds."""
    model = tiny_llm.model
    with torch._dynamo.config.patch(recompile_limit=1):
        first, second = CompiledStep(model), CompiledStep(model)
        _compare(model, first, steps=2, size=32)
        _compare(model, second, steps=2, size=32)
        assert len(second.compile_seconds) == 1  # not counted against the first one's limit
        with pytest.warns(RuntimeWarning, match="recompile limit"):
            _compare(model, first, steps=2, size=48)
    assert first.fresh_starts == 1 and len(first.compile_seconds) == 2  # compiled, not run uncompiled


# --- The static step against the model -------------------------------------------------------


@pytest.fixture(params=[6, 2, 1], ids=["mha", "gqa", "mqa"])
def tiny_model_and_ids(request):
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    return small_model(num_key_value_heads=request.param), ids


@torch.inference_mode()
@pytest.mark.parametrize("attention", ["masked", "kernel"])
def test_static_step_equals_forward_with_the_cache(tiny_model_and_ids, attention):
    """The static step (tensor position, attention over every slot with the rest masked, or on the
    CPU kernel over the slots written) gives the logits of forward(token, cache) and writes the
    same keys and values, step after step."""
    model, ids = tiny_model_and_ids
    step = StaticStep(model)
    if attention == "kernel":
        if fast.use_kernels(model, "auto") != "kernel":
            pytest.skip(f"no kernel here: {KERNEL.reason}")
        # min_keys=0: this cache is far below the size where the step would use the attention kernel.
        step = StaticStep(model, attention=attend.OnKernel(KERNEL.limits, min_keys=0))
    a, b = _prefilled(model, ids, len(ids) + 6), _prefilled(model, ids, len(ids) + 6)
    for t in b.keys + b.values:
        t[:, :, len(ids):] = 1e3  # stale slots beyond the position must not matter
    token = torch.tensor([[5]])
    for _ in range(5):
        start = a.length
        want = model(token, a, last_only=True)[:, -1]
        got = step(token, torch.tensor([start]), b)
        b.length = start + 1
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(b.k[:, :, :, : a.length], a.k[:, :, :, : a.length], atol=1e-5, rtol=1e-5)
        token = want.argmax(-1, keepdim=True)


@torch.inference_mode()
def test_static_step_in_float16_stays_close_to_forward(tiny_model_and_ids):
    model, ids = tiny_model_and_ids
    model = small_model(num_key_value_heads=model.config.num_key_value_heads).half()
    a, b = _prefilled(model, ids, len(ids) + 3), _prefilled(model, ids, len(ids) + 3)
    token = torch.tensor([[5]])
    want = model(token, a, last_only=True)[:, -1].float()
    got = StaticStep(model)(token, torch.tensor([len(ids)]), b).float()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=1e-2)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@torch.inference_mode()
def test_static_step_attends_its_own_way_whatever_is_hooked(tiny_model_and_ids):
    """A pattern hook does not change what the static step computes, nor is it fed: the
    Decoder takes the eager model (whose pattern spans the written positions) while one is attached."""
    model, ids = tiny_model_and_ids
    a, b = _prefilled(model, ids, len(ids) + 4), _prefilled(model, ids, len(ids) + 4)
    want = StaticStep(model)(torch.tensor([[5]]), torch.tensor([len(ids)]), a)
    with model.hooks.record("blocks.0.attn.pattern") as rec:
        got = StaticStep(model)(torch.tensor([[5]]), torch.tensor([len(ids)]), b)
    assert rec.names() == []
    torch.testing.assert_close(got, want, atol=0, rtol=0)


# --- The kernels, swapped in -----------------------------------------------------------------


def test_use_kernels_swaps_every_product_and_back_over_the_same_parameters():
    """"kernel" puts KernelLinear in place of every nn.Linear and KernelStacked of every Stacked,
    "torch" puts the plain ones back; the Parameters (a mapped checkpoint's views) are the same
    objects throughout, so the names and values of the weights never change."""
    if not KERNEL.available:
        pytest.skip(KERNEL.reason)
    model = small_model(tie_word_embeddings=True)
    params = dict(model.named_parameters())
    kinds = lambda: {type(m) for m in model.modules()}  # noqa: E731
    assert fast.use_kernels(model, "kernel") == "kernel" == fast.products(model)
    assert {KernelLinear, KernelStacked} <= kinds() and not {torch.nn.Linear, Stacked} & kinds()
    assert model.lm_head.weight is model.embed.weight
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert isinstance(fast.step_attention(model), attend.OnKernel)
    assert fast.use_kernels(model, "torch") == "torch" == fast.products(model)
    assert {torch.nn.Linear, Stacked} <= kinds() and not {KernelLinear, KernelStacked} & kinds()
    assert all(p is params[n] for n, p in model.named_parameters())
    assert fast.step_attention(model) is attend.masked


# --------------------------------------------------------------------------- prompt rows, per CPU

def _fake_timer(kernel_seconds: float, torch_seconds: float):
    """A clock read twice per contender (start, end), kernel first, as rows_on_kernel reads it."""
    ticks = iter([0.0, kernel_seconds, 0.0, torch_seconds])
    return lambda: next(ticks)


@needs_kernel
@pytest.mark.parametrize(("kernel_s", "torch_s", "expected"), [(1.0, 3.0, True), (3.0, 1.0, False)])
def test_prompt_rows_go_to_whichever_measured_faster(kernel_s, torch_s, expected):
    model = small_model().to(torch.float16)
    assert fast.rows_on_kernel(model, timer=_fake_timer(kernel_s, torch_s)) is expected


def test_float32_prompts_stay_on_torch_without_measuring():
    model = small_model()

    def clock():
        raise AssertionError("a float32 model measured its prompt rows")

    assert fast.rows_on_kernel(model, timer=clock) is False


@needs_kernel
@torch.inference_mode()
def test_prompt_rows_off_the_kernel_are_torch_exactly():
    """With rows=False a 16-bit prompt is F.linear bit for bit (one row still takes the kernel)."""
    model = small_model().to(torch.float16)
    fast.use_kernels(model, "kernel")
    layers = [m for m in model.modules() if isinstance(m, (KernelLinear, KernelStacked))]
    assert layers and len({m.rows for m in layers}) == 1  # one decision for the whole model
    assert fast.prompt_products(model) == ("kernel" if layers[0].rows else "torch")
    for m in layers:
        m.rows = False
    lin = model.lm_head
    x = torch.randn(7, lin.in_features, generator=torch.Generator().manual_seed(0)).to(torch.float16)
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight))
    assert fast.prompt_products(model) == "torch"
