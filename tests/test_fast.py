"""tracer/fast.py: the compiled decode step, one compiled block shared by every layer."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import tracer
from tracer import fast, matvec
from tracer.fast import CompiledStep
from tracer.model import LlamaModel, init_weights

KERNEL = matvec.kernel()


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
    """Decode ``steps`` tokens with the eager ``LlamaModel.step`` and with ``compiled`` from the
    same prompt, each on its own cache; the logits must agree at every step. Returns the tokens."""
    ids = [1, 5, 9, 3]
    eager_cache, fast_cache = _prefilled(model, ids, size), _prefilled(model, ids, size)
    token, tokens = torch.tensor([[7]]), []
    for p in range(len(ids), len(ids) + steps):
        want = model.step(token, torch.tensor([p]), eager_cache)
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
    """float32: the compiled step's logits equal LlamaModel.step's within 1e-5 over 40 decode
    steps, and its greedy tokens are the same."""
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


@pytest.mark.skipif(not KERNEL.available, reason=f"no kernel here: {KERNEL.reason}")
def test_the_cpu_kernels_run_inside_the_compiled_block(tiny_llm):
    """The matvec and attention kernels are custom ops: the compiled block calls them, and its
    logits still equal the eager step's (which runs them too)."""
    model = _model(tiny_llm.config)
    assert model.set_matvec("kernel") == "kernel"
    for block in model.blocks:
        block.attn.kernel_min_keys = 0  # this cache is far below the size where the model would use it
    _compare(model, CompiledStep(model), steps=8, size=32)


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
