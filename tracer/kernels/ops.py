"""The kernels as torch tensors in, tensors out, and as torch operators for torch.compile.

:func:`matvec`, :func:`quant_matvec`, :func:`dequantize` and :func:`decode_attention` allocate
the output and call the library. Eager code calls them directly (a Python call, no dispatcher).
Inside a compiled graph they are the operators ``torch.ops.llama_tracer.matvec`` /
``quant_matvec`` / ``decode_attention``, which the compiler treats as opaque and fuses code around; :func:`register`
defines those, once, when a model first takes the kernels on (``tracer.fast.use_kernels``), not at
import. Registered with the low-level ``torch.library`` API: ``torch.library.custom_op`` adds
about 10 us of Python to each call, more than a small model's product takes.
"""

from __future__ import annotations

import functools

import torch

from .build import library


def matvec(x: torch.Tensor, w0: torch.Tensor, w1=None, w2=None) -> torch.Tensor:
    """``x`` [..., K] (one row) times up to three weights [N_i, K]: [..., sum N_i], one call."""
    if w1 is None:
        weights, rows = w0, w0.shape[0]
    elif w2 is None:
        weights, rows = (w0, w1), w0.shape[0] + w1.shape[0]
    else:
        weights, rows = (w0, w1, w2), w0.shape[0] + w1.shape[0] + w2.shape[0]
    out = torch.empty(x.shape[:-1] + (rows,), dtype=x.dtype)
    return library().run(x.contiguous(), weights, out)


def quant_matvec(x: torch.Tensor, blocks: torch.Tensor, type_id: int, path: str = "auto") -> torch.Tensor:
    """``x`` [..., K] float32 (one row) times the quantized weight ``blocks`` (uint8 [N, bytes per
    row] of ggml type ``type_id``): [..., N] float32. ``path``: see ``Library.quant_paths``."""
    out = torch.empty(x.shape[:-1] + (blocks.shape[0],), dtype=torch.float32)
    return library().quant_matvec(type_id, blocks.contiguous(), x.contiguous(), out, path)


def dequantize(blocks: torch.Tensor, type_id: int, K: int, path: str = "auto") -> torch.Tensor:
    """The rows ``blocks`` (uint8 [N, bytes per row] of ggml type ``type_id``) as float32 [N, K]."""
    out = torch.empty(blocks.shape[0], K, dtype=torch.float32)
    return library().quant_dequantize(type_id, blocks.contiguous(), out, path)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, scale: float):
    """One token's attention, q [1, Hkv, n_rep, hd] over k/v [1, Hkv, S, hd] slots 0..position."""
    q3 = q.reshape(q.shape[1:]).contiguous()  # [Hkv, n_rep, hd]
    out = torch.empty_like(q3)
    library().attend(q3, k[0], v[0], position, scale, out)
    return out.view(q.shape)


@functools.cache
def register() -> torch.library.Library:
    """Define the ``llama_tracer`` operators (once; they live as long as the returned library).

    Up to three weights as separate arguments: a Tensor[] argument costs about 5 us more per call.
    """
    lib = torch.library.Library("llama_tracer", "DEF")
    lib.define("matvec(Tensor x, Tensor w0, Tensor? w1=None, Tensor? w2=None) -> Tensor")
    lib.impl("matvec", matvec, "CPU")
    lib.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor position, float scale) -> Tensor")
    lib.impl("decode_attention", decode_attention, "CPU")
    lib.define("quant_matvec(Tensor x, Tensor blocks, int type_id) -> Tensor")
    lib.impl("quant_matvec", _quant_matvec_op, "CPU")
    torch.library.register_fake("llama_tracer::matvec", _matvec_shape, lib=lib)
    torch.library.register_fake("llama_tracer::quant_matvec", _quant_matvec_shape, lib=lib)
    torch.library.register_fake("llama_tracer::decode_attention", _attention_shape, lib=lib)
    return lib


def _matvec_shape(x: torch.Tensor, w0: torch.Tensor, w1=None, w2=None) -> torch.Tensor:
    rows = sum(w.shape[0] for w in (w0, w1, w2) if w is not None)
    return x.new_empty(x.shape[:-1] + (rows,))


def _quant_matvec_op(x: torch.Tensor, blocks: torch.Tensor, type_id: int) -> torch.Tensor:
    return quant_matvec(x, blocks, type_id)


def _quant_matvec_shape(x: torch.Tensor, blocks: torch.Tensor, type_id: int) -> torch.Tensor:
    return x.new_empty(x.shape[:-1] + (blocks.shape[0],), dtype=torch.float32)


def _attention_shape(q, k, v, position, scale):
    return q.new_empty(q.shape)
