"""Quantized linear layers: a GGUF file's weight blocks kept as they are, decoded on the fly.

Most GGUF files people hold are quantized: each run of 32 (or 256) weights of a row is stored as a
few small integer codes plus a float16 scale (and sometimes a minimum), 4.5 to 8.5 bits a weight
instead of 16. Dequantizing such a file to float32 at load costs four to seven times its size in
memory, and decoding one token reads every weight once, so those bytes are also the time a token
takes. :class:`QuantLinear` instead holds the file's bytes (a view, never a copy) and multiplies by
them directly: one row of activations (a decode step) goes to the CPU kernel
(``kernels/quant.c``), which decodes each block into registers and sums in float32; a short prompt
goes to it row by row, a longer one dequantizes a tile of weight rows at a time and uses torch's
matmul. Activations stay
float32 throughout, so hooks and traces see ordinary tensors.

The block formats (:data:`TYPES`) and the reference decoder (:func:`dequantize`) are declared once,
in ``tracer.gguf_blocks``, which the GGUF reader shares; the C code reports its own formats, and
the tests hold the two equal.

:class:`KeepQuantized` puts these layers into a model as it loads (``tracer.load(path,
quantized=True)``): each linear layer whose GGUF tensor is one of :data:`TYPES` becomes a
QuantLinear over the memory-mapped file's bytes, and the load trace says which path each layer took.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import dtypes
from .gguf_blocks import TYPES, BlockType, as_bytes, block_type, dequantize
from .kernels import library, ops
from .model import Stacked

__all__ = ["AUTO", "TYPES", "BlockType", "EachLayer", "KeepQuantized", "QuantEmbedding", "QuantLinear", "as_bytes", "block_type", "dequantize"]

# tracer.load(quantized=...)'s default, the word device= and dtype= use for "the runtime's rule":
# keep the blocks where the kernels can use them (a CPU float32 load of a GGUF with layers of
# TYPES), dequantize elsewhere (tracer.api.keeps_blocks).
AUTO = dtypes.AUTO

# A prompt of up to this many rows runs row by row on the kernel: on Llama-3.2-1B shapes (Q8_0, this
# Sapphire Rapids VM) a 4-token prefill took 0.30 s this way, 0.71 s through tiles; at 16 tokens the two
# were even, at 64 the tiles won (2.2 s against 2.6 s).
KERNEL_ROWS = 8

# Weight rows dequantized at once for a prompt: a float32 tile of about this many bytes (it stays
# in the cache while torch's matmul reads it once per tile).
TILE_BYTES = 1 << 22


# ---------------------------------------------------------------------------------------------
# The layer


def kernel_decodes(type_id: int) -> bool:
    """Whether the CPU kernels are built here and compute products from blocks of ``type_id``."""
    lib = library()
    return lib.available and type_id in lib.quant_formats


def rows_of(blocks, kind: BlockType, rows: int, columns: int, what: str) -> torch.Tensor:
    """``blocks`` as uint8 [rows, bytes per row] (a view, never a copy), checked to be exactly a
    ``rows`` x ``columns`` matrix of ``kind``."""
    raw, row = as_bytes(blocks), kind.row_bytes(columns)
    if raw.numel() != rows * row:
        raise ValueError(f"a {rows} x {columns} {kind.name} {what} is {rows * row} bytes, not {raw.numel()}")
    return raw.view(rows, row)


class QuantLinear(nn.Module):
    """``nn.Linear`` without bias whose weight [out_features, in_features] stays in GGUF blocks.

    ``blocks`` is the weight's bytes as the file stores them (rows one after another, each
    ``in_features / block`` blocks); the layer keeps a view of them (``self.blocks``, uint8
    [out_features, bytes per row]), never a copy. One float32 row on the CPU is one kernel call
    (``use_kernel``, when the library is built and decodes ``kind``); anything else dequantizes
    tiles of weight rows and uses ``F.linear``.

    ``order`` (int64 [out_features]) says output feature i is the product of stored row
    ``order[i]``: llama.cpp stores q/k rows in its own rotary order, and since the blocks stay as
    stored, the layer reorders its output (one gather of a few hundred values) instead of the weight.
    ``dequantized`` gives the rows as stored.
    """

    def __init__(self, blocks, kind: str | BlockType, out_features: int, in_features: int, *,
                 order: torch.Tensor | None = None, use_kernel: bool = True) -> None:
        super().__init__()
        self.kind = block_type(kind)
        self.type_id = self.kind.type_id
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("blocks", rows_of(blocks, self.kind, out_features, in_features, "weight"))
        if order is not None and tuple(order.shape) != (out_features,):
            raise ValueError(f"order has shape {tuple(order.shape)}, not ({out_features},)")
        self.register_buffer("order", None if order is None else order.to(torch.int64))
        # Whether one float32 CPU row goes to the kernel: asked for, and the library is built and
        # decodes this type. Decided here, once: a compiled step must not trace the library's loading.
        # False: always the torch path (matvec='torch', or a caller comparing the two).
        self.use_kernel = use_kernel and kernel_decodes(self.type_id)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, W)`` with W the dequantized weight, in float32 (returned in x's dtype)."""
        if x.numel() == self.in_features and self._kernel_takes(x):
            if torch.compiler.is_compiling():  # the compiled decode step: an operator opaque to the compiler
                return self._ordered(torch.ops.llama_tracer.quant_matvec(x, self.blocks, self.type_id))
            return self._ordered(ops.quant_matvec(x, self.blocks, self.type_id))
        rows = x.reshape(-1, self.in_features)
        if rows.shape[0] <= KERNEL_ROWS and self._kernel_takes(x) and not torch.compiler.is_compiling():
            out = torch.stack([ops.quant_matvec(row, self.blocks, self.type_id) for row in rows.contiguous()])
            return self._ordered(out.view(x.shape[:-1] + (self.out_features,)))
        rows = rows.float()
        step = max(1, TILE_BYTES // (4 * self.in_features))
        tiles = [F.linear(rows, self.dequantized(n, n + step).to(x.device)) for n in range(0, self.out_features, step)]
        out = torch.cat(tiles, dim=-1) if len(tiles) > 1 else tiles[0]
        return self._ordered(out.reshape(x.shape[:-1] + (self.out_features,)).to(x.dtype))

    def _ordered(self, out: torch.Tensor) -> torch.Tensor:
        """The output features in the model's order (stored row ``order[i]`` is feature i)."""
        return out if self.order is None else out.index_select(-1, self.order)

    def _kernel_takes(self, x: torch.Tensor) -> bool:
        """Whether the kernel computes this product: one float32 CPU row, no gradient wanted."""
        if not (self.use_kernel and x.is_cpu and self.blocks.is_cpu and x.dtype is torch.float32):
            return False
        return not (torch.is_grad_enabled() and x.requires_grad)

    @property
    def weight(self) -> torch.Tensor:
        """The float32 [out_features, in_features] weight the blocks stand for, in the model's row
        order: computed on each access (the layer keeps only the blocks), for inspecting a layer or
        saving the model, never for its products."""
        w = self.dequantized()
        return w if self.order is None else w.index_select(0, self.order)

    def dequantized(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Weight rows ``start:stop`` as float32 [rows, in_features] (the kernel's decoder where it
        can, else :func:`dequantize`; the two are equal bit for bit)."""
        part = self.blocks[start:stop]
        lib = library() if self.use_kernel and part.is_cpu else None
        if lib is not None and lib.available and self.type_id in lib.quant_formats:
            return ops.dequantize(part, self.type_id, self.in_features)
        return dequantize(part, self.kind, (part.shape[0], self.in_features))


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` whose [num_embeddings, embedding_dim] table stays in GGUF blocks: a lookup
    dequantizes only the rows it takes (one row a decode step). A dequantized table would cost
    four bytes a weight (Llama-2-7B's: 524 MB against 74 MB of Q4_K blocks), and a tied lm_head
    multiplies by the same blocks (:class:`QuantLinear` over this layer's ``blocks``)."""

    def __init__(self, blocks, kind: str | BlockType, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.kind = block_type(kind)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("blocks", rows_of(blocks, self.kind, num_embeddings, embedding_dim, "table"))
        self.on_kernel = kernel_decodes(self.kind.type_id)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kind={self.kind.name}"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The float32 rows of ``ids`` [...]: [..., embedding_dim]."""
        return self.rows(ids.reshape(-1)).view(*ids.shape, self.embedding_dim)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (1-D) of the table, dequantized: float32 [len(ids), embedding_dim]."""
        part = self.blocks.index_select(0, ids.to(self.blocks.device))  # a few rows' bytes
        if self.on_kernel and part.is_cpu:
            return ops.dequantize(part, self.kind.type_id, self.embedding_dim)
        return dequantize(part, self.kind, (part.shape[0], self.embedding_dim))

    @property
    def weight(self) -> torch.Tensor:
        """The whole table as float32 (computed on each access: for inspecting, not for lookups)."""
        return self.rows(torch.arange(self.num_embeddings))


# ---------------------------------------------------------------------------------------------
# Into a model, as it loads


class EachLayer(Stacked):
    """:class:`~tracer.model.Stacked`'s product (q/k/v, gate/up side by side) with each layer
    computing its own part: a :class:`QuantLinear` has blocks, not a ``weight`` to stack."""

    def forward(self, x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
        return torch.cat([m(x) for m in layers], dim=-1)


class KeepQuantized:
    """A quantized load's choice, made tensor by tensor as the loader meets them
    (``tracer.checkpoint.load_weights(keep=...)``; ``tracer.load(path, quantized=True)``).

    A linear layer without bias whose tensor is stored in one of :data:`TYPES` becomes a
    :class:`QuantLinear` over the file's bytes (the loader's view of the mapped file), its output
    reordered where the file stores its rows permuted, and an embedding so stored becomes a
    :class:`QuantEmbedding` (its lookups dequantize the rows they take), with a tied lm_head a
    QuantLinear over the same blocks; every other tensor loads as it would anyway (dequantized to
    the runtime dtype). :attr:`paths` says, for each linear layer and the embedding, which path it
    took ("quantized:Q4_1", "dequantized:F16", "tied:embed"): the load trace's meta ``"quantized"``.
    """

    def __init__(self, model: nn.Module, *, kernel: bool = True) -> None:
        self.model = model
        self.kernel = kernel  # QuantLinear.use_kernel: False where the load asked for torch's products
        self.modules = dict(model.named_modules())
        self.paths: dict[str, str] = {}
        if getattr(model.config, "tie_word_embeddings", False):
            self.paths["lm_head"] = "tied:embed"

    def __call__(self, param: str, stored) -> bool:
        """Whether ``param``'s tensor, ``stored`` (a ``tracer.gguf_file.StoredBlocks``, or None
        where the file has no blocks to keep), now stands in the model as its blocks."""
        layer, _, leaf = param.rpartition(".")
        module = self.modules.get(layer)
        if leaf != "weight" or not isinstance(module, (nn.Linear, nn.Embedding)):
            return False  # norms and biases: float vectors, loaded as they are
        kind = stored.type_name if stored is not None else "unmapped"
        if stored is None or kind not in TYPES or getattr(module, "bias", None) is not None:
            self.paths[layer] = f"dequantized:{kind}"
            return False
        rows, columns = stored.shape
        if isinstance(module, nn.Embedding):
            table = QuantEmbedding(stored.blocks, kind, rows, columns)
            self._put(layer, table)
            if self.model.lm_head.weight is module.weight:  # tied: the output product reads the same blocks
                self._put("lm_head", QuantLinear(table.blocks, kind, rows, columns, use_kernel=self.kernel))
        else:
            self._put(layer, QuantLinear(stored.blocks, kind, rows, columns, order=stored.row_order,
                                         use_kernel=self.kernel))
        self.paths[layer] = f"quantized:{kind}"
        return True

    def _put(self, name: str, module: nn.Module) -> None:
        """``module`` in place of the model's module ``name`` (its float weight, never filled, is
        freed); the first time, every stacked product becomes :class:`EachLayer`."""
        if not any(isinstance(m, QuantLinear) for m in self.modules.values()):
            for other, m in list(self.modules.items()):
                if isinstance(m, Stacked) and not isinstance(m, EachLayer):
                    self._set(other, EachLayer())
        self._set(name, module)

    def _set(self, name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(self.modules[parent] if parent else self.model, leaf, module)
        self.modules[name] = module
