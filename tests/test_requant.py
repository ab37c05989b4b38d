"""tracer/requant.py: llama.cpp's type per tensor and a file's bytes from a config, 32-weight blocks
taken apart through gguf_blocks' declared layout, and a float model rounded to a block format."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGMLQuantizationType
from torch import nn

import tracer
from tracer import requant
from tracer.config import LlamaConfig
from tracer.gguf_blocks import TYPES, ScaledCodes, dequantize
from tracer.gguf_file import GGUFFile, hub_name
from tracer.model import Stacked
from tracer.quant import EachLayer, QuantLinear
from tracer.requant import QUANTIZABLE, QuantizeError

# Llama-2-7B's sizes (config.json): every dimension whole Q4_K super-blocks, 32 layers.
LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
# The same shape, small: only the type rule and the byte counts are asked of it.
SMALL_32_LAYERS = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=32,
                              num_attention_heads=4, num_key_value_heads=4)


def _blocks(kind: str, rows: int = 5, columns: int = 96, seed: int = 0) -> np.ndarray:
    """uint8 [rows, bytes per row]: normal weights (some blocks shifted off 0, one all zero) as
    the gguf library quantizes them."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, columns), dtype=np.float32)
    if rows >= 3:
        w[1] += 3.0  # a row whose blocks sit far from 0: Q4_0's symmetric grid, Q4_1's minimum
        w[2, :32] = 0.0  # a block of zeros: d = 0
    return np.ascontiguousarray(gguf.quants.quantize(w, GGMLQuantizationType[kind]))


# ---------------------------------------------------------------------------------------------
# The declared layout


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_the_32_weight_formats_are_declared_once_as_scaled_codes(kind):
    t = TYPES[kind]
    layout = t.decode
    assert isinstance(layout, ScaledCodes)
    assert t.halves == layout.halves  # BlockType's float16 fields are the layout's
    assert layout.codes_at + t.block * layout.bits // 8 == t.bytes  # fields then codes fill the block


def test_quantizable_are_the_formats_gguf_can_write():
    assert QUANTIZABLE == ("Q8_0", "Q4_0", "Q4_1")
    for kind in TYPES:
        if kind not in QUANTIZABLE:  # the K formats: decoded, never written by the gguf library
            with pytest.raises(NotImplementedError):
                gguf.quants.quantize(np.zeros((1, 256), np.float32), GGMLQuantizationType[kind])


# ---------------------------------------------------------------------------------------------
# take_apart


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_take_apart_values_equal_the_reference_decoder(kind):
    raw = _blocks(kind)
    parts = requant.take_apart(raw, kind)
    rows, columns = raw.shape[0], 96
    assert len(parts) == rows * columns // 32
    assert torch.equal(parts.values.reshape(rows, columns), dequantize(raw, kind, (rows, columns)))


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_take_apart_fields_read_the_bytes_where_gguf_writes_them(kind):
    """Scale and minimum against the float16 numpy reads at the documented offsets; codes in range,
    and each value the level of its code."""
    t, raw = TYPES[kind], _blocks(kind)
    blocks = raw.reshape(-1, t.bytes)
    parts = requant.take_apart(raw, kind)
    assert np.array_equal(parts.scales.numpy(), blocks[:, 0:2].copy().view(np.float16).astype(np.float32)[:, 0])
    if kind == "Q4_1":
        assert np.array_equal(parts.minimums.numpy(), blocks[:, 2:4].copy().view(np.float16).astype(np.float32)[:, 0])
    else:
        assert parts.minimums is None
    lo, hi = parts.code_range
    assert (lo, hi) == ((-128, 127) if kind == "Q8_0" else (0, 15))
    assert parts.codes.min() >= lo and parts.codes.max() <= hi
    assert torch.equal(parts.values, parts.levels.gather(1, parts.codes - lo))
    assert parts.levels.shape[1] == hi - lo + 1


def test_take_apart_q4_codes_are_nibbles_low_then_high():
    """Byte i of a Q4 block's codes holds weight i (low four bits) and weight i + 16 (high)."""
    raw = _blocks("Q4_1", rows=1, columns=32)[0]
    parts = requant.take_apart(raw, "Q4_1")
    codes = raw[4:]
    assert parts.codes[0, :16].tolist() == [b & 15 for b in codes]
    assert parts.codes[0, 16:].tolist() == [b >> 4 for b in codes]
    assert parts.zero == 0 and requant.take_apart(_blocks("Q4_0", 1, 32), "Q4_0").zero == 8


def test_block_picks_one_block():
    parts = requant.take_apart(_blocks("Q8_0"), "Q8_0")
    one = parts.block(3)
    assert len(one) == 1 and torch.equal(one.values[0], parts.values[3]) and torch.equal(one.codes[0], parts.codes[3])
    assert torch.equal(parts.block(-1).values[0], parts.values[-1])


def test_take_apart_refuses_broken_blocks():
    with pytest.raises(ValueError, match="not whole Q4_1 blocks of 20 bytes"):
        requant.take_apart(bytes(30), "Q4_1")


@pytest.mark.parametrize("call", [
    lambda: requant.take_apart(bytes(144), "Q4_K"),
    lambda: requant.quantize(torch.zeros(1, 256), "Q4_K"),
    lambda: requant.requantize(nn.Linear(2, 2), "Q4_K"),
    lambda: requant.requantize(nn.Linear(2, 2), "Q5_0"),
])
def test_unsupported_formats_are_refused_in_one_line(call):
    with pytest.raises(QuantizeError) as e:
        call()
    message = str(e.value)
    assert "\n" not in message
    assert ("'Q4_K'" in message or "'Q5_0'" in message) and "Q8_0, Q4_0, Q4_1" in message


# ---------------------------------------------------------------------------------------------
# quantize


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_quantize_is_the_gguf_librarys_rounding(kind):
    w = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    raw = requant.quantize(w, kind)
    assert raw.dtype == torch.uint8 and tuple(raw.shape) == (3, TYPES[kind].row_bytes(64))
    assert np.array_equal(raw.numpy(), gguf.quants.quantize(w.numpy(), GGMLQuantizationType[kind]))
    with pytest.raises(ValueError, match="whole blocks of 32"):
        requant.quantize(torch.zeros(1, 40), kind)


# ---------------------------------------------------------------------------------------------
# What a file weighs


def test_gguf_shapes_count_every_parameter_under_llama_cpp_names():
    for cfg in (LLAMA2_7B, SMALL_32_LAYERS):
        shapes = requant.gguf_shapes(cfg)
        assert sum(math.prod(s) for s in shapes.values()) == cfg.num_parameters
        assert all(hub_name(name) is not None for name in shapes)


def test_uniform_file_types_weigh_their_block_sizes():
    """Q8_0 and F16 files: every matrix in the type (the output too), every norm F32."""
    cfg = LLAMA2_7B
    norms = (2 * cfg.num_hidden_layers + 1) * cfg.hidden_size
    matrices = cfg.num_parameters - norms
    assert requant.file_bytes(cfg, "F16") == matrices * 2 + norms * 4
    assert requant.file_bytes(cfg, "Q8_0") == matrices // 32 * 34 + norms * 4
    assert requant.bits_per_weight("Q4_1") == 5.0 and requant.bits_per_weight("Q6_K") == 6.5625


def test_q4_k_m_gives_q6_k_to_the_layers_use_more_bits_picks():
    """llama.cpp's use_more_bits for 32 layers, by hand: the first and last eighth (0-3, 28-31) and
    every third layer from the first eighth on (6, 9, ..., 27)."""
    types = requant.tensor_types(SMALL_32_LAYERS, "Q4_K_M")
    more = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}
    for i in range(32):
        expected = "Q6_K" if i in more else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == expected
        assert types[f"blk.{i}.ffn_down.weight"] == expected
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["output_norm.weight"] == "F32"


def test_rows_that_are_not_whole_super_blocks_fall_back():
    """SmolLM2's 576-wide rows are not whole 256-weight super-blocks: Q4_K -> Q5_0, Q6_K -> Q8_0."""
    cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=1536, num_hidden_layers=8,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    types = requant.tensor_types(cfg, "Q4_K_M")
    assert types["token_embd.weight"] == "Q8_0"  # tied: the output's Q6_K, fallen back
    assert types["blk.1.attn_q.weight"] == "Q5_0"  # rows of 576
    assert types["blk.1.ffn_down.weight"] == "Q4_K"  # rows of 1536 = 6 super-blocks
    assert types["blk.0.ffn_down.weight"] == "Q6_K"


def test_unknown_file_type_is_refused():
    with pytest.raises(QuantizeError, match="no type rule for file type 'Q2_K'; these are: F16, Q8_0"):
        requant.tensor_types(LLAMA2_7B, "Q2_K")


# ---------------------------------------------------------------------------------------------
# logit_gap


def test_logit_gap_measures_by_hand():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    other = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]])) + 3.0  # a constant shift changes no probability
    gap = requant.logit_gap(ref, other)
    # KL(p || q) of the first row: 0.5 ln(0.5 / 0.25) + 0.5 ln(0.5 / 0.75); the second row 0
    assert gap.kl == pytest.approx((0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2, rel=1e-5)
    assert gap.same_top1 == 0.5  # row 0's argmax moved from token 0 (a tie, first wins) to token 1
    assert gap.max_abs == pytest.approx(float((other - ref).abs().max()))
    same = requant.logit_gap(ref, ref)
    assert (same.max_abs, same.kl, same.same_top1) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="do not compare"):
        requant.logit_gap(ref, ref[:1])


# ---------------------------------------------------------------------------------------------
# requantize


@pytest.fixture(scope="module")
def embedded():
    """The embedded model: float weights trained here, an untied lm_head, dimensions of whole blocks."""
    return tracer.load(progress=False)


def _snapshot(model: nn.Module) -> tuple[dict, dict]:
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return tensors, {name: type(m) for name, m in model.named_modules()}


def _dequantized_copy(model: nn.Module, kind: str) -> nn.Module:
    """The reference, built without requant: each linear weight replaced by the gguf library's
    own round trip of it (quantize, then dequantize)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.Linear):
                q = gguf.quants.quantize(m.weight.float().numpy(), GGMLQuantizationType[kind])
                m.weight.copy_(torch.from_numpy(gguf.quants.dequantize(q, GGMLQuantizationType[kind])))
    return ref


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_requantize_rounds_every_linear_layer_and_leaves_the_original(embedded, kind):
    before, types = _snapshot(embedded.model)
    meta = dict(embedded.load_trace.meta)
    small = requant.requantize(embedded, kind)
    after, types_after = _snapshot(embedded.model)
    assert types_after == types and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert embedded.load_trace.meta == meta

    linear = [n for n, t in types.items() if issubclass(t, nn.Linear)]
    modules = dict(small.model.named_modules())
    assert linear and all(isinstance(modules[n], QuantLinear) and modules[n].kind.name == kind for n in linear)
    assert "lm_head" in linear  # untied: rounded like the rest
    assert all(isinstance(modules[n], EachLayer) for n, t in types.items() if issubclass(t, Stacked))
    assert small.model.embed.weight is embedded.model.embed.weight  # shared, not copied
    assert small.tokenizer is embedded.tokenizer
    assert small.load_trace.meta["requantized"] == kind
    assert small.load_trace.meta["quantized"] == {n: f"quantized:{kind}" for n in linear}
    assert requant.weight_bytes(small.model.blocks) == sum(
        TYPES[kind].row_bytes(m.in_features) * m.out_features for m in embedded.model.blocks.modules()
        if isinstance(m, nn.Linear))


# The requantized model against the float model with gguf's round trip of the same weights: the same
# float32 weights, so only the summation order differs (tiles of rows vs one product). float32's
# worst case for a sum of n products is n * 2^-24 of their sum of magnitudes (n <= 704 here: 4e-5);
# 1e-4 of the largest logit covers that, and leaves the test sharp: rounding itself moves the
# logits by far more (asserted below, so a wrong weight or row order could not pass).
SAME_WEIGHTS = 1e-4


@pytest.mark.parametrize("kind", QUANTIZABLE)
def test_requantized_logits_are_the_rounded_weights_logits(embedded, kind):
    ids = embedded.tokenizer.encode("It was a bright cold day in April, and the clocks were")
    small = requant.requantize(embedded, kind)
    ref = _dequantized_copy(embedded.model, kind)
    with torch.inference_mode():
        want = ref(torch.tensor([ids]))[0]
    got = small.logits(ids)
    scale = float(want.abs().max())
    assert float((got - want).abs().max()) <= SAME_WEIGHTS * scale
    moved = float((embedded.logits(ids) - want).abs().max())
    assert moved > 10 * SAME_WEIGHTS * scale  # the rounding is visible at this tolerance


def test_fewer_bits_move_the_logits_more(embedded):
    ids = embedded.tokenizer.encode("It was a bright cold day in April, and the clocks were")
    ref = embedded.logits(ids)
    kl = {k: requant.logit_gap(ref, requant.requantize(embedded, k).logits(ids)).kl for k in QUANTIZABLE}
    assert kl["Q8_0"] < kl["Q4_1"] and kl["Q8_0"] < kl["Q4_0"]


def test_requantize_takes_a_bare_model(embedded):
    model = requant.requantize(embedded.model, "Q8_0")
    assert isinstance(model.blocks[0].attn.wq, QuantLinear) and not isinstance(embedded.model.blocks[0].attn.wq, QuantLinear)


@pytest.fixture(scope="module")
def smollm2():
    return tracer.load("smollm2", quantized=False, progress=False), tracer.load("smollm2", quantized=True, progress=False)


def test_the_type_rule_predicts_the_real_file(smollm2):
    """SmolLM2's "Q4_1" file: every tensor's type, and the bytes of its tensor data."""
    llm, _ = smollm2
    resolve = llm.load_trace.of("resolve")[0]
    g = GGUFFile.open(Path(resolve.folder) / resolve.weight_files[0])
    assert requant.tensor_types(llm.config, "Q4_1") == {n: t.type_name for n, t in g.tensors.items()}
    assert requant.file_bytes(llm.config, "Q4_1") == sum(t.nbytes for t in g.tensors.values())


def test_requantize_keeps_a_tied_lm_head_and_rereads_quantized_layers_in_model_order(smollm2):
    """Tied: lm_head stays the embedding's. A quantized load's layers (q/k rows stored permuted)
    rounded to their own format again give the same weights, row for row: Q4_1 values are already
    on Q4_1's grid, and the rows are read in the model's order."""
    llm, llm_q4 = smollm2
    q8 = requant.requantize(llm, "Q8_0")
    assert q8.model.lm_head.weight is llm.model.embed.weight
    assert q8.load_trace.meta["quantized"]["lm_head"] == "tied:embed"
    again = requant.requantize(llm_q4, "Q4_1")
    for name in ("blocks.0.attn.wq", "blocks.0.attn.wk", "blocks.29.mlp.w_down"):
        original, rounded = llm_q4.model.get_submodule(name), again.model.get_submodule(name)
        assert original.order is not None or name.endswith("w_down")
        assert rounded.order is None
        assert torch.equal(rounded.weight, original.weight)
