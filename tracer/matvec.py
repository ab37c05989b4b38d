"""Matrix products for batch-1 decode (and short prompts) on the CPU (``kernels/matvec.c``).

Decoding one token multiplies a single row of activations by every weight matrix, so each step
reads every weight once: its speed limit is memory bandwidth (tokens/s <= GB/s / weight GB). On
x86-64 CPUs with AVX2, torch's one-row product reaches about two thirds of the read rate for
float16 and bfloat16, and its float32 one pays a large fixed cost per call on small matrices. A
forty-line C loop (four long read streams, 16-bit weights widened in registers, float32 sums)
reads weights at least as fast as torch reads a plain tensor (``x.sum()``); ``benchmarks/speed.py``
measures both. For a prompt (several rows) in float16/bfloat16, torch's matmul here makes one
pass over the weights per row; the kernel widens each group of weight rows once and reuses it for
up to 64 rows (about 3x faster for 16 rows).

The kernel (with ``kernels/attend.c``, one decode token's attention: see ``attend.py``) is built
once, at first use, with the system C compiler (``$CC``, else ``cc``) into
``$XDG_CACHE_HOME/llama-tracer`` and loaded with ctypes; no torch headers are needed. Where it
cannot be used (not x86-64 with AVX2, no compiler, a GPU tensor, several float32 rows, a bias, a
layout other than contiguous rows) :func:`linear` is exactly ``F.linear``. Results differ from
torch's only in float32 summation order, the same size of difference as between two BLAS builds.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# One library: the products (matvec.c) and one decode token's attention (attend.c, see attend.py),
# both on the helpers in widen.h.
_KERNELS = Path(__file__).with_name("kernels")
SOURCES = (_KERNELS / "matvec.c", _KERNELS / "attend.c")
HEADERS = (_KERNELS / "widen.h",)
FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-fPIC", "-shared"]
_SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# Below this many weights a product is a few microseconds either way; torch's call is fine.
_MIN_WEIGHTS = 4096
# Several rows (a prompt): only for 16-bit weights, whose torch matmul on AVX2 CPUs makes one pass
# over the weights per row; float32's is a good BLAS. The kernel takes up to _ROWS rows per call.
_ROWS_DTYPES = (torch.float16, torch.bfloat16)
_ROWS = 64


@dataclass(frozen=True)
class Kernel:
    """The loaded library, or why there is none (``reason``)."""

    path: Path | None
    reason: str = ""

    @functools.cached_property
    def _lib(self) -> ctypes.CDLL:
        return ctypes.CDLL(str(self.path))

    def _bind(self, name: str, dtypes, argtypes: list, restype) -> dict[torch.dtype, ctypes._CFuncPtr]:
        """The library's ``{name}_{suffix}`` function for each dtype, with its C signature."""
        fns = {}
        for dtype in dtypes:
            fn = getattr(self._lib, f"{name}_{_SUFFIX[dtype]}")
            fn.argtypes, fn.restype = argtypes, restype
            fns[dtype] = fn
        return fns

    @functools.cached_property
    def _fns(self) -> dict[torch.dtype, ctypes._CFuncPtr]:
        p, n = ctypes.c_void_p, ctypes.c_long
        return self._bind("matvec", _SUFFIX, [p, p, p, n, n, ctypes.c_int], None)

    @functools.cached_property
    def _fns3(self) -> dict[torch.dtype, ctypes._CFuncPtr]:
        p, n = ctypes.c_void_p, ctypes.c_long
        return self._bind("matvec3", _SUFFIX, [p, n, p, n, p, n, p, p, n, ctypes.c_int], None)

    @functools.cached_property
    def _rows_fns(self) -> dict[torch.dtype, ctypes._CFuncPtr]:
        p, n = ctypes.c_void_p, ctypes.c_long
        return self._bind("matmat", _ROWS_DTYPES, [p, p, p, n, n, n, ctypes.c_int], ctypes.c_int)

    @functools.cached_property
    def _attend_fns(self) -> dict[torch.dtype, ctypes._CFuncPtr]:
        p, n = ctypes.c_void_p, ctypes.c_long
        return self._bind("attend", _SUFFIX, [p, p, p, p, p, n, n, n, n, n, ctypes.c_float, ctypes.c_int], ctypes.c_int)

    @property
    def available(self) -> bool:
        return self.path is not None

    def run(
        self, x: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        """out[n] = weight[n] . x, for contiguous x [K], weight [N, K], out [N] of one dtype.

        Up to three weights (q, k and v: [N_i, K] each) are one call, their results one after
        another in out [sum N_i].
        """
        if isinstance(weights, torch.Tensor) or len(weights) == 1:
            w = weights if isinstance(weights, torch.Tensor) else weights[0]
            N, K = w.shape
            self._fns[w.dtype](w.data_ptr(), x.data_ptr(), out.data_ptr(), N, K, torch.get_num_threads())
            return out
        if len(weights) > 3:
            raise ValueError(f"the kernel takes up to 3 matrices per call, not {len(weights)}")
        parts = [a for w in weights for a in (w.data_ptr(), w.shape[0])]  # (pointer, rows) each
        parts += [None, 0] * (3 - len(weights))  # an absent part has no rows
        K = weights[0].shape[1]
        self._fns3[weights[0].dtype](*parts, x.data_ptr(), out.data_ptr(), K, torch.get_num_threads())
        return out

    def run_rows(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out[t] = weight @ x[t] for contiguous x [T, K], weight [N, K], out [T, N] (16-bit)."""
        N, K = weight.shape
        status = self._rows_fns[weight.dtype](
            weight.data_ptr(), x.data_ptr(), out.data_ptr(), N, K, x.shape[0], torch.get_num_threads()
        )
        if status != 0:
            raise MemoryError(f"matvec kernel: no memory for a {x.shape[0]} x {K} float32 buffer")
        return out

    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor, scale: float,
        out: torch.Tensor,
    ) -> torch.Tensor:
        """out = softmax(q . k[:, :p+1] * scale) . v[:, :p+1], p = position[0] (``attend.c``).

        q and out are contiguous [Hkv, n_rep, hd]; k and v are [Hkv, S, hd] with contiguous rows
        (one stride between heads); position is a one-element int64 tensor.
        """
        Hkv, n_rep, hd = q.shape
        status = self._attend_fns[q.dtype](
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), position.data_ptr(),
            Hkv, n_rep, hd, k.shape[1], k.stride(0), scale, torch.get_num_threads(),
        )
        if status == -2:
            raise IndexError(f"attention kernel: position {int(position)} is outside the cache's {k.shape[1]} slots")
        if status != 0:
            raise MemoryError(f"attention kernel: no memory for {n_rep} x {int(position) + 1} float32 scores")
        return out


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama-tracer"


@functools.cache
def kernel() -> Kernel:
    """Build (once per source and compiler) and load the kernel; never raises.

    The build goes to a temporary file renamed into place, so a crash or a second process never
    leaves half a library behind. A failure is reported in ``Kernel.reason``.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return Kernel(None, f"the kernel is x86-64 only; this machine is {platform.machine()}")
    capability = torch.backends.cpu.get_cpu_capability()
    if capability not in ("AVX2", "AVX512"):
        return Kernel(None, f"the kernel needs AVX2; torch reports CPU capability {capability}")
    cc = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=True).stdout
    except OSError as e:
        return Kernel(None, f"no C compiler: {cc!r} cannot be run ({e.strerror}); set CC to one")
    except subprocess.CalledProcessError:
        return Kernel(None, f"no C compiler: '{cc} --version' failed; set CC to one")
    sources = b"".join(src.read_bytes() for src in SOURCES + HEADERS)
    key = hashlib.sha256(sources + " ".join(FLAGS).encode() + version.encode()).hexdigest()
    path = _cache_dir() / f"matvec-{key[:16]}.so"
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            try:
                subprocess.run(
                    [cc, *FLAGS, *map(str, SOURCES), "-o", tmp], capture_output=True, text=True, check=True,
                    timeout=300,
                )
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except subprocess.CalledProcessError as e:
            return Kernel(None, f"building {', '.join(src.name for src in SOURCES)} with {cc} failed: {e.stderr.strip()[:500]}")
        except subprocess.TimeoutExpired:
            return Kernel(None, f"building the kernels with {cc} took over 300 s; gave up")
        except OSError as e:
            return Kernel(None, f"could not build the kernel into {path.parent}: {e}")
    built = Kernel(path)
    try:  # load it now, so that a library that will not load means "no kernel", not a crash later
        built._fns, built._fns3, built._rows_fns, built._attend_fns  # noqa: B018
    except (OSError, AttributeError) as e:
        return Kernel(None, f"could not load {path}: {e}; delete it to rebuild")
    return built


# ---------------------------------------------------------------------------------------------
# torch.compile sees the kernel as one opaque operator (fused code runs around it). Registered
# with the low-level torch.library API: torch.library.custom_op adds about 10 us of Python to each
# call, more than a small model's product takes.

_LIB = torch.library.Library("llama_tracer", "DEF")  # the registration lives as long as this module
# Up to three weights as separate arguments: a Tensor[] argument costs about 5 us more per call.
_LIB.define("matvec(Tensor x, Tensor w0, Tensor? w1=None, Tensor? w2=None) -> Tensor")


def _matvec_cpu(x: torch.Tensor, w0: torch.Tensor, w1=None, w2=None) -> torch.Tensor:
    if w1 is None:
        out = torch.empty(x.shape[:-1] + (w0.shape[0],), dtype=x.dtype)
        return kernel().run(x.contiguous(), w0, out)
    weights = (w0, w1) if w2 is None else (w0, w1, w2)
    out = torch.empty(x.shape[:-1] + (sum(w.shape[0] for w in weights),), dtype=x.dtype)
    return kernel().run(x.contiguous(), weights, out)


_LIB.impl("matvec", _matvec_cpu, "CPU")


@torch.library.register_fake("llama_tracer::matvec")
def _(x: torch.Tensor, w0: torch.Tensor, w1=None, w2=None) -> torch.Tensor:
    rows = sum(w.shape[0] for w in (w0, w1, w2) if w is not None)
    return x.new_empty(x.shape[:-1] + (rows,))


def fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the kernel can compute ``F.linear(x, weight, bias)``.

    Inference only (no autograd), a row-major CPU weight of the activations' dtype, no bias; one
    row of activations (a decode step) in float32/float16/bfloat16, or several rows (a prompt) in
    float16/bfloat16. (Whether the kernel could be built is :func:`kernel`'s business.)
    """
    K = weight.shape[-1]
    return (
        bias is None
        and x.shape[-1] == K
        and x.is_cpu
        and weight.is_cpu
        and x.dtype is weight.dtype
        and weight.dtype in _SUFFIX
        and (x.numel() == K or weight.dtype in _ROWS_DTYPES)
        and weight.dim() == 2
        and weight.numel() >= _MIN_WEIGHTS
        and weight.is_contiguous()
        and not torch.is_grad_enabled()
    )


def product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The kernel's ``F.linear(x, weight)``, for callers that checked :func:`fits` and :func:`kernel`."""
    K = weight.shape[1]
    if x.numel() == K:
        return _one_row(x, [weight])
    if torch.compiler.is_compiling():  # the compiled decode step has one row; nothing else is compiled
        return F.linear(x, weight)
    rows = x.reshape(-1, K).contiguous()  # [T, K]
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=x.dtype)
    k = kernel()
    for t in range(0, rows.shape[0], _ROWS):
        k.run_rows(rows[t : t + _ROWS], weight, out[t : t + _ROWS])
    return out.view(x.shape[:-1] + (weight.shape[0],))


def _one_row(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return torch.ops.llama_tracer.matvec(x, *weights)  # opaque to the compiler
    return _matvec_cpu(x, *weights)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, use_kernel: bool | None = None
) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on the kernel where it :func:`fits`.

    ``use_kernel`` is the caller's standing choice (the model's, made once by ``set_matvec``, so
    that a compiled step never asks :func:`kernel`); None asks whether the kernel could be built.
    """
    if use_kernel is None:
        use_kernel = kernel().available
    if use_kernel and fits(x, weight, bias):
        return product(x, weight)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` whose products may run on the kernel where it fits (``LlamaModel.set_matvec``).

    ``use_kernel`` is set only once the kernel is known to be available.
    """

    use_kernel: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, use_kernel=self.use_kernel)


def stacked_linear(
    x: torch.Tensor, layers: Sequence[nn.Linear], *, use_kernel: bool | None = None
) -> torch.Tensor:
    """``layers`` applied to the same ``x`` (q, k and v; gate and up), their outputs concatenated
    on the last dim: what one layer with the weights stacked would give, without stacking them.

    One row on the kernel is one call for all of them (one thread team, x widened once); otherwise
    each layer is its own :func:`linear` and the outputs are joined.
    """
    if use_kernel is None:
        use_kernel = kernel().available
    one_row = x.numel() == x.shape[-1]
    if use_kernel and one_row and len(layers) <= 3 and all(fits(x, m.weight, m.bias) for m in layers):
        return _one_row(x, [m.weight for m in layers])
    return torch.cat([linear(x, m.weight, m.bias, use_kernel=use_kernel) for m in layers], dim=-1)
