"""The GGUF writers (benchmarks/gguf_writer.py, tests/gguf_builders.py) write what llama.cpp and
transformers expect. The judge is transformers' own GGUF reader: ``from_pretrained(folder,
gguf_file=...)`` for the model and the tokenizer, and gguf-py's GGUFReader for the raw file."""

from __future__ import annotations

import struct
import weakref

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

import gguf_builders  # noqa: E402

from benchmarks import gguf_writer  # noqa: E402
from tracer.config import LlamaConfig  # noqa: E402

TEXTS = [
    "Hello world, the first time!",
    "numbers 12345 67890 3.14159 and x1y22",
    "naïve café résumé, Zürich Straße",
    "emoji 🦙 🚀 ✨ 東京 日本語 Ελληνικά",
    "  double  spaces  \tand\nnewlines\n\n",
    " leading space",
    "code: def f(x): return x**2",
    "CamelCaseWords snake_case_words, tabs\tand\nnewlines",
    "I'm sure they've said it's OK",
]
CHAT_TEXT = "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n"
IDS = torch.tensor([[1, 5, 77, 300, 2, 9, 123, 42]])


def hf_from_gguf(path):
    """transformers' model read from the GGUF (its legacy llama path: GGUFReader + gguf.dequantize)."""
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


def hf_tokenizer_from_gguf(path):
    return transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def types(reader):
    return {t.name: t.tensor_type.name for t in reader.tensors}


# --- Weights ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt2-f32", "gpt2-f32-tied", "llama-f32", "llama-f32-tied"])
def test_f32_file_gives_the_source_logits(gguf_file, kind):
    path, source, _ = gguf_file(kind)
    model = hf_from_gguf(path)
    tied = source.config.tie_word_embeddings
    assert model.config.tie_word_embeddings == tied
    assert ("output.weight" in types(gguf.GGUFReader(str(path)))) == (not tied)
    torch.testing.assert_close(logits(model), logits(source), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, atol", [("gpt2-f16-tied", 5e-3), ("llama-f16", 5e-3), ("llama-bf16", 3e-2)])
def test_half_file_gives_close_logits_with_f32_norms(gguf_file, kind, atol):
    path, source, _ = gguf_file(kind)
    qtype = gguf_builders.KINDS[kind][1]["qtype"]
    stored = types(gguf.GGUFReader(str(path)))
    assert {stored[n] for n in stored if n.endswith("norm.weight")} == {"F32"}
    assert {stored[n] for n in stored if not n.endswith("norm.weight")} == {qtype}
    ours, theirs = logits(hf_from_gguf(path)), logits(source)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)
    assert not torch.equal(ours, theirs)  # it did go through half precision


def roundtrip(w: np.ndarray, qtype: str) -> np.ndarray:
    q = gguf.GGMLQuantizationType[qtype]
    return gguf.quants.dequantize(gguf.quants.quantize(w, q), q)


@pytest.mark.parametrize("kind", ["gpt2-q8_0-tied", "gpt2-q4_0-tied", "llama-q4_1", "llama-f16", "llama-bf16"])
def test_quantized_weights_are_gguf_quantize_roundtrips(gguf_file, kind):
    """transformers dequantizes each tensor and un-permutes q/k; what it gets must be the source
    weight through gguf's own quantize/dequantize (blocks run along rows, so the row permutation
    commutes with quantization)."""
    path, source, _ = gguf_file(kind)
    write = gguf_builders.KINDS[kind][1]
    stored = types(gguf.GGUFReader(str(path)))
    assert stored["token_embd.weight"] == write.get("embed_qtype", write["qtype"])
    assert stored["blk.1.attn_q.weight"] == stored["blk.0.ffn_down.weight"] == write["qtype"]
    assert stored["output_norm.weight"] == "F32"
    model = hf_from_gguf(path)
    got = model.state_dict()
    for name, w in source.state_dict().items():
        if name == "lm_head.weight" and source.config.tie_word_embeddings:
            continue
        w = w.float().numpy()
        qtype = stored[gguf_writer.gguf_name(name)]
        np.testing.assert_array_equal(got[name].float().numpy(), roundtrip(w, qtype), err_msg=name)
    assert not np.array_equal(got["model.layers.0.mlp.up_proj.weight"].numpy(),
                              source.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy())


def test_llama_keys_describe_the_model(gguf_file):
    path, source, _ = gguf_file("llama-q4_1")
    _, f = fields(path)
    c = source.config
    assert f["general.architecture"] == "llama" and f["general.type"] == "model"
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_1
    assert f["general.quantization_version"] == gguf.GGML_QUANT_VERSION
    expected = {"block_count": c.num_hidden_layers, "context_length": c.max_position_embeddings,
                "embedding_length": c.hidden_size, "feed_forward_length": c.intermediate_size,
                "attention.head_count": c.num_attention_heads, "attention.head_count_kv": c.num_key_value_heads,
                "rope.dimension_count": c.head_dim, "attention.key_length": c.head_dim,
                "vocab_size": c.vocab_size}
    assert {k: f["llama." + k] for k in expected} == expected
    assert f["llama.rope.freq_base"] == pytest.approx(c.rope_parameters["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(c.rms_norm_eps)


def test_llama3_rope_scaling_is_a_rope_freqs_tensor(gguf_file):
    import dataclasses

    from tracer.model import rope_inv_freq

    path, source, _ = gguf_file("llama3-bpe")
    reader, f = fields(path)
    (freqs,) = [t for t in reader.tensors if t.name == "rope_freqs.weight"]
    cfg = gguf_builders.hf_config(source)
    plain = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, rope_type="default"))
    assert freqs.tensor_type.name == "F32" and freqs.data.shape == (cfg.head_dim // 2,)
    np.testing.assert_allclose(freqs.data, (rope_inv_freq(plain) / rope_inv_freq(cfg)).numpy(), rtol=1e-6)
    assert freqs.data.max() == pytest.approx(8.0) and freqs.data.min() == pytest.approx(1.0)
    assert f["llama.rope.freq_base"] == 500000.0


# --- Tokenizers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["llama-f32", "gpt2-f32", "llama3-bpe"])
def test_tokenizer_read_from_the_gguf_gives_the_source_ids(gguf_file, kind):
    path, _, source = gguf_file(kind)
    write = gguf_builders.KINDS[kind][1]
    if write["tokenizer"] == "gpt2":  # the split the merges were learned with
        assert fields(path)[1]["tokenizer.ggml.pre"] == write.get("pre", "smollm")
    theirs = hf_tokenizer_from_gguf(path)
    texts = TEXTS + ([CHAT_TEXT] if gguf_builders.KINDS[kind][1]["tokenizer"] == "gpt2" else ["<s> x </s>"])
    for text in texts:
        assert theirs(text)["input_ids"] == source(text)["input_ids"], text
    assert len(theirs) == len(source)


def test_bos_is_added_as_each_family_says(gguf_file):
    """llama: BOS <s> (id 1); SmolLM2-like: none; Llama-3-like: BOS <|im_start|> (id 1 here)."""
    for kind, first in [("llama-f32", 1), ("gpt2-f32", None), ("llama3-bpe", 1)]:
        path, _, source = gguf_file(kind)
        ids = hf_tokenizer_from_gguf(path)("Hello")["input_ids"]
        assert (ids[0] == first) if first is not None else (1 not in ids and ids == source("Hello")["input_ids"])
        _, f = fields(path)
        assert f["tokenizer.ggml.add_bos_token"] == (first is not None)


def test_sentencepiece_metadata_types_each_piece_as_llama_cpp_does(gguf_file, sp_tokenizer_dir):
    import sentencepiece as spm

    path, _, _ = gguf_file("llama-f32")
    _, f = fields(path)
    sp = spm.SentencePieceProcessor(model_file=str(sp_tokenizer_dir / "tokenizer.model"))
    tokens, kinds = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert tokens == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    np.testing.assert_allclose(f["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(len(tokens))])
    by_token = dict(zip(tokens, kinds))
    assert (by_token["<unk>"], by_token["<s>"], by_token["</s>"]) == (2, 3, 3)  # UNKNOWN, CONTROL
    assert by_token["<0x41>"] == 6 and sum(k == 6 for k in kinds) == 256  # BYTE
    assert {k for t, k in by_token.items() if not t.startswith("<")} == {1}  # NORMAL
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_space_prefix"] is True
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.unknown_token_id"]) == (1, 2, 0)
    assert f["tokenizer.ggml.add_eos_token"] is False
    assert "tokenizer.chat_template" not in f


def test_bpe_metadata_is_smollm2_shaped(gguf_file):
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path, _, source = gguf_file("gpt2-f32")
    _, f = fields(path)
    tokens, kinds, merges = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"], f["tokenizer.ggml.merges"]
    assert tokens[:3] == list(gguf_builders.BPE_SPECIALS) and kinds[:3] == [3, 3, 3]
    assert set(kinds[3:]) == {1} and len(tokens) == gguf_builders.BPE_VOCAB_SIZE
    alphabet = set(bytes_to_unicode().values())
    assert all(set(t) <= alphabet for t in tokens[3:])
    assert len(merges) == len(tokens) - 3 - 256 and all(len(m.split(" ")) == 2 for m in merges)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "smollm"
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"],
            f["tokenizer.ggml.unknown_token_id"], f["tokenizer.ggml.padding_token_id"]) == (1, 2, 0, 2)
    assert f["tokenizer.chat_template"] == gguf_builders.CHATML
    chat = hf_tokenizer_from_gguf(path).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                            add_generation_prompt=True)
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert source.convert_ids_to_tokens([0, 1, 2]) == list(gguf_builders.BPE_SPECIALS)


# --- The writer itself -----------------------------------------------------------------------------


def tiny_config(**changes) -> LlamaConfig:
    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)
    return LlamaConfig(**{**base, **changes})


def test_tensors_may_come_in_any_order(tmp_path):
    """Each tensor is written at its own offset, so the order the source yields them in (shards,
    sorted names) does not change a byte of the file."""
    cfg = tiny_config()
    pairs = list(gguf_writer.random_tensors(cfg, seed=3))
    a = gguf_writer.write_llama_gguf(tmp_path / "a.gguf", cfg, iter(pairs), qtype="Q8_0")
    b = gguf_writer.write_llama_gguf(tmp_path / "b.gguf", cfg, reversed(pairs), qtype="Q8_0")
    assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]  # no .partial left


def test_the_writer_holds_one_tensor_at_a_time(tmp_path):
    """Streaming: by the time the source makes the next tensor, the writer has dropped the last
    one (GGUFWriter.add_tensor would have kept them all until write_tensors_to_file). Arrays hold
    no cycles, so reference counting frees them without a gc pass."""
    cfg = tiny_config()
    alive = []

    def source():
        for name, data in gguf_writer.random_tensors(cfg):
            alive.append(sum(r() is not None for r in refs))
            refs.append(weakref.ref(data))
            yield name, data
            del data

    refs: list = []
    gguf_writer.write_llama_gguf(tmp_path / "m.gguf", cfg, source(), qtype="Q4_0")
    assert len(alive) == 2 + 9 * cfg.num_hidden_layers + 1 and max(alive) == 0


@pytest.mark.parametrize("qtype", gguf_writer.MATRIX_TYPES)
def test_every_matrix_type_stores_gguf_quantize_of_the_permuted_rows(tmp_path, qtype):
    cfg = tiny_config()
    path = gguf_writer.write_random_gguf(tmp_path / "m.gguf", cfg, qtype=qtype, seed=2)
    reader, f = fields(path)
    assert f["general.file_type"] == gguf.LlamaFileType[gguf_writer.FILE_TYPES[qtype]]
    stored = {t.name: t for t in reader.tensors}
    for name, w in gguf_writer.random_tensors(cfg, seed=2):
        t = stored[gguf_writer.gguf_name(name)]
        assert t.tensor_type.name == (qtype if w.ndim == 2 else "F32"), name
        if "q_proj" in name or "k_proj" in name:
            w = gguf_writer.rope_pairs_to_neighbours(w, 4 if "q_proj" in name else 2)
        got = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        np.testing.assert_array_equal(got, roundtrip(w, t.tensor_type.name), err_msg=name)


def test_rows_that_do_not_fit_the_block_fall_back_to_f16(tmp_path):
    """As llama.cpp's converter does on a QuantError: ffn_down's rows of 80 are not Q4_0 blocks of 32."""
    cfg = tiny_config(intermediate_size=80)
    path = gguf_writer.write_random_gguf(tmp_path / "m.gguf", cfg, qtype="Q4_0", seed=1)
    reader, f = fields(path)
    stored = types(reader)
    assert stored["blk.0.ffn_down.weight"] == "F16" and stored["blk.0.ffn_up.weight"] == "Q4_0"
    assert stored["blk.0.attn_norm.weight"] == "F32" and f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
    assert gguf_writer.stored_type("Q4_0", (64, 80)) == "F16" and gguf_writer.stored_type("Q8_0", (64,)) == "F32"


def test_random_weights_are_seeded_normal_with_unit_norms(tmp_path):
    cfg = tiny_config(vocab_size=4096)
    a = gguf_writer.write_random_gguf(tmp_path / "a.gguf", cfg, qtype="F32", seed=7)
    b = gguf_writer.write_random_gguf(tmp_path / "b.gguf", cfg, qtype="F32", seed=7)
    c = gguf_writer.write_random_gguf(tmp_path / "c.gguf", cfg, qtype="F32", seed=8)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()
    tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(a)).tensors}
    assert tensors["token_embd.weight"].std() == pytest.approx(0.02, rel=0.02)
    assert abs(tensors["token_embd.weight"].mean()) < 1e-3
    assert np.all(tensors["output_norm.weight"] == 1.0) and np.all(tensors["blk.1.ffn_norm.weight"] == 1.0)


def test_the_writer_refuses_what_llama_cpp_would_not_read(tmp_path):
    cfg = tiny_config()
    pairs = dict(gguf_writer.random_tensors(cfg))
    out = tmp_path / "m.gguf"
    incomplete = [(k, v) for k, v in pairs.items() if k != "model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="no data given for .*layers.1.mlp.up_proj"):
        gguf_writer.write_llama_gguf(out, cfg, incomplete)
    wrong = {**pairs, "model.norm.weight": np.ones(65, np.float32)}
    with pytest.raises(ValueError, match="model.norm.weight: shape"):
        gguf_writer.write_llama_gguf(out, cfg, wrong.items())
    with pytest.raises(ValueError, match="is not part of a Llama"):
        gguf_writer.write_llama_gguf(out, cfg, [*pairs.items(), ("model.extra.weight", np.ones(3))])
    with pytest.raises(ValueError, match="Q4_K.*cannot be written"):
        gguf_writer.write_llama_gguf(out, cfg, pairs.items(), qtype="Q4_K")
    assert list(tmp_path.iterdir()) == []  # neither a file nor a .partial left behind


# --- Damaged files ---------------------------------------------------------------------------------


def header_and_size(path):
    """transformers' own table parser (it reads no tensor data), and the file's size."""
    from transformers.integrations.gguf.reader import GgufHeader

    return GgufHeader.from_file(str(path)), path.stat().st_size


def test_truncated_file_ends_inside_its_last_tensor(gguf_file, damaged_gguf):
    path = damaged_gguf("truncated")
    header, size = header_and_size(path)
    last = max(header.tensors, key=lambda t: t.offset)
    assert header.data_start + last.offset < size < header.data_start + last.offset + last.nbytes
    assert path.read_bytes() == gguf_file("gpt2-f32").path.read_bytes()[:size]
    with pytest.raises(ValueError, match="cannot reshape"):
        gguf.GGUFReader(str(path))


def test_header_claims_one_tensor_more_than_the_table_holds(gguf_file, damaged_gguf):
    path, good = damaged_gguf("extra_tensors"), gguf_file("gpt2-f32").path
    claimed = struct.unpack_from("<Q", path.read_bytes(), 8)[0]
    assert claimed == len(gguf.GGUFReader(str(good)).tensors) + 1
    assert path.read_bytes()[16:] == good.read_bytes()[16:]  # only the count differs
    # GGUFReader parses the padding and tensor data after the table as one more tensor entry; what
    # it trips on depends on those bytes (here an IndexError reading the entry's dimensions).
    with pytest.raises((IndexError, ValueError)):
        gguf.GGUFReader(str(path))


def test_tensor_range_runs_past_the_end(damaged_gguf):
    path = damaged_gguf("past_end")
    header, size = header_and_size(path)
    over = [t.name for t in header.tensors if header.data_start + t.offset + t.nbytes > size]
    assert over == ["token_embd.weight"]
    with pytest.raises(ValueError, match="cannot reshape array of size 0"):
        gguf.GGUFReader(str(path))


def test_undequantizable_tensor_reads_but_does_not_dequantize(gguf_file, damaged_gguf):
    path = damaged_gguf("undequantizable")
    reader = gguf.GGUFReader(str(path))
    (t,) = [t for t in reader.tensors if t.name == "blk.0.ffn_down.weight"]
    assert t.tensor_type.name == "Q1_0" and t.n_bytes == 64 * 128 // 128 * 18
    with pytest.raises(NotImplementedError, match="Dequantization for Q1_0"):
        gguf.quants.dequantize(t.data, t.tensor_type)
    with pytest.raises(NotImplementedError, match="Q1_0"):
        hf_from_gguf(path)
    good = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(gguf_file("gpt2-f32-ffn128").path)).tensors}
    for other in reader.tensors:
        if other.name != t.name:
            np.testing.assert_array_equal(np.asarray(other.data), good[other.name])


@pytest.mark.parametrize("damage", ["qwen2", "no_tokenizer", "no_vocab"])
def test_metadata_damage_changes_only_the_metadata(gguf_file, damaged_gguf, damage):
    path, good = damaged_gguf(damage), gguf_file("gpt2-f32").path
    reader, f = fields(path)
    _, g = fields(good)
    if damage == "qwen2":
        assert f["general.architecture"] == "qwen2" and not any(k.startswith("llama.") for k in f)
        assert f["qwen2.embedding_length"] == g["llama.embedding_length"]
        assert f["tokenizer.ggml.tokens"] == g["tokenizer.ggml.tokens"]
    else:
        assert not any(k.startswith("llama.") for k in set(g) - set(f))
        with pytest.raises(ValueError, match="Cannot build a tokenizer"):
            hf_tokenizer_from_gguf(path)
    if damage == "no_tokenizer":
        assert not any(k.startswith("tokenizer.") for k in f)
    if damage == "no_vocab":
        assert [k for k in f if k.startswith("tokenizer.")] == ["tokenizer.ggml.model"]
        assert f["tokenizer.ggml.model"] == "no_vocab"
    good_tensors = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(good)).tensors}
    assert {t.name for t in reader.tensors} == set(good_tensors)
    for t in reader.tensors:
        np.testing.assert_array_equal(np.asarray(t.data), good_tensors[t.name])
