"""One decode token's attention over a fixed-size KV cache: masked loops, or the CPU kernel.

The static decode step (``tracer/fast.py``) keeps its shapes fixed by attending over every slot
of the preallocated cache, the slots after the token's position masked: :func:`masked`, which
torch.compile fuses into a few loops. Those loops read and score all the slots, and widen each
16-bit key once per query head. The kernel (``kernels/attend.c``, :func:`decode_attention`) reads
only the slots up to the position, each KV head's rows once for the query heads that share them
(GQA): the same math (float32 scores, softmax and sums). :class:`OnKernel` is the attention that
uses it where it pays and fits and :func:`masked` elsewhere.

Layouts: the n_rep query heads sharing a KV head are that head's n_rep query rows, q [B, Hkv,
n_rep, hd] (head h = kv * n_rep + r), over keys and values [B, Hkv, S, hd].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kernels import Limits, ops
from .kernels.library import SUFFIX

# Below this many cached key elements per layer (KV heads x slots x head dim) the loops that
# torch.compile fuses around the rest of the layer are as fast as the kernel and its call, or
# faster. Measured (benchmarks/decode_attention.py, positions in the cache's second half, paired
# savings per step): the embedded model (2 x 32 per slot) loses 0.4-0.5 ms at 256 and 1024
# slots, is level at 2048 (-0.0 to +0.2 ms) and gains 2.1 ms of 6.5 at 8192; Llama-3.2-1B shapes
# (8 x 64) are level at 256 slots (-0.9 to +0.8 ms of about 85), gain 0.8-1.8 ms at 512, 7 at
# 1024, 15 at 2048 and 76 of 177 at 8192. The line sits past the level points: 512 slots for the
# 1B shapes, 4096 for the embedded model.
MIN_KEYS = 1 << 18


def masked(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, position: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention [B, Hkv, n_rep, hd] of one token at ``position`` [1] over every cache slot, the
    slots after it masked (a hidden key gets weight exactly 0, so the result is that of the slots
    written). Plain products and sums rather than SDPA, so that torch.compile fuses the whole
    attention into a few loops (a fifth of a small model's step on the CPU); float32 inside, as
    SDPA does for float16."""
    f32 = torch.float32
    visible = (torch.arange(keys.shape[2], device=q.device) <= position)[None]  # [1, S]
    scores = (q.to(f32)[:, :, :, None, :] * keys.to(f32)[:, :, None, :, :]).sum(-1) * scale  # [B, Hkv, n_rep, S]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return (probs[..., None] * values.to(f32)[:, :, None, :, :]).sum(-2).to(q.dtype)  # [B, Hkv, n_rep, hd]


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, limits: Limits) -> bool:
    """Whether the kernel, with the ``limits`` its library reports, can attend for ``q``
    [1, Hkv, n_rep, hd] over ``k``/``v`` [1, Hkv, S, hd].

    Inference only, batch 1, CPU tensors of one float dtype, hd a multiple of
    ``limits.head_dim_step`` up to ``limits.max_head_dim``, at most ``limits.max_rep`` query heads
    per KV head, key/value rows contiguous with the same strides, and a one-element int64 position.
    """
    B, Hkv, n_rep, hd = q.shape
    return (
        B == 1
        and k.shape[:2] == v.shape[:2] == (1, Hkv)
        and k.shape[3] == v.shape[3] == hd
        and k.shape[2] == v.shape[2]
        and q.dtype is k.dtype is v.dtype
        and q.dtype in SUFFIX
        and q.is_cpu and k.is_cpu and v.is_cpu and position.is_cpu
        and hd % limits.head_dim_step == 0 and hd <= limits.max_head_dim and n_rep <= limits.max_rep
        and k.stride() == v.stride()
        and k.stride(3) == 1 and k.stride(2) == hd
        and position.dtype == torch.int64 and position.numel() == 1
        and not torch.is_grad_enabled()
    )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of one token at ``position`` over cache slots 0..position, [1, Hkv, n_rep, hd], on
    the kernel, for callers that checked :func:`fits`. Slots after the position are never read, so
    whatever they hold does not matter."""
    if torch.compiler.is_compiling():  # opaque to the compiler (ops.register)
        return torch.ops.llama_tracer.decode_attention(q, k, v, position, scale)
    return ops.decode_attention(q, k, v, position, scale)


@dataclass(frozen=True)
class OnKernel:
    """Decode attention on the kernel from ``min_keys`` cached key elements per layer, where it
    :func:`fits` the library's ``limits``; :func:`masked` elsewhere. Called as :func:`masked` is."""

    limits: Limits
    min_keys: int = MIN_KEYS

    def __call__(self, q, keys, values, position, scale) -> torch.Tensor:
        _, Hkv, S, hd = keys.shape
        if Hkv * S * hd >= self.min_keys and fits(q, keys, values, position, self.limits):
            return decode_attention(q, keys, values, position, scale)
        return masked(q, keys, values, position, scale)
