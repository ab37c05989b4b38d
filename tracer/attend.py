"""One decode token's attention over a fixed-size KV cache, on the CPU (``kernels/attend.c``).

The compiled decode step (``LlamaModel.step``) keeps its shapes fixed by attending over every
cache slot with the unwritten ones masked; the loops torch.compile generates for that read and
score all the slots, and widen each 16-bit key once per query head. The kernel reads only the
slots up to the token's position, each KV head's rows once from memory for the query heads that
share them (GQA). It is the same math as ``model._masked_decode_attention`` (float32 scores,
softmax and sums), and is used only where that function would be: one token, a tensor position.
It is built into the same library as the products (:func:`tracer.matvec.kernel`).
"""

from __future__ import annotations

import torch

from .matvec import _SUFFIX, kernel

# The C loops widen a KV head's n_rep query rows into a float32 buffer on the stack.
_MAX_HEAD_DIM = 256
_MAX_REP = 16

# Below this many cached key elements per layer (KV heads x slots x head dim) the loops that
# torch.compile fuses around the rest of the layer are as fast as the kernel and its call, or
# faster. Measured (benchmarks/decode_attention.py, positions in the cache's second half, paired
# savings per step): the embedded model (2 x 32 per slot) loses 0.4-0.5 ms at 256 and 1024
# slots, is level at 2048 (-0.0 to +0.2 ms) and gains 2.1 ms of 6.5 at 8192; Llama-3.2-1B shapes
# (8 x 64) are level at 256 slots (-0.9 to +0.8 ms of about 85), gain 0.8-1.8 ms at 512, 7 at
# 1024, 15 at 2048 and 76 of 177 at 8192. The line sits past the level points: 512 slots for the
# 1B shapes, 4096 for the embedded model.
MIN_KEYS = 1 << 18

# A fragment of the "llama_tracer" namespace that matvec.py defines: torch.compile sees the
# kernel as one opaque operator, as it does the products.
_LIB = torch.library.Library("llama_tracer", "FRAGMENT")
_LIB.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor position, float scale) -> Tensor")


def _attend_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, scale: float):
    q3 = q.reshape(q.shape[1:]).contiguous()  # [Hkv, n_rep, hd]
    out = torch.empty_like(q3)
    kernel().attend(q3, k[0], v[0], position, scale, out)
    return out.view(q.shape)


_LIB.impl("decode_attention", _attend_cpu, "CPU")


@torch.library.register_fake("llama_tracer::decode_attention")
def _(q, k, v, position, scale):
    return q.new_empty(q.shape)


def fits(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> bool:
    """Whether the kernel can attend for ``q`` [1, Hkv, n_rep, hd] over ``k``/``v`` [1, Hkv, S, hd].

    Inference only, batch 1, CPU tensors of one float dtype, hd a multiple of 8 up to 256, at most
    16 query heads per KV head, key/value rows contiguous with the same strides, and a one-element
    int64 position. (Whether the kernel could be built is :func:`tracer.matvec.kernel`'s business.)
    """
    B, Hkv, n_rep, hd = q.shape
    return (
        B == 1
        and k.shape[:2] == v.shape[:2] == (1, Hkv)
        and k.shape[3] == v.shape[3] == hd
        and k.shape[2] == v.shape[2]
        and q.dtype is k.dtype is v.dtype
        and q.dtype in _SUFFIX
        and q.is_cpu and k.is_cpu and v.is_cpu and position.is_cpu
        and hd % 8 == 0 and hd <= _MAX_HEAD_DIM and n_rep <= _MAX_REP
        and k.stride() == v.stride()
        and k.stride(3) == 1 and k.stride(2) == hd
        and position.dtype == torch.int64 and position.numel() == 1
        and not torch.is_grad_enabled()
    )


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention of one token at ``position`` over cache slots 0..position, [1, Hkv, n_rep, hd].

    For callers that checked :func:`fits` and :func:`tracer.matvec.kernel`. Slots after the
    position are never read, so whatever they hold does not matter.
    """
    if torch.compiler.is_compiling():
        return torch.ops.llama_tracer.decode_attention(q, k, v, position, scale)  # opaque to the compiler
    return _attend_cpu(q, k, v, position, scale)
