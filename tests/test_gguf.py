"""GGUF in: tracer.load of llama.cpp's files agrees with transformers' own GGUF reader.

The files are written by the tests (tests/gguf_builders.py) from random transformers Llamas, one per
tokenizer family (byte-level BPE "gpt2", sentencepiece-style "llama") and tensor type (F32, F16,
BF16, Q8_0, Q4_0, Q4_1), tied and untied. transformers reads the same file with
``from_pretrained(folder, gguf_file=...)``; ids, decoded text, chat ids, fp32 logits and greedy
continuations must be equal. The real model (SmolLM2's GGUF from PyPI) is in test_real_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tracer
from tracer import gguf_file as gf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import gguf_builders  # noqa: E402

# The kinds transformers reads as llama.cpp means them (it ignores the rope_freqs of "llama3-bpe").
ORACLE_KINDS = [k for k in gguf_builders.KINDS if k != "llama3-bpe"]
TEXTS = [
    "The people of the world came back to the little state.",
    "numbers 12345 67890 3.14159 and x1y22",
    "naïve café résumé, Zürich Straße; emoji 🦙 🚀 ✨ 東京 日本語",
    "  double  spaces  \tand\nnewlines\n\n",
    " leading space",
    "I'm sure they've said it's OK",
    "<|im_start|>user\nhi there<|im_end|>\n<s>special</s> tokens <unk>",
]
PROMPT = "It was the first day of the year, and the people of the world"


def hf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def hf_tokenizer(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def ours(path, **kwargs):
    """Our load as transformers' (every block dequantized to float32; the quantized default, which
    keeps blocks, is compared with this load in test_quant_load.py)."""
    kwargs.setdefault("quantized", False)
    return tracer.load(path, device="cpu", dtype="float32", progress=False, **kwargs)


@pytest.mark.parametrize("kind", ORACLE_KINDS)
def test_ids_decoding_and_chat_ids_match_transformers(gguf_file, kind):
    path = gguf_file(kind).path
    tok, ref = ours(path).tokenizer, hf_tokenizer(path)
    for text in TEXTS:
        expected = ref(text)["input_ids"]
        assert tok.encode(text) == expected, text
        assert tok.encode(text, parse_special=False) == ref(text, split_special_tokens=True)["input_ids"], text
        for skip in (True, False):
            assert tok.decode(expected, skip_special_tokens=skip) == ref.decode(expected, skip_special_tokens=skip)
    if ref.chat_template:
        messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
        expected = ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert tok.chat(messages).ids == list(expected)


@pytest.mark.parametrize("kind", ORACLE_KINDS)
def test_fp32_logits_and_greedy_tokens_match_transformers(gguf_file, kind):
    path = gguf_file(kind).path
    llm, theirs = ours(path), hf_model(path)
    ids = llm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.logits(ids), expected, atol=1e-4, rtol=0)
    gen = llm.generate(ids, max_new_tokens=16, do_sample=False, capture="off")
    x = torch.tensor([ids])
    theirs_ids = theirs.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=16, do_sample=False)
    assert gen.new_ids == theirs_ids[0, len(ids):].tolist()


def test_a_file_with_rope_freqs_computes_the_source_model(gguf_file):
    """Llama 3.1's rope scaling lives in a GGUF as the rope_freqs tensor, which transformers' GGUF
    reader ignores: the source model (transformers with the llama3 config) is the oracle here."""
    path, source, _ = gguf_file("llama3-bpe")
    llm = ours(path)
    assert llm.config.rope.freq_factors is not None
    ids = [1, 5, 77, 300, 2, 9, 123, 42] * 4
    with torch.no_grad():
        expected = source(torch.tensor([ids])).logits[0].float()
        gguf_reader = hf_model(path)(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(llm.logits(ids), expected, atol=1e-4, rtol=0)
    assert (gguf_reader - expected).abs().max() > 1e-3  # what ignoring rope_freqs costs


@pytest.mark.parametrize("kind", ["llama-f16", "gpt2-q4_0-tied", "llama-bf16"])
def test_sixteen_bit_loads_agree_with_transformers_in_the_same_dtype(gguf_file, kind):
    path = gguf_file(kind).path
    llm = tracer.load(path, device="cpu", dtype="bfloat16" if "bf16" in kind else "float16", progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=llm.dtype).eval()
    ids = llm.tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = theirs(torch.tensor([ids])).logits[0].float()
    got = llm.logits(ids)
    torch.testing.assert_close(got, expected, atol=2e-2 * expected.abs().max().item(), rtol=1e-2)


def test_the_load_trace_names_the_file_and_counts_bytes_per_type(gguf_file):
    path = gguf_file("gpt2-q4_0-tied").path
    llm = ours(path)
    (resolve,) = llm.load_trace.of("resolve")
    assert resolve.format == "gguf" and resolve.weight_files == [path.name]
    (shard,) = llm.load_trace.of("load_shard")
    assert shard.format == "gguf" and set(shard.by_type) == {"Q4_0", "Q8_0", "float32"}
    for row in shard.by_type.values():
        assert row["tensors"] > 0 and row["bytes_on_disk"] > 0 and row["seconds"] >= 0
    # 4-bit blocks: 18 bytes on disk per 32 weights, 128 bytes in float32 memory
    q4 = shard.by_type["Q4_0"]
    assert q4["bytes_in_memory"] * 18 == q4["bytes_on_disk"] * 128
    assert sum(r["tensors"] for r in shard.by_type.values()) == shard.num_tensors
    assert shard.casts == {"Q4_0->float32": q4["tensors"], "Q8_0->float32": 1}


def test_a_same_dtype_plain_file_maps_all_but_q_and_k(gguf_file):
    """F32 tensors in a float32 load are views of the file, except q and k, which llama.cpp
    stores permuted and which must be reordered (so copied)."""
    path = gguf_file("gpt2-f32").path
    llm = ours(path)
    (shard,) = llm.load_trace.of("load_shard")
    layers = llm.config.num_hidden_layers
    assert shard.tensors_mapped == shard.num_tensors - 2 * layers


# --- the pieces -------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("shape", [(1, 32), (3, 64), (7, 96), (64, 256)])
def test_our_block_decoding_equals_the_gguf_library(qtype, shape):
    w = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32) * 3
    t = gguf.GGMLQuantizationType[qtype]
    blocks = gguf.quants.quantize(w, t)
    info = gf.GGUFTensor("x", shape, qtype, t.value, 0, blocks.nbytes)
    ours_ = gf._dequantize(blocks.reshape(-1), info)
    np.testing.assert_array_equal(ours_, gguf.quants.dequantize(blocks, t).reshape(shape))


def test_unpermute_inverts_llama_cpp_permutation():
    from benchmarks.gguf_writer import rope_pairs_to_neighbours

    w = torch.randn(3 * 8, 5)  # 3 heads of head_dim 8
    permuted = torch.from_numpy(rope_pairs_to_neighbours(w.numpy(), 3))
    assert not torch.equal(permuted, w)
    assert torch.equal(gf.unpermute_rows(permuted, 3), w)


def test_header_parse_reads_what_the_gguf_library_reads(gguf_file):
    path = gguf_file("llama-q4_1").path
    g = gf.GGUFFile.open(path, strings=("tokenizer.ggml.tokens",))
    reader = gguf.GGUFReader(str(path))
    assert [t.name for t in reader.tensors] == list(g.tensors)
    for t in reader.tensors:
        ours_ = g.tensors[t.name]
        assert ours_.type_name == t.tensor_type.name and ours_.begin == t.data_offset
        assert ours_.nbytes == t.n_bytes and ours_.shape == tuple(int(d) for d in reversed(t.shape))
    assert g.metadata["tokenizer.ggml.tokens"] == reader.fields["tokenizer.ggml.tokens"].contents()
    assert g.metadata["llama.block_count"] == reader.fields["llama.block_count"].contents()
    skipped = gf.GGUFFile.open(path).metadata["tokenizer.ggml.tokens"]
    assert isinstance(skipped, gf.SkippedStrings) and len(skipped) == len(g.metadata["tokenizer.ggml.tokens"])
