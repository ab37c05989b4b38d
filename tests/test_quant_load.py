"""tracer.load(gguf, quantized=True): linear layers keep the file's quantized blocks (a view of the
mapped file, tracer.quant.QuantLinear) and compute what the dequantized float32 load computes.

The oracle is our own default load of the same file (every tensor dequantized to float32: proven
equal to transformers' GGUF reader in test_gguf.py and test_real_model.py). On the real model
(SmolLM2's Q4_1 GGUF) logits agree within 1e-3 and greedy tokens for 64 steps; on the small files
tests/gguf_builders.py writes (Q8_0, Q4_0, Q4_1; tied and untied; q/k rows permuted as llama.cpp
stores them) the same, more tightly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tracer
from tracer import api
from tracer.catalog import CATALOG, offline_gguf
from tracer.errors import CheckpointError, DeviceError
from tracer.gguf_file import GGUFFile, hub_name
from tracer.quant import (
    KERNEL_ROWS,
    EachLayer,
    QuantEmbedding,
    QuantLinear,
    dequantize,
    kernel_decodes,
)

PROMPT = "The capital of France is Paris, and the capital of Germany is"
LINEARS = ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w_gate", "mlp.w_up", "mlp.w_down")


def load(path, **kwargs):
    return tracer.load(path, device="cpu", progress=False, **kwargs)


def greedy(llm, ids: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """``steps`` greedy tokens after ``ids`` through the model and its KV cache (the prompt as one
    prefill, then one row per step: the decode path), with each step's logits [V]."""
    model, tokens, logits = llm.model, [], []
    cache = model.new_cache(len(ids) + steps)
    with torch.inference_mode():
        out = model(torch.tensor([ids]), cache, last_only=True)[0, -1]
        for _ in range(steps):
            logits.append(out.float())
            tokens.append(int(out.argmax()))
            out = model(torch.tensor([[tokens[-1]]]), cache)[0, -1]
    return tokens, logits


def linear_layers(llm) -> dict[str, nn.Module]:
    return {f"blocks.{i}.{name}": block.get_submodule(name) for i, block in enumerate(llm.model.blocks)
            for name in LINEARS}


# --- The real model ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def path():
    return offline_gguf(CATALOG["smollm2"])


@pytest.fixture(scope="module")
def quantized(path):
    return load(path, quantized=True)


@pytest.fixture(scope="module")
def dequantized(path):
    return load(path, dtype="float32", quantized=False)


def test_real_model_logits_within_1e_3_and_64_greedy_tokens_equal(quantized, dequantized):
    ids = dequantized.tokenizer.encode(PROMPT)
    prompt = (quantized.logits(ids) - dequantized.logits(ids)).abs().max().item()  # prefill: block tiles
    assert prompt <= 1e-3
    ours, our_logits = greedy(quantized, ids, 64)
    theirs, their_logits = greedy(dequantized, ids, 64)
    assert ours == theirs
    worst = max((a - b).abs().max().item() for a, b in zip(our_logits, their_logits))  # decode: the kernel
    assert worst <= 1e-3, worst


def test_real_model_chats_through_the_decoder(quantized):
    gen = quantized.generate("What is the capital of France?", chat=True, do_sample=False, capture="light")
    assert gen.text == "The capital of France is Paris."


def test_every_linear_layer_is_a_view_of_the_mapped_file(quantized, path):
    """Each layer's blocks lie in one storage, the file mapped whole, at that tensor's offset."""
    g = GGUFFile.open(path)
    offsets = {hub_name(n): t.begin for n, t in g.tensors.items()}
    layers = linear_layers(quantized)
    assert len(layers) == 7 * quantized.config.num_hidden_layers
    storage = layers["blocks.0.attn.wq"].blocks.untyped_storage()
    assert storage.nbytes() == path.stat().st_size
    for name, layer in layers.items():
        assert isinstance(layer, QuantLinear) and layer.kind.name == "Q4_1", name
        assert layer.blocks.untyped_storage().data_ptr() == storage.data_ptr(), name
        i, part = name.split(".", 2)[1:]
        hub = {"attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj", "attn.wv": "self_attn.v_proj",
               "attn.wo": "self_attn.o_proj", "mlp.w_gate": "mlp.gate_proj", "mlp.w_up": "mlp.up_proj",
               "mlp.w_down": "mlp.down_proj"}[part]
        assert layer.blocks.data_ptr() - storage.data_ptr() == offsets[f"model.layers.{i}.{hub}.weight"], name
        assert (layer.order is not None) == (part in ("attn.wq", "attn.wk")), name
    # SmolLM2's embedding (Q8_0) stays in blocks too, and its tied lm_head multiplies by the very same bytes.
    embed, head = quantized.model.embed, quantized.model.lm_head
    assert isinstance(embed, QuantEmbedding) and embed.kind.name == "Q8_0"
    assert embed.blocks.data_ptr() - storage.data_ptr() == offsets["model.embed_tokens.weight"]
    assert isinstance(head, QuantLinear) and head.blocks.data_ptr() == embed.blocks.data_ptr()
    assert quantized.model.dtype == torch.float32 and quantized.dtype == torch.float32
    assert isinstance(quantized.model.blocks[0].attn.qkv, EachLayer)


def test_the_load_trace_says_which_path_each_layer_took(quantized, dequantized):
    paths = quantized.load_trace.meta["quantized"]
    assert paths == {"lm_head": "tied:embed", "embed": "quantized:Q8_0",
                     **{name: "quantized:Q4_1" for name in linear_layers(quantized)}}
    (shard,) = quantized.load_trace.of("load_shard")
    q4 = shard.by_type["Q4_1"]
    assert q4["kept_quantized"] == q4["tensors"] == 210
    assert q4["bytes_in_memory"] == q4["bytes_on_disk"]  # the blocks, not four bytes a weight
    assert shard.by_type["Q8_0"]["kept_quantized"] == 1
    # The weights each type stands for are counted the same on both loads (bits per weight: 5 for Q4_1).
    (plain,) = dequantized.load_trace.of("load_shard")
    assert {t: r["weights"] for t, r in shard.by_type.items()} == {t: r["weights"] for t, r in plain.by_type.items()}
    assert 8 * q4["bytes_on_disk"] == 5 * q4["weights"]
    assert shard.casts == {}  # nothing dequantized at load: only the norms, stored as float32 already
    assert json.loads(json.dumps(quantized.load_trace.meta))["quantized"] == paths
    # The dequantized load (quantized=False): no such meta, no such column.
    assert "quantized" not in dequantized.load_trace.meta
    assert all("kept_quantized" not in row for row in plain.by_type.values())


def test_a_quantized_load_refuses_cuda_float16_and_safetensors_in_one_line(path, quantized):
    with pytest.raises(DeviceError, match=r"quantized=True runs on the CPU in float32, not on cpu in float16"):
        load(path, quantized=True, dtype="float16")
    resolved = quantized.resolved
    with pytest.raises(DeviceError, match=r"not on cuda in float32") as cuda:
        api._check_quantized(resolved, torch.device("cuda"), torch.float32)  # checked without a GPU
    assert "\n" not in str(cuda.value)
    with pytest.raises(CheckpointError, match=r"quantized=True keeps a GGUF file's quantized blocks") as st:
        tracer.load(None, device="cpu", progress=False, quantized=True)  # the embedded model: safetensors
    assert "\n" not in str(st.value)


RSS_SCRIPT = """
import json, sys, torch, tracer
from tracer import kernels
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
kernels.library()  # built or loaded before the baseline, as any load does
base = rss()
llm = tracer.load(sys.argv[1], device='cpu', progress=False, quantized=sys.argv[2] == 'q')
print(json.dumps({"rss": rss() - base}))
"""


def _rss_after_load(path, mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(RSS_SCRIPT), str(path), mode],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["rss"]


def test_a_quantized_load_is_resident_in_less_memory(path, quantized):
    """The kept layers cost no float32 copy: against the dequantized load, the resident memory
    after loading is smaller by at least half of those layers' float32 bytes (424 MB here)."""
    float_bytes = sum(4 * m.in_features * m.out_features for m in linear_layers(quantized).values())
    q, d = _rss_after_load(path, "q"), _rss_after_load(path, "d")
    print(f"RSS after load: quantized {q / 1e6:.0f} MB, dequantized {d / 1e6:.0f} MB")
    assert q < d and d - q >= float_bytes // 2, (q, d, float_bytes)


# --- Small files of each block type the writer makes, q/k permuted, tied and untied -----------------

KINDS = {"gpt2-q8_0-tied": "Q8_0", "gpt2-q4_0-tied": "Q4_0", "llama-q4_1": "Q4_1"}


@pytest.mark.parametrize("kind", KINDS)
def test_small_files_compute_what_the_dequantized_load_computes(gguf_file, kind):
    path = gguf_file(kind).path
    q, d = load(path, quantized=True), load(path, dtype="float32", quantized=False)
    layers = linear_layers(q)
    assert all(isinstance(m, QuantLinear) and m.kind.name == KINDS[kind] for m in layers.values())
    order = layers["blocks.0.attn.wq"].order
    assert order is not None and not torch.equal(order, torch.arange(len(order)))  # a real permutation
    tied = q.config.tie_word_embeddings
    assert tied == kind.endswith("-tied")
    if tied:  # the embedding's blocks (these files store it in the same type) serve both
        assert isinstance(q.model.embed, QuantEmbedding) and isinstance(q.model.lm_head, QuantLinear)
        assert q.model.lm_head.blocks.data_ptr() == q.model.embed.blocks.data_ptr()
        assert q.load_trace.meta["quantized"]["lm_head"] == "tied:embed"
    else:  # its own tensor: kept in blocks like the rest
        assert isinstance(q.model.lm_head, QuantLinear)
        assert q.load_trace.meta["quantized"]["lm_head"] == f"quantized:{KINDS[kind]}"
    ids = list(range(3, 40, 3))
    scale = d.logits(ids).abs().max().item()
    assert (q.logits(ids) - d.logits(ids)).abs().max().item() <= 1e-5 * scale
    ours, our_logits = greedy(q, ids, 12)
    theirs, their_logits = greedy(d, ids, 12)
    assert ours == theirs
    assert max((a - b).abs().max().item() for a, b in zip(our_logits, their_logits)) <= 1e-5 * scale


def test_a_quantized_load_of_a_plain_float_file_keeps_nothing_in_blocks(gguf_file):
    """F32 tensors are not block formats: every layer loads as it would anyway, and says so."""
    q = load(gguf_file("gpt2-f32").path, quantized=True)
    assert not any(isinstance(m, QuantLinear) for m in q.model.modules())
    assert set(q.load_trace.meta["quantized"].values()) == {"dequantized:F32"}


def test_the_layer_s_order_reorders_its_output_features_on_both_paths():
    """Output feature i is stored row order[i]: the one-row (kernel) and several-row products."""
    import gguf

    rows, columns = 12, 64
    w = torch.randn(rows, columns, generator=torch.Generator().manual_seed(0))
    raw = torch.from_numpy(gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType.Q8_0))
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(1))
    plain, ordered = QuantLinear(raw, "Q8_0", rows, columns), QuantLinear(raw, "Q8_0", rows, columns, order=order)
    # One row (the kernel), a short prompt (the kernel, row by row), a long one (dequantized tiles).
    for x in (torch.randn(1, 1, columns), torch.randn(2, 3, columns), torch.randn(3, KERNEL_ROWS, columns)):
        with torch.inference_mode():
            assert torch.equal(ordered(x), plain(x)[..., order])
            plain.use_kernel = False  # the torch path computes the same, within float32 summation order
            torch.testing.assert_close(plain(x), F.linear(x, dequantize(raw, "Q8_0", (rows, columns))),
                                       atol=1e-5, rtol=1e-5)
            plain.use_kernel = kernel_decodes(plain.type_id)
    with pytest.raises(ValueError, match=r"order has shape \(11,\), not \(12,\)"):
        QuantLinear(raw, "Q8_0", rows, columns, order=order[:11])


# --- The default, the products' path, the compiled step, saving -------------------------------------


def test_a_gguf_on_the_cpu_keeps_its_blocks_by_default_and_dequantizes_when_told(gguf_file):
    """quantized="auto": kept on a CPU float32 load of a file with block-format layers; a 16-bit
    dtype, quantized=False, a file of plain floats or a safetensors folder load as transformers does."""
    path = gguf_file("llama-q4_1").path
    auto = load(path)
    assert auto.dtype == torch.float32 and isinstance(auto.model.blocks[0].attn.wq, QuantLinear)
    assert auto.load_trace.meta["quantized"]["blocks.0.attn.wq"] == "quantized:Q4_1"
    for llm in (load(path, dtype="float16"), load(path, quantized=False), load(gguf_file("gpt2-f32").path)):
        assert not any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in llm.model.modules())
        assert "quantized" not in llm.load_trace.meta
    assert "quantized" not in load(None).load_trace.meta  # the embedded model: safetensors
    with pytest.raises(DeviceError, match=r"quantized='yes' is not one of 'auto', True or False") as bad:
        load(path, quantized="yes")
    assert "\n" not in str(bad.value)


def test_matvec_torch_keeps_the_blocks_but_leaves_every_product_to_torch(gguf_file):
    path = gguf_file("llama-q4_1").path
    kernel, plain = load(path, quantized=True), load(path, quantized=True, matvec="torch")
    layers = [m for m in plain.model.modules() if isinstance(m, QuantLinear)]
    assert layers and not any(m.use_kernel for m in layers)
    assert all(m.use_kernel for m in kernel.model.modules() if isinstance(m, QuantLinear))
    # The untied head (its own Q4_1 tensor) says where its products run.
    assert isinstance(kernel.model.lm_head, QuantLinear)
    assert kernel.load_trace.meta["matvec"] == "kernel" and plain.load_trace.meta["matvec"] == "torch"
    ids = list(range(3, 40, 3))
    ours, our_logits = greedy(kernel, ids, 8)
    theirs, their_logits = greedy(plain, ids, 8)
    assert ours == theirs
    scale = their_logits[0].abs().max().item()
    assert max((a - b).abs().max().item() for a, b in zip(our_logits, their_logits)) <= 1e-5 * scale


def test_the_compiled_step_runs_the_quantized_kernels(path, quantized):
    """compile=True with kept blocks: the kernel is an operator of the compiled graph, and the
    compiled decode gives the eager decode's tokens."""
    compiled = load(path, quantized=True, compile=True)
    prompt = "What is the capital of France?"
    gen = compiled.generate(prompt, chat=True, do_sample=False, max_new_tokens=12, capture="off")
    assert gen.trace.meta["step"] == "compiled-block" and compiled.load_trace.meta.get("compile_seconds")
    eager = quantized.generate(prompt, chat=True, do_sample=False, max_new_tokens=12, capture="off")
    assert gen.new_ids == eager.new_ids


def test_kept_layers_show_the_weight_their_blocks_stand_for_and_save_as_floats(gguf_file, tmp_path):
    """``.weight`` of a QuantLinear / QuantEmbedding is the dequantized load's weight (q/k rows in
    the model's order), a lookup gives its rows, and save_pretrained writes those weights."""
    from safetensors.torch import load_file

    from tracer.checkpoint import hf_state_dict, save_pretrained

    path = gguf_file("llama-q4_1").path
    q, d = load(path, quantized=True), load(path, quantized=False)
    assert isinstance(q.model.embed, QuantEmbedding)
    for name in ("embed", "blocks.0.attn.wq", "blocks.1.attn.wk", "blocks.0.mlp.w_down", "lm_head"):
        torch.testing.assert_close(q.model.get_submodule(name).weight, d.model.get_submodule(name).weight,
                                   atol=0, rtol=0, msg=name)
    ids = torch.tensor([[5, 7, q.config.vocab_size - 1], [0, 1, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(q.model.embed(ids), d.model.embed(ids), atol=0, rtol=0)
    save_pretrained(q.model, tmp_path, dtype=torch.float32)
    written, expected = load_file(str(tmp_path / "model.safetensors")), hf_state_dict(d.model)
    assert set(written) == set(expected)
    for name, t in expected.items():
        torch.testing.assert_close(written[name], t, atol=0, rtol=0, msg=name)
