"""Matrix products for batch-1 decode (and 16-bit prompts) on the CPU kernel (``kernels/matvec.c``).

Decoding one token multiplies a single row of activations by every weight matrix, so each step
reads every weight once: its speed limit is memory bandwidth (tokens/s <= GB/s / weight GB). On
x86-64 CPUs with AVX2, torch's one-row product reaches about two thirds of the read rate for
float16 and bfloat16, and its float32 one pays a large fixed cost per call on small matrices. A
forty-line C loop (four long read streams, 16-bit weights widened in registers, float32 sums)
reads weights at least as fast as torch reads a plain tensor (``x.sum()``); ``benchmarks/speed.py``
measures both. For a prompt (several rows) in float16/bfloat16, torch's matmul here makes one
pass over the weights per row; the kernel widens each group of weight rows once and reuses it for
up to 64 rows (about 3x faster for 16 rows).

The model itself knows nothing of this: ``tracer.fast.use_kernels`` swaps :class:`KernelLinear`
in for its ``nn.Linear`` layers and :class:`KernelStacked` for its :class:`~tracer.model.Stacked`
products (q/k/v, gate/up), once the kernel is built (``tracer.kernels``). Where a product does not
fit the kernel (several float32 rows, a bias, a GPU tensor, autograd, a layout other than
contiguous rows) they compute exactly ``F.linear``. Results differ from torch's only in float32
summation order, the same size of difference as between two BLAS builds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import library, ops
from .kernels.library import ROWS_DTYPES, SUFFIX
from .model import Stacked

# Below this many weights a product is a few microseconds either way; torch's call is fine.
MIN_WEIGHTS = 4096
# Rows of a prompt per kernel call (matmat_* in matvec.c is written for a short prompt, up to 64).
ROWS_PER_CALL = 64


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, rows: bool = True) -> bool:
    """Whether the kernel can compute ``F.linear(x, weight, bias)``.

    Inference only (no autograd), a row-major CPU weight of the activations' dtype, no bias; one
    row of activations (a decode step) in float32/float16/bfloat16, or several rows (a prompt) in
    float16/bfloat16 when ``rows``. (Whether the kernel could be built is
    ``tracer.kernels.library()``'s business.)
    """
    return (
        (x.numel() == x.shape[-1] or (rows and x.dtype in ROWS_DTYPES))
        and _fits_rows(x)
        and _fits_weight(x, weight, bias)
    )


# fits in two halves, so that a stacked product (KernelStacked) checks its one x once.
def _fits_rows(x: torch.Tensor) -> bool:
    return x.is_cpu and x.dtype in SUFFIX and not torch.is_grad_enabled()


def _fits_weight(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        bias is None
        and weight.dtype is x.dtype
        and weight.dim() == 2
        and weight.shape[1] == x.shape[-1]
        and weight.is_cpu
        and weight.numel() >= MIN_WEIGHTS
        and weight.is_contiguous()
    )


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's ``F.linear(x, weight)``, for callers that checked :func:`fits`."""
    K = weight.shape[1]
    if x.numel() == K:
        return _one_row(x, weight)
    if torch.compiler.is_compiling():  # the compiled decode step has one row; nothing else is compiled
        return F.linear(x, weight)
    rows = x.reshape(-1, K).contiguous()  # [T, K]
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype)
    lib = library()
    for t in range(0, rows.shape[0], ROWS_PER_CALL):
        lib.run_rows(rows[t : t + ROWS_PER_CALL], weight, out[t : t + ROWS_PER_CALL])
    return out.view(x.shape[:-1] + (weight.shape[0],))


def _one_row(x: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.llama_tracer.matvec(x, *weights)  # opaque to the compiler (ops.register)
    return ops.matvec(x, *weights)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
           rows: bool = True) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on the kernel where it :func:`fits` (the kernel must be built);
    ``rows=False`` leaves a prompt's several rows to torch."""
    if fits(x, weight, bias, rows=rows):
        return product(x, weight)
    return F.linear(x, weight, bias)


class KernelLinear(nn.Linear):
    """``nn.Linear`` whose products run on the kernel where they fit (``tracer.fast.use_kernels``)."""

    # Whether a 16-bit prompt's rows go to the kernel too. Measured per load by use_kernels: where
    # torch's float16 matmul runs on AVX512-FP16 or AMX (Sapphire Rapids), it beats the kernel,
    # which widens to float32; elsewhere (AVX2) the kernel is several times faster.
    rows: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, rows=self.rows)


def sharing(cls: type[nn.Linear], layer: nn.Linear) -> nn.Linear:
    """A ``cls`` (``nn.Linear`` or :class:`KernelLinear`) over ``layer``'s own weight and bias
    Parameters, for swapping one for the other. ``nn.Linear.__init__`` is skipped: it would make
    new random weights, only to be dropped (and a mapped checkpoint's views must stay as they are)."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.in_features, new.out_features = layer.in_features, layer.out_features
    new.weight = layer.weight
    new.register_parameter("bias", layer.bias)
    return new


class KernelStacked(Stacked):
    """:class:`~tracer.model.Stacked` on the kernel: one row is one call for up to ``max_parts``
    layers (one thread team, x widened once); otherwise each layer is its own :func:`linear`."""

    def __init__(self, max_parts: int, rows: bool = True) -> None:
        super().__init__()
        self.max_parts = max_parts  # the library's limit (kernels.Limits), read when swapped in
        self.rows = rows  # as KernelLinear.rows

    def forward(self, x: torch.Tensor, *layers: nn.Linear) -> torch.Tensor:
        if x.numel() == x.shape[-1] and len(layers) <= self.max_parts and _fits_rows(x):
            weights = []
            for m in layers:
                if not _fits_weight(x, m.weight, m.bias):
                    break
                weights.append(m.weight)
            else:
                return _one_row(x, *weights)
        return torch.cat([linear(x, m.weight, m.bias, rows=self.rows) for m in layers], dim=-1)
