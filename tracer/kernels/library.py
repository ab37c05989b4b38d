"""The built library through ctypes: its functions, one per storage dtype, and the limits it exports.

Every function takes raw pointers to contiguous row-major data and the thread count (torch's, so
that the kernels' OpenMP team is as large as torch's own). The limits (how many matrices one
product call takes, which head sizes and how many query heads per KV head the attention takes) are
read from the library's own ``*_limits`` exports, so that no number is repeated here. Likewise the
GGUF block formats ``quant.c`` decodes and the paths it can take (``quant_format``, ``quant_path``):
its functions take the format's ggml type id and the path's number as arguments.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# The dtypes the library has functions for, and the suffix of their names (matvec_f16, ...).
SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# The several-row product (matmat_*) exists for 16-bit weights only: float32's torch matmul is a good BLAS.
ROWS_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Limits:
    """What the C code takes, as it reports it (``matvec_max_parts``, ``attend_limits``)."""

    max_parts: int  # matrices in one product call (q, k and v)
    max_head_dim: int  # attention: head_dim at most this ...
    head_dim_step: int  # ... and a multiple of this
    max_rep: int  # attention: query heads per KV head

    @classmethod
    def read(cls, lib: ctypes.CDLL) -> Limits:
        lib.matvec_max_parts.restype = ctypes.c_long
        hd, step, rep = ctypes.c_long(), ctypes.c_long(), ctypes.c_long()
        lib.attend_limits(ctypes.byref(hd), ctypes.byref(step), ctypes.byref(rep))
        return cls(lib.matvec_max_parts(), hd.value, step.value, rep.value)


@dataclass(frozen=True)
class QuantFormat:
    """One GGUF block format ``quant.c`` decodes, as it reports it (``quant_format``)."""

    type_id: int  # ggml's type id (gguf.GGMLQuantizationType)
    block: int  # weights per block
    bytes: int  # bytes per block

    @classmethod
    def read_all(cls, fn) -> dict[int, QuantFormat]:
        """Every format ``quant_format(i, ...)`` reports, by type id, until it says there are no more."""
        formats, i = {}, 0
        t, b, n = ctypes.c_long(), ctypes.c_long(), ctypes.c_long()
        while fn(i, ctypes.byref(t), ctypes.byref(b), ctypes.byref(n)) == 0:
            formats[t.value] = cls(t.value, b.value, n.value)
            i += 1
        return formats


def _read_quant_paths(fn) -> dict[str, int]:
    """The paths ``quant_path(i, ...)`` names ("auto", "portable", "avx2", ...) that this CPU
    runs, name -> the number its functions take."""
    paths, i, runs = {}, 0, ctypes.c_int()
    while (name := fn(i, ctypes.byref(runs))) is not None:
        if runs.value:
            paths[name.decode()] = i
        i += 1
    return paths


_P, _N, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
# name: (dtypes, argument types, result type) of each family of functions.
_SIGNATURES = {
    "matvec": (SUFFIX, [_P, _P, _P, _N, _N, _I], None),
    "matvec3": (SUFFIX, [_P, _N, _P, _N, _P, _N, _P, _P, _N, _I], None),
    "matmat": (ROWS_DTYPES, [_P, _P, _P, _N, _N, _N, _I], _I),
    "attend": (SUFFIX, [_P, _P, _P, _P, _P, _N, _N, _N, _N, _N, ctypes.c_float, _I], _I),
}
# quant.c's functions (one each; the block format is an argument, its ggml type id): name:
# (argument types, result type).
_QUANT_SIGNATURES = {
    "quant_format": ([_N, _P, _P, _P], _I),
    "quant_path": ([_N, _P], ctypes.c_char_p),
    "quant_matvec": ([_N, _P, _P, _P, _N, _N, _I, _I], _I),
    "quant_dequantize": ([_N, _P, _P, _N, _N, _I, _I], _I),
}


class Library:
    """The loaded libraries (:meth:`open`), or why there are none (``Library(None, reason)``).
    ``path``: the core library (products, attention); ``quant_lib``: quant.c's, or None with
    ``quant_reason`` saying why (then ``quant_formats`` is empty: quantized layers use torch)."""

    def __init__(self, path: Path | None, reason: str = "") -> None:
        self.path, self.reason = path, reason
        self.quant_lib: Path | None = None
        self.quant_reason = reason
        self.limits: Limits | None = None
        self._fns: dict[str, dict[torch.dtype, ctypes._CFuncPtr]] = {}
        self.quant_formats: dict[int, QuantFormat] = {}  # by ggml type id (quant.c's quant_format)
        self.quant_paths: dict[str, int] = {}  # the paths this CPU runs (quant.c's quant_path)
        self._quant: dict[str, ctypes._CFuncPtr] = {}

    @property
    def available(self) -> bool:
        return self.path is not None

    @classmethod
    def open(cls, path: Path, quant: Path | None = None, *, quant_reason: str = "") -> Library:
        """Load the core library ``path`` and quant.c's ``quant`` (None: not built, ``quant_reason``
        says why) and bind every function now, so that a library that will not load means "no
        kernel" (or no quantized kernel), with the reason, not a crash at the first product."""
        built = cls(path)
        try:
            lib = ctypes.CDLL(str(path))
            for name, (dtypes, argtypes, restype) in _SIGNATURES.items():
                built._fns[name] = {dtype: _bind(lib, f"{name}_{SUFFIX[dtype]}", argtypes, restype) for dtype in dtypes}
            built.limits = Limits.read(lib)
        except (OSError, AttributeError) as e:
            return cls(None, f"could not load {path}: {e}; delete it to rebuild")
        built.quant_reason = quant_reason
        if quant is not None:
            try:
                built._open_quant(quant)
            except (OSError, AttributeError) as e:
                built._quant, built.quant_formats, built.quant_paths = {}, {}, {}
                built.quant_reason = f"could not load {quant}: {e}; delete it to rebuild"
        return built

    def _open_quant(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        self._quant = {name: _bind(lib, name, *sig) for name, sig in _QUANT_SIGNATURES.items()}
        self.quant_formats = QuantFormat.read_all(self._quant["quant_format"])
        self.quant_paths = _read_quant_paths(self._quant["quant_path"])
        self.quant_lib, self.quant_reason = path, ""

    def run(
        self, x: torch.Tensor, weights: torch.Tensor | Sequence[torch.Tensor], out: torch.Tensor
    ) -> torch.Tensor:
        """out[n] = weight[n] . x, for contiguous x [K], weight [N, K], out [N] of one dtype.

        Up to ``limits.max_parts`` weights (q, k and v: [N_i, K] each) are one call, their results
        one after another in out [sum N_i].
        """
        threads = torch.get_num_threads()
        if isinstance(weights, torch.Tensor) or len(weights) == 1:
            w = weights if isinstance(weights, torch.Tensor) else weights[0]
            self._fns["matvec"][w.dtype](w.data_ptr(), x.data_ptr(), out.data_ptr(), *w.shape, threads)
            return out
        if len(weights) > self.limits.max_parts:
            raise ValueError(f"the kernel takes up to {self.limits.max_parts} matrices per call, not {len(weights)}")
        parts = []  # (pointer, rows) of each part; an absent part has no rows
        for w in weights:
            parts += (w.data_ptr(), w.shape[0])
        parts += (None, 0) * (self.limits.max_parts - len(weights))
        self._fns["matvec3"][weights[0].dtype](*parts, x.data_ptr(), out.data_ptr(), weights[0].shape[1], threads)
        return out

    def run_rows(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out[t] = weight @ x[t] for contiguous x [T, K], weight [N, K], out [T, N] (16-bit)."""
        N, K = weight.shape
        status = self._fns["matmat"][weight.dtype](
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
        status = self._fns["attend"][q.dtype](
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), position.data_ptr(),
            Hkv, n_rep, hd, k.shape[1], k.stride(0), scale, torch.get_num_threads(),
        )
        if status == -2:
            raise IndexError(f"attention kernel: position {int(position)} is outside the cache's {k.shape[1]} slots")
        if status != 0:
            raise MemoryError(f"attention kernel: no memory for {n_rep} x {int(position) + 1} float32 scores")
        return out


    def quant_matvec(
        self, type_id: int, blocks: torch.Tensor, x: torch.Tensor, out: torch.Tensor, path: str = "auto"
    ) -> torch.Tensor:
        """out[n] = row n . x for contiguous uint8 ``blocks`` [N, bytes per row] of ggml type
        ``type_id`` (one of ``quant_formats``), float32 x [K] and out [N] (``quant.c``), along
        ``path`` (one of ``quant_paths``: "auto", or forced "portable", "avx2", "avx512")."""
        K = x.numel()
        status = self._quant["quant_matvec"](
            type_id, blocks.data_ptr(), x.data_ptr(), out.data_ptr(), out.numel(), K, torch.get_num_threads(),
            self._quant_path(path),
        )
        _check_quant(status, type_id, K)
        return out

    def quant_dequantize(
        self, type_id: int, blocks: torch.Tensor, out: torch.Tensor, path: str = "auto"
    ) -> torch.Tensor:
        """out [N, K] float32 = contiguous uint8 ``blocks`` [N, bytes per row] of ggml type
        ``type_id`` dequantized, bit for bit as gguf-py does (``quant.c``; ``path`` as above)."""
        N, K = out.shape
        status = self._quant["quant_dequantize"](
            type_id, blocks.data_ptr(), out.data_ptr(), N, K, torch.get_num_threads(), self._quant_path(path)
        )
        _check_quant(status, type_id, K)
        return out

    def _quant_path(self, path: str) -> int:
        if path not in self.quant_paths:
            raise ValueError(f"quant kernel: no path {path!r} on this CPU; it runs {', '.join(self.quant_paths)}")
        return self.quant_paths[path]


def _check_quant(status: int, type_id: int, K: int) -> None:
    if status == -1:
        raise ValueError(f"quant kernel: ggml type id {type_id} is not one it decodes")
    if status == -2:
        raise ValueError(f"quant kernel: a row of {K} weights is not whole blocks of ggml type {type_id}")
    if status != 0:
        raise ValueError(f"quant kernel: status {status}")


def _bind(lib: ctypes.CDLL, name: str, argtypes: list, restype) -> ctypes._CFuncPtr:
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = argtypes, restype
    return fn
