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

from .gguf_blocks import TYPES, BlockType, as_bytes, block_type, dequantize
from .kernels import library, ops
from .model import Stacked

__all__ = ["TYPES", "BlockType", "EachLayer", "KeepQuantized", "QuantLinear", "as_bytes", "block_type", "dequantize"]

# Weight rows dequantized at once for a prompt: a float32 tile of about this many bytes (it stays
# in the cache while torch's matmul reads it once per tile).
TILE_BYTES = 1 << 22


# ---------------------------------------------------------------------------------------------
# The layer


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
                 order: torch.Tensor | None = None) -> None:
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
        if order is not None and tuple(order.shape) != (out_features,):
            raise ValueError(f"order has shape {tuple(order.shape)}, not ({out_features},)")
        self.register_buffer("order", None if order is None else order.to(torch.int64))
        self.use_kernel = True  # False: always the torch path (a caller comparing the two)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind.name}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``F.linear(x, W)`` with W the dequantized weight, in float32 (returned in x's dtype)."""
        if x.numel() == self.in_features and self._kernel_takes(x):
            return self._ordered(ops.quant_matvec(x, self.blocks, self.type_id))
        rows = x.reshape(-1, self.in_features).float()
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
    reordered where the file stores its rows permuted; every other tensor loads as it would anyway
    (dequantized to the runtime dtype). The embedding is a lookup of whole rows, not a product, so
    it is always dequantized, and a tied lm_head is that dequantized matrix. :attr:`paths` says,
    for each linear layer and the embedding, which path it took ("quantized:Q4_1",
    "dequantized:Q8_0", "tied:embed"): the load trace's meta ``"quantized"``.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
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
        if stored is None or kind not in TYPES or not isinstance(module, nn.Linear) or module.bias is not None:
            self.paths[layer] = f"dequantized:{kind}"
            return False
        rows, columns = stored.shape
        self._put(layer, QuantLinear(stored.blocks, kind, rows, columns, order=stored.row_order))
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
