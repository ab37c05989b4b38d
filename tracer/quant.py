"""Quantized linear layers: a GGUF file's weight blocks kept as they are, decoded on the fly.

Most GGUF files people hold are quantized: each run of 32 (or 256) weights of a row is stored as a
few small integer codes plus a float16 scale (and sometimes a minimum), 4.5 to 8.5 bits a weight
instead of 16. Dequantizing such a file to float32 at load costs four to seven times its size in
memory, and decoding one token reads every weight once, so those bytes are also the time a token
takes. :class:`QuantLinear` instead holds the file's bytes (a view, never a copy) and multiplies by
them directly: one row of activations (a decode step) goes to the CPU kernel
(``kernels/quant.c``), which decodes each block into registers and sums in float32; several rows
(a prompt) dequantize a tile of weight rows at a time and use torch's matmul. Activations stay
float32 throughout, so hooks and traces see ordinary tensors.

:data:`TYPES` declares the block formats once (the C code reports its own, and the tests hold the
two equal); :func:`dequantize` is the reference decoder, in torch, with the same float32
arithmetic as the gguf library's numpy code (llama.cpp's own Python), so that its values equal
gguf's bit for bit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .kernels import library, ops

# Weight rows dequantized at once for a prompt: a float32 tile of about this many bytes (it stays
# in the cache while torch's matmul reads it once per tile).
TILE_BYTES = 1 << 22


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


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0, 34 bytes per 32 weights: a float16 scale d, then 32 int8 codes q; w = d * q."""
    return blocks[:, 2:].contiguous().view(torch.int8).float() * _f16(blocks, 0)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_0, 18 bytes per 32 weights: a float16 scale d, 32 4-bit codes q; w = d * (q - 8)."""
    return _f16(blocks, 0) * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    """Q4_1, 20 bytes per 32 weights: float16 scale d and minimum m, 32 4-bit codes; w = d * q + m."""
    return _f16(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _f16(blocks, 2)


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
        BlockType("Q8_0", 32, 34, (0,), _q8_0),
        BlockType("Q4_0", 32, 18, (0,), _q4_0),
        BlockType("Q4_1", 32, 20, (0, 2), _q4_1),
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


# ---------------------------------------------------------------------------------------------
# The layer


class QuantLinear(nn.Module):
    """``nn.Linear`` without bias whose weight [out_features, in_features] stays in GGUF blocks.

    ``blocks`` is the weight's bytes as the file stores them (rows one after another, each
    ``in_features / block`` blocks); the layer keeps a view of them (``self.blocks``, uint8
    [out_features, bytes per row]), never a copy. One float32 row on the CPU is one kernel call
    (``use_kernel``, when the library is built and decodes ``kind``); anything else dequantizes
    tiles of weight rows and uses ``F.linear``.
    """

    def __init__(self, blocks, kind: str | BlockType, out_features: int, in_features: int) -> None:
        super().__init__()
        self.kind = block_type(kind)
        self.type_id = self.kind.type_id
        self.in_features, self.out_features = in_features, out_features
        raw = as_bytes(blocks)
        row = self.kind.row_bytes(in_features)
        if raw.numel() != out_features * row:
            raise ValueError(
                f"a {out_features} x {in_features} {self.kind.name} weight is {out_features * row} bytes, "
                f"not {raw.numel()}"
            )
        self.register_buffer("blocks", raw.view(out_features, row))
        self.use_kernel = True  # False: always the torch path (a caller comparing the two)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, W)`` with W the dequantized weight, in float32 (returned in x's dtype)."""
        if x.numel() == self.in_features and self._kernel_takes(x):
            return ops.quant_matvec(x, self.blocks, self.type_id)
        rows = x.reshape(-1, self.in_features).float()
        step = max(1, TILE_BYTES // (4 * self.in_features))
        tiles = [F.linear(rows, self.dequantized(n, n + step).to(x.device)) for n in range(0, self.out_features, step)]
        out = torch.cat(tiles, dim=-1) if len(tiles) > 1 else tiles[0]
        return out.reshape(x.shape[:-1] + (self.out_features,)).to(x.dtype)

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        """Whether the kernel computes this product: one float32 CPU row, no gradient wanted."""
        if not (self.use_kernel and x.is_cpu and self.blocks.is_cpu and x.dtype is torch.float32):
            return False
        if torch.is_grad_enabled() and x.requires_grad:
            return False
        lib = library()
        return lib.available and self.type_id in lib.quant_formats

    def dequantized(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Weight rows ``start:stop`` as float32 [rows, in_features] (the kernel's decoder where it
        can, else :func:`dequantize`; the two are equal bit for bit)."""
        part = self.blocks[start:stop]
        lib = library() if self.use_kernel and part.is_cpu else None
        if lib is not None and lib.available and self.type_id in lib.quant_formats:
            return ops.dequantize(part, self.type_id, self.in_features)
        return dequantize(part, self.kind, (part.shape[0], self.in_features))
