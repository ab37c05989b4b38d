"""GGUF's quantized block formats, declared once and decoded in torch (the bottom of two wings).

A quantized GGUF tensor stores each run of 32 (or 256) weights of a row as a few small integer
codes plus a float16 scale (and sometimes a minimum). :data:`TYPES` declares the formats the
runtime decodes itself (those of a Q4_K_M file and of the real SmolLM2 file); :func:`dequantize`
is the reference decoder, in torch, with the same float32 arithmetic as the gguf library's numpy
code (llama.cpp's own Python), so that its values equal gguf's bit for bit.

Three modules use it: ``tracer.gguf_file`` dequantizes a tensor at load with it,
``tracer.quant`` keeps a tensor's blocks as they are and multiplies by them (``kernels/quant.c``
reports the same formats; the tests hold the two declarations equal), and ``tracer.requant``
takes a 32-weight block apart through its declared layout (:class:`ScaledCodes`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------
# The block formats: each decoder takes [n, bytes] uint8 blocks and returns [n, block] float32,
# in gguf-py's float32 operations and order (gguf/quants.py).


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 stored at byte ``at`` of each block, as float32 [n, 1]."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes of 4-bit codes -> twice as many codes: byte i holds code i (low nibble) and code
    i + len (high nibble) of its run."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


@dataclass(frozen=True)
class ScaledCodes:
    """The layout of a 32-weight block (Q8_0, Q4_0, Q4_1), and its decoder: a float16 scale d at
    byte 0, a float16 minimum m at byte 2 where the format has one, then one integer code q per
    weight; w = d * (q - zero) + m.

    Declared once here: the decoder below reads the block through these fields, and
    ``tracer.requant`` takes a block apart through them (notebook 07).
    """

    bits: int  # 8: one byte per code; 4: two codes per byte (see _nibbles for their order)
    signed: bool = False  # codes stored as int8 (Q8_0) rather than unsigned
    zero: int = 0  # the code that stands for 0: Q4_0 stores q + 8 in four unsigned bits
    minimum: bool = False  # a float16 minimum after the scale: w = d * q + m (Q4_1)

    @property
    def halves(self) -> tuple[int, ...]:
        """Byte offsets of the float16 fields: the scale, then the minimum where there is one."""
        return (0, 2) if self.minimum else (0,)

    @property
    def codes_at(self) -> int:
        """Byte offset of the first code: right after the float16 fields."""
        return 2 * len(self.halves)

    @property
    def code_range(self) -> tuple[int, int]:
        """The smallest and largest code the bits can hold."""
        return (-(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1) if self.signed else (0, (1 << self.bits) - 1)

    def d(self, blocks: torch.Tensor) -> torch.Tensor:
        """[n, bytes] uint8 blocks -> their scales, float32 [n, 1]."""
        return _f16(blocks, self.halves[0])

    def m(self, blocks: torch.Tensor) -> torch.Tensor:
        """[n, bytes] uint8 blocks -> their minimums, float32 [n, 1] (a format that has them)."""
        if not self.minimum:
            raise ValueError("this block format has no minimum")
        return _f16(blocks, self.halves[1])

    def codes(self, blocks: torch.Tensor) -> torch.Tensor:
        """[n, bytes] uint8 blocks -> their codes [n, 32] in weight order (int8 or uint8)."""
        raw = blocks[:, self.codes_at :]
        if self.bits == 4:
            return _nibbles(raw)
        return raw.contiguous().view(torch.int8) if self.signed else raw

    def __call__(self, blocks: torch.Tensor) -> torch.Tensor:
        """The decoder: [n, bytes] uint8 -> [n, 32] float32, in gguf-py's operations and order."""
        q = self.codes(blocks)
        if self.zero:
            q = q.to(torch.int16) - self.zero
        w = self.d(blocks) * q.float()
        return w + self.m(blocks) if self.minimum else w


# Q8_0, 34 bytes per 32 weights: d, then 32 int8 codes; w = d * q.
_q8_0 = ScaledCodes(bits=8, signed=True)
# Q4_0, 18 bytes per 32 weights: d, then 32 4-bit codes; w = d * (q - 8).
_q4_0 = ScaledCodes(bits=4, zero=8)
# Q4_1, 20 bytes per 32 weights: d and m, then 32 4-bit codes; w = d * q + m.
_q4_1 = ScaledCodes(bits=4, minimum=True)


def _q4_K_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K packs 6-bit scales and mins for 8 sub-blocks in 12 bytes: bytes 0-3 hold scales 0-3
    and bytes 4-7 mins 0-3 in their low 6 bits; scales and mins 4-7 take their low 4 bits from
    bytes 8-11 and their top 2 bits from the top bits of bytes 0-7. [n, 8] each."""
    a, b, c = scales.reshape(-1, 3, 4).unbind(1)
    sc = torch.cat([a & 63, (c & 15) | ((a >> 2) & 0x30)], dim=1)
    mins = torch.cat([b & 63, (c >> 4) | ((b >> 2) & 0x30)], dim=1)
    return sc, mins


def _q4_K(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_K, 144 bytes per 256 weights: float16 d and dmin, 12 bytes of 6-bit scales and mins for
    8 sub-blocks of 32, 128 bytes of 4-bit codes (four runs of 64: 32 bytes, low nibbles one
    sub-block, high nibbles the next); w = d * sc[j] * q - dmin * m[j]."""
    n = blocks.shape[0]
    sc, mins = _q4_K_scales(blocks[:, 4:16])
    q = _nibbles(blocks[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    scale = (_f16(blocks, 0) * sc.float()).reshape(n, 8, 1)
    low = (_f16(blocks, 2) * mins.float()).reshape(n, 8, 1)
    return (scale * q - low).reshape(n, 256)


def _q6_K(blocks: torch.Tensor) -> torch.Tensor:
    """Q6_K, 210 bytes per 256 weights: 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8
    scales (one per 16 weights), a float16 d; w = d * sc[j] * (q - 32). In each half of 128
    weights, low-bit byte l holds weights l and l + 64, and high-bit byte l holds two bits of
    each of weights l, l + 32, l + 64 and l + 96."""
    n = blocks.shape[0]
    low = _nibbles(blocks[:, :128].reshape(n, 2, 64))  # [n, 2, 128]
    qh = blocks[:, 128:192].reshape(n, 2, 32)
    high = torch.cat([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], dim=-1)  # [n, 2, 128]
    q = ((low | (high << 4)).to(torch.int8) - 32).float().reshape(n, 16, 16)
    scale = _f16(blocks, 208) * blocks[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16]
    return (scale.reshape(n, 16, 1) * q).reshape(n, 256)


@dataclass(frozen=True)
class BlockType:
    """One GGUF block format: ``block`` consecutive weights of a row in ``bytes`` bytes."""

    name: str  # ggml's name (gguf.GGMLQuantizationType)
    block: int
    bytes: int
    halves: tuple[int, ...]  # byte offsets of the block's float16 fields (scales, minimums)
    decode: Callable[[torch.Tensor], torch.Tensor]  # [n, bytes] uint8 -> [n, block] float32

    @property
    def type_id(self) -> int:
        """ggml's type id, as the gguf library numbers it (imported when first asked: 0.3 s)."""
        from gguf.constants import GGMLQuantizationType

        return int(GGMLQuantizationType[self.name])

    def row_bytes(self, columns: int) -> int:
        """Bytes of one row of ``columns`` weights; ValueError unless they are whole blocks."""
        if columns % self.block:
            raise ValueError(f"a {self.name} row holds whole blocks of {self.block} weights, not {columns}")
        return columns // self.block * self.bytes


# The formats a Q4_K_M file (and the real SmolLM2 file) uses, decoded by kernels/quant.c.
TYPES: dict[str, BlockType] = {
    t.name: t
    for t in (
        BlockType("Q8_0", 32, 34, _q8_0.halves, _q8_0),
        BlockType("Q4_0", 32, 18, _q4_0.halves, _q4_0),
        BlockType("Q4_1", 32, 20, _q4_1.halves, _q4_1),
        BlockType("Q4_K", 256, 144, (0, 2), _q4_K),
        BlockType("Q6_K", 256, 210, (208,), _q6_K),
    )
}


def block_type(kind: str | BlockType) -> BlockType:
    """The :class:`BlockType` named ``kind`` (or ``kind`` itself)."""
    if isinstance(kind, BlockType):
        return kind
    try:
        return TYPES[kind]
    except KeyError:
        raise ValueError(f"no quantized layer for ggml type {kind!r}; these are: {', '.join(TYPES)}") from None


def as_bytes(data) -> torch.Tensor:
    """``data``'s bytes as a flat uint8 tensor sharing its memory, never a copy: a contiguous torch
    tensor, a numpy array (a memory map too), or any buffer (bytes, mmap)."""
    if isinstance(data, torch.Tensor):
        if not data.is_contiguous():
            raise ValueError("quantized blocks must be contiguous bytes (a copy would defeat mapping them)")
        return data.reshape(-1).view(torch.uint8)
    array = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if not array.flags.c_contiguous:
        raise ValueError("quantized blocks must be contiguous bytes (a copy would defeat mapping them)")
    with warnings.catch_warnings():  # a read-only map is fine: the blocks are only ever read
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(array.reshape(-1).view(np.uint8))


def dequantize(blocks, kind: str | BlockType, shape: tuple[int, ...]) -> torch.Tensor:
    """The reference decoder: raw ``blocks`` of ``kind`` as a float32 tensor of ``shape`` (rows of
    ``shape[-1]`` weights), equal bit for bit to ``gguf.quants.dequantize`` on the same bytes."""
    t, raw = block_type(kind), as_bytes(blocks)
    size = math.prod(shape[:-1]) * t.row_bytes(shape[-1])  # whole blocks, or a ValueError naming the type
    if raw.numel() != size:
        raise ValueError(f"{shape} {t.name} weights are {size} bytes, not {raw.numel()}")
    return t.decode(raw.view(-1, t.bytes)).reshape(shape)
