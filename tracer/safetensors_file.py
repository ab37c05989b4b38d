"""The safetensors format, read by hand: the hub's weight files (``model*.safetensors``).

A file is an 8-byte little-endian header length, a JSON header (tensor name -> dtype, shape and
byte range), then the raw bytes. Reading it by hand lets every header be checked before any byte is
trusted (a truncated or corrupt file is named in the error) and lets a tensor stored exactly as the
model wants it become a view of the memory-mapped file instead of a copy: nothing is read until
first use, and the pages are shared with the OS page cache. That is how transformers loads too. The
mapping is private (copy-on-write): editing a weight in memory never writes to the file.

:class:`SafetensorsFile` is this format's side of the tensor-by-tensor loader in
``tracer.checkpoint`` (the GGUF side is ``tracer.gguf_file``).
"""

from __future__ import annotations

import json
import mmap
from dataclasses import dataclass
from pathlib import Path

import torch

from . import dtypes
from .errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit; a bigger header is corrupt or hostile

# safetensors dtype codes -> torch dtypes
ST_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's place in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset
    nbytes: int

    @property
    def stored(self) -> str:
        """How the tensor is stored, as the load trace names it ("float16", ...)."""
        return dtypes.name_of(self.dtype)


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check a safetensors header; every problem names the file."""
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: too small to be a safetensors file ({size} bytes): truncated?")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > MAX_HEADER_BYTES or header_len > size - 8:
            raise CheckpointError(
                f"{path}: header claims {header_len} bytes but the file has {size}: "
                "corrupt or truncated file (re-download it)"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # bad UTF-8 or JSON, huge numbers, absurd nesting
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: corrupt file") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object: corrupt file")
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries[name] = _entry(path, name, info, data_start, size)
    return entries


def _entry(path: Path, name: str, info, data_start: int, size: int) -> TensorEntry:
    bad = f"{path}: tensor {name!r} has a malformed header entry"
    if not isinstance(info, dict):
        raise CheckpointError(bad)
    dtype = ST_DTYPES.get(info.get("dtype"))
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{bad}: shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
    ):
        raise CheckpointError(f"{bad}: data_offsets {offsets!r}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    if begin < 0 or end < begin or end - begin != nbytes:
        raise CheckpointError(f"{bad}: offsets {offsets} do not fit shape {shape} of {info.get('dtype')}")
    if data_start + end > size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ends at byte {data_start + end} but the file has {size} "
            "bytes: the file is truncated (re-download it)"
        )
    return TensorEntry(name, dtype, tuple(shape), data_start + begin, nbytes)


def read_into(f, entry: TensorEntry, path: Path, out: torch.Tensor, offset: int = 0) -> None:
    """Read bytes [offset, offset + len(out)) of ``entry`` into the contiguous CPU byte tensor ``out``."""
    f.seek(entry.begin + offset)
    got = f.readinto(memoryview(out.numpy()).cast("B")) if out.numel() else 0
    if got != out.numel():
        raise CheckpointError(f"{path}: tensor {entry.name!r} is truncated ({offset + got} of {entry.nbytes} bytes)")


def read_tensor(f, entry: TensorEntry, path: Path) -> torch.Tensor:
    """One tensor from an open safetensors file, in its stored dtype, on the CPU."""
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    read_into(f, entry, path, buf)
    return buf.view(entry.dtype).view(entry.shape) if entry.nbytes else torch.empty(entry.shape, dtype=entry.dtype)


def map_file(f) -> torch.Tensor | None:
    """The whole open file as a uint8 tensor over a private (copy-on-write) memory map, or None
    where mapping is not possible (then every tensor is read)."""
    try:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    return torch.frombuffer(mm, dtype=torch.uint8)  # keeps the map alive while any view lives


def view_in(mapped: torch.Tensor, begin: int, nbytes: int, param: torch.Tensor) -> torch.Tensor | None:
    """``param`` as a view of ``nbytes`` at ``begin`` of a mapped file, if the bytes can serve as
    ``param`` as they lie (aligned for its dtype, a contiguous parameter), else None."""
    if begin % param.element_size() or not param.is_contiguous():
        return None
    return mapped[begin : begin + nbytes].view(param.dtype).view(param.shape)


class SafetensorsFile:
    """One safetensors weight file, opened for the tensor-by-tensor loader.

    ``entries`` are keyed by hub tensor name (the checkpoint's own names); ``fill`` copies a tensor
    into a parameter; ``view`` returns the parameter's weights as a view of the mapped file when
    they lie there as the parameter wants them (CPU, same dtype).
    """

    format = "safetensors"

    def __init__(self, path: Path, *, mapped: bool) -> None:
        self.path = path
        self.entries = read_header(path)
        self._f = open(path, "rb")
        self._mapped = map_file(self._f) if mapped else None

    def check_dtype(self, name: str) -> None:
        """Refuse integer or boolean weights (a float model cannot use them)."""
        entry = self.entries[name]
        if not entry.dtype.is_floating_point:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {entry.dtype}, expected a float type")

    def view(self, name: str, param: torch.Tensor) -> torch.Tensor | None:
        """``param`` as a view of the mapped file, or None (not mapped, or another dtype)."""
        entry = self.entries[name]
        if self._mapped is None or entry.dtype != param.dtype:
            return None
        return view_in(self._mapped, entry.begin, entry.nbytes, param)

    def fill(self, name: str, dest: torch.Tensor, upload=None) -> None:
        """Copy tensor ``name`` into ``dest``. On a GPU, ``upload`` (a tracer.checkpoint.StagedUpload)
        reads the stored bytes into its pinned buffers and casts on the device. On the CPU, straight
        into ``dest`` when the dtype matches, else through a one-tensor buffer that ``copy_`` casts."""
        entry = self.entries[name]
        if upload is not None:
            upload.write(dest, entry.dtype, entry.nbytes,
                         lambda buf, offset: read_into(self._f, entry, self.path, buf, offset))
        elif dest.device.type == "cpu" and entry.dtype == dest.dtype and dest.is_contiguous() and entry.nbytes:
            read_into(self._f, entry, self.path, dest.view(-1).view(torch.uint8))
        else:
            dest.copy_(read_tensor(self._f, entry, self.path).view(dest.shape))

    def close(self) -> None:
        """Close the file (views of the mapping stay valid: the map lives while they do)."""
        self._f.close()
