"""tracer/quant.py and kernels/quant.c: GGUF blocks decoded exactly as gguf-py decodes them, row
products within float32 summation error, and a layer that holds the file's bytes, not a copy."""

from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from tracer import kernels, quant
from tracer.kernels import ops
from tracer.quant import TYPES, QuantLinear

KERNEL = kernels.library()
needs_kernel = pytest.mark.skipif(not KERNEL.available, reason=f"no kernel here: {KERNEL.reason}")
# quant.c's paths this CPU runs ("auto" is one of the others), each tested on its own.
PATHS = [p for p in KERNEL.quant_paths if p != "auto"] or ["portable"]
# Rows: one, a group of four streams plus three, exactly 16 groups, 16 groups plus three.
ROWS = [1, 7, 64, 67]
# Columns: one block, and an odd number of blocks (32-weight formats: also a Llama-sized row).
COLUMNS = {32: [32, 96, 2048], 256: [256, 768]}
CASES = [(name, n, k) for name, t in TYPES.items() for n in ROWS for k in COLUMNS[t.block]]
# The row products' bound: float32 summation error, relative to the row's sum of |w| |x|.
RELATIVE = 1e-5


def _put_f16(raw: np.ndarray, at: int, values) -> None:
    raw[:, at : at + 2] = np.asarray(values, np.float16).reshape(-1, 1).view(np.uint8)


def _blocks(name: str, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """uint8 [rows, bytes per row]: the gguf library's own quantization of normal weights where it
    has one (Q8_0, Q4_0, Q4_1); for the K formats, which it only decodes, random codes and scale
    bytes with sane float16 super-block scales. Two blocks get awkward scales either way: a
    subnormal float16 and a negative one."""
    t, rng = TYPES[name], np.random.default_rng(seed)
    if name in ("Q8_0", "Q4_0", "Q4_1"):
        weights = rng.standard_normal((rows, columns), dtype=np.float32)
        raw = gguf.quants.quantize(weights, GGMLQuantizationType[name]).reshape(-1, t.bytes)
    else:
        raw = rng.integers(0, 256, size=(rows * columns // t.block, t.bytes), dtype=np.uint8)
        for at in t.halves:  # d (and dmin): random bytes could be inf or NaN
            _put_f16(raw, at, rng.uniform(1e-3, 1e-2, len(raw)))
    raw = np.ascontiguousarray(raw)
    awkward = [3e-6, -0.004][: len(raw)]  # a float16 subnormal (< 6.1e-5), a negative scale
    _put_f16(raw[: len(awkward)], t.halves[0], awkward)
    return raw.reshape(rows, -1)


def _reference(raw: np.ndarray, name: str) -> np.ndarray:
    return gguf.quants.dequantize(raw, GGMLQuantizationType[name]).astype(np.float32, copy=False)


def _assert_within_summation_error(got: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> None:
    """Each of got [..., N] within RELATIVE x sum |w| |x| of the float64 product of the same
    float32 weights and activations."""
    w64, x64 = w.double(), x.double()
    exact, scale = x64 @ w64.T, x64.abs() @ w64.abs().T
    worst = float(((got.double() - exact).abs() / (RELATIVE * scale + 1e-30)).max())
    assert worst <= 1, f"worst {worst:.2f} x the bound"


# --- The declaration -----------------------------------------------------------------------------


def test_formats_are_gguf_s_and_the_kernel_reports_the_same():
    """Name, block size, bytes and type id: ours are the gguf library's, and quant.c says the same."""
    for t in TYPES.values():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[t.name]] == (t.block, t.bytes)
        assert t.type_id == int(GGMLQuantizationType[t.name])
    if KERNEL.available:
        assert {(f.type_id, f.block, f.bytes) for f in KERNEL.quant_formats.values()} == {
            (t.type_id, t.block, t.bytes) for t in TYPES.values()
        }


def test_zeroing_a_block_s_float16_fields_zeroes_its_weights():
    """``halves`` names every scale and minimum: with those zero, gguf decodes zeros."""
    for t in TYPES.values():
        raw = _blocks(t.name, 3, t.block * 2, seed=9)
        for at in t.halves:
            raw.reshape(-1, t.bytes)[:, at : at + 2] = 0
        assert not _reference(raw, t.name).any(), t.name


# --- (a) Dequantizing: bit for bit gguf's ------------------------------------------------------------


@pytest.mark.parametrize("name,rows,columns", CASES)
def test_torch_dequantize_equals_gguf_bit_for_bit(name, rows, columns):
    raw = _blocks(name, rows, columns)
    ours = quant.dequantize(raw, name, (rows, columns)).numpy()
    assert ours.shape == (rows, columns)
    assert np.array_equal(ours.view(np.uint32), _reference(raw, name).view(np.uint32))


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,rows,columns", CASES)
def test_kernel_dequantize_equals_gguf_bit_for_bit(name, rows, columns, path):
    """Each of quant.c's paths: the same float32 operations in the same order as gguf-py's numpy,
    the float16 scales widened exactly (subnormal and negative ones too)."""
    raw = _blocks(name, rows, columns)
    ours = ops.dequantize(torch.from_numpy(raw), TYPES[name].type_id, columns, path).numpy()
    assert np.array_equal(ours.view(np.uint32), _reference(raw, name).view(np.uint32))


# --- (b, e) Row products ------------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name,rows,columns", CASES)
def test_row_products_are_within_float32_summation_error(name, rows, columns, path):
    """Each row's product from the blocks, against the float64 product of the dequantized weights:
    four-row groups and the leftover rows, one block and several, each path."""
    raw = _blocks(name, rows, columns, seed=rows + columns)
    x = torch.randn(columns, generator=torch.Generator().manual_seed(columns))
    got = ops.quant_matvec(x, torch.from_numpy(raw), TYPES[name].type_id, path)
    _assert_within_summation_error(got, torch.from_numpy(_reference(raw, name)), x)


@needs_kernel
@pytest.mark.parametrize("name", TYPES)
def test_every_path_agrees_with_the_portable_one(name):
    """The plain C path (what a CPU without AVX2 would run) and the intrinsics (AVX2, AVX-512 where
    the CPU has it, and "auto") give the same products up to summation order, on a matrix large
    enough to be split across threads."""
    columns = 2048
    raw = torch.from_numpy(_blocks(name, 203, columns, seed=5))
    x = torch.randn(columns, generator=torch.Generator().manual_seed(1))
    w = quant.dequantize(raw, name, (203, columns))
    scale = x.double().abs() @ w.double().abs().T
    portable = ops.quant_matvec(x, raw, TYPES[name].type_id, "portable")
    _assert_within_summation_error(portable, w, x)
    assert bool((portable != 0).all())
    for path in KERNEL.quant_paths:
        got = ops.quant_matvec(x, raw, TYPES[name].type_id, path)
        assert bool(((got.double() - portable.double()).abs() <= 2 * RELATIVE * scale).all()), path


@needs_kernel
def test_the_kernel_refuses_what_it_does_not_decode():
    raw = torch.zeros(1, 34, dtype=torch.uint8)
    with pytest.raises(ValueError, match="ggml type id 1 "):  # F16: not a block format here
        ops.quant_matvec(torch.zeros(32), raw, 1)
    with pytest.raises(ValueError, match="not whole blocks"):
        KERNEL.quant_matvec(TYPES["Q8_0"].type_id, raw, torch.zeros(40), torch.empty(1))
    with pytest.raises(ValueError, match="no path 'neon' on this CPU; it runs auto, portable, avx2"):
        KERNEL.quant_matvec(TYPES["Q8_0"].type_id, raw, torch.zeros(32), torch.empty(1), "neon")


@needs_kernel
def test_the_kernel_names_its_paths():
    """auto, portable and avx2 everywhere the library builds; avx512 where the CPU has AVX-512F."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to ask")
    has_avx512 = bool(re.search(r"\bavx512f\b", cpuinfo.read_text()))
    assert list(KERNEL.quant_paths) == ["auto", "portable", "avx2"] + ["avx512"] * has_avx512


# --- (c, d) The layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,rows,columns", [(n, 67, 2048 if TYPES[n].block == 32 else 768) for n in TYPES])
def test_layer_with_several_rows_equals_the_dequantized_matmul(name, rows, columns, monkeypatch):
    """A prompt: tiles of weight rows dequantized and multiplied (small tiles here, so that there
    are several and a short last one) give F.linear with the whole dequantized weight."""
    monkeypatch.setattr(quant, "TILE_BYTES", 10 * 4 * columns)  # tiles of 10 rows: 7 tiles
    raw = _blocks(name, rows, columns, seed=2)
    layer = QuantLinear(raw, name, rows, columns)
    x = torch.randn(2, 5, columns, generator=torch.Generator().manual_seed(0))
    w = torch.from_numpy(_reference(raw, name))
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (2, 5, rows) and got.dtype == torch.float32
    rows_x = x.reshape(10, columns)
    _assert_within_summation_error(got.reshape(10, rows), w, rows_x)
    whole = torch.nn.functional.linear(rows_x, w)  # the same float32 product, in one matmul
    scale = rows_x.double().abs() @ w.double().abs().T
    assert bool(((got.reshape(10, rows) - whole).double().abs() <= 2 * RELATIVE * scale).all())


@pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch"])
@pytest.mark.parametrize("name", TYPES)
def test_layer_with_one_row_is_the_product(name, use_kernel):
    """A decode step: one row, on the kernel (where it is built) or dequantize-then-matmul."""
    columns = 512
    raw = _blocks(name, 7, columns, seed=3)
    layer = QuantLinear(torch.from_numpy(raw), name, 7, columns)
    layer.use_kernel = use_kernel
    x = torch.randn(1, 1, columns, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        got = layer(x)
    assert got.shape == (1, 1, 7)
    _assert_within_summation_error(got.reshape(1, 7), torch.from_numpy(_reference(raw, name)), x.reshape(1, -1))


def test_layer_holds_a_view_of_the_bytes_it_is_given(tmp_path):
    """No copy of the weight: the layer's blocks are the given tensor's, array's or mapped file's
    memory (a read-only map too)."""
    raw = _blocks("Q4_K", 7, 512)
    as_tensor = torch.from_numpy(raw)
    assert QuantLinear(as_tensor, "Q4_K", 7, 512).blocks.data_ptr() == as_tensor.data_ptr()
    assert QuantLinear(raw, "Q4_K", 7, 512).blocks.data_ptr() == raw.ctypes.data
    path = tmp_path / "weight.bin"
    raw.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    layer = QuantLinear(mapped, "Q4_K", 7, 512)
    assert layer.blocks.data_ptr() == mapped.ctypes.data
    assert torch.equal(layer.dequantized(), torch.from_numpy(_reference(raw, "Q4_K")))


def test_layer_refuses_bytes_of_the_wrong_size_or_shape():
    raw = _blocks("Q8_0", 7, 64)
    with pytest.raises(ValueError, match="is 476 bytes, not 442"):
        QuantLinear(raw.reshape(-1)[:442], "Q8_0", 7, 64)
    with pytest.raises(ValueError, match="whole blocks of 32 weights, not 48"):
        QuantLinear(raw, "Q8_0", 7, 48)
    with pytest.raises(ValueError, match="contiguous"):
        QuantLinear(torch.from_numpy(raw)[:, ::2], "Q8_0", 7, 32)
    with pytest.raises(ValueError, match="no quantized layer for ggml type 'Q5_K'"):
        QuantLinear(raw, "Q5_K", 7, 64)
    with pytest.raises(ValueError, match=r"\(8, 64\) Q8_0 weights are 544 bytes, not 476"):
        quant.dequantize(raw, "Q8_0", (8, 64))
