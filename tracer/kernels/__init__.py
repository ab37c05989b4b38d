"""The CPU kernels: C sources built, at first use, into two libraries that torch code calls
(the core products and attention; quant.c apart, so that either failing to build spares the other).

- ``matvec.c``: one-row matrix products (batch-1 decode) and a few rows at once (16-bit prompts)
- ``attend.c``: one decode token's attention over the KV cache's written slots
- ``quant.c``: one-row products straight from GGUF's quantized blocks (Q8_0, Q4_0, Q4_1, Q4_K,
  Q6_K), and those blocks dequantized a range of rows at a time
- ``widen.h``: what both need (16-bit floats widened to float32, rounded back as torch rounds)

- :mod:`.build`: the compiler, the cache folder, a lock so that concurrent processes build once,
  a time limit on every compiler call; :func:`library` is the entry point
- :mod:`.library`: the built library through ctypes, and the limits its C code exports
- :mod:`.ops`: its calls on tensors, and as torch operators for torch.compile (registered on
  first use)

When to use them is decided elsewhere: ``tracer.matvec`` and ``tracer.attend`` say which products
and attentions fit, ``tracer.fast.use_kernels`` swaps them into a model.
"""

from .build import library
from .library import Library, Limits

__all__ = ["Library", "Limits", "library"]
