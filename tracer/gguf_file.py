"""The GGUF format: llama.cpp's single file (what Ollama, LM Studio and llama.cpp users hold).

One file carries everything a hub repo spreads over several: the config and the tokenizer as typed
metadata (``llama.block_count``, ``tokenizer.ggml.tokens``...), then the tensors, most often
quantized in blocks (Q4_1: 32 weights in 20 bytes, a scale and a minimum per block).

    "GGUF" | version u32 | tensor count u64 | metadata count u64
    metadata: key (string) | value type u32 | value          (strings are u64 length + UTF-8)
    tensor infos: name | n_dims u32 | dims u64 x n (fastest first) | ggml type u32 | offset u64
    padding to ``general.alignment`` (32) | tensor data (offsets are relative to its start)

We parse the header ourselves: every count and offset is checked against the file's size before it
is trusted, so a truncated or lying file is named in one line, and the 49152-entry vocabulary reads
in milliseconds. The ``gguf`` library (llama.cpp's own Python package) supplies what it knows best:
the type ids, the block sizes and the dequantization of the block types that
``tracer.gguf_blocks`` (shared with the quantized layers of ``tracer.quant``) does not decode itself.

:class:`GGUFWeights` is this format's side of the tensor-by-tensor loader in ``tracer.checkpoint``
(the safetensors side is ``tracer.safetensors_file``): it names each tensor as the hub does, so the
shared loader maps both formats with one table, and it undoes llama.cpp's q/k row permutation.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import dtypes
from .errors import CheckpointError
from .gguf_blocks import TYPES as BLOCK_TYPES
from .gguf_blocks import dequantize as dequantize_blocks
from .safetensors_file import map_file, view_in

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted in 32 bits; llama.cpp dropped it in 2023
DEFAULT_ALIGNMENT = 32

# Metadata value types (gguf.GGUFValueType): fixed-size ones as struct formats.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# Plain float types: stored as values, so a tensor can be a view of the file (no dequantization).
PLAIN = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

# llama.cpp tensor names -> the hub's (after "blk.{i}." / "model.layers.{i}.").
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
}
TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1's rope scaling, as per-frequency divisors


def hub_name(gguf_name: str) -> str | None:
    """The hub (transformers) name of a llama.cpp tensor name, or None for an unknown one."""
    if gguf_name in TOP_NAMES:
        return TOP_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)  # blk, i, rest
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    return None


# ---------------------------------------------------------------------------------------------
# The header, checked


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor's place in a GGUF file."""

    name: str  # llama.cpp's name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]  # torch order (rows, cols): the file lists dims fastest first
    type_name: str  # ggml type, e.g. "Q4_1", "F32"
    type_id: int
    begin: int  # absolute file offset
    nbytes: int

    @property
    def stored(self) -> str:
        """How the tensor is stored, as the load trace names it ("float16", "Q4_1", ...)."""
        plain = PLAIN.get(self.type_name)
        return dtypes.name_of(plain) if plain is not None else self.type_name

    @property
    def row_bytes(self) -> int:
        """Bytes per row (per index of the first torch dim: whole blocks, contiguous in the file)."""
        return self.nbytes // self.shape[0] if len(self.shape) > 1 and self.shape[0] else self.nbytes


@dataclass(frozen=True)
class SkippedStrings:
    """A string array the header parse walked past without decoding (its length is known)."""

    count: int

    def __len__(self) -> int:
        return self.count


class _Cursor:
    """Reads the header from a byte buffer, refusing to run past the end of the file."""

    def __init__(self, buf, path: Path, keep_strings=()) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)
        self.keep_strings = keep_strings

    def take(self, n: int, what: str) -> int:
        """Advance by ``n`` bytes; returns where they start. Past the end is a truncated header."""
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(
                f"{self.path}: the file ends inside its header (reading {what} at byte {self.pos} of "
                f"{self.size}): truncated, or its counts are corrupt (re-download it)"
            )
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("<Q", what)
        start = self.take(n, what)
        try:
            return bytes(self.buf[start : start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} is not valid UTF-8: corrupt file") from None

    def value(self, vtype: int, key: str):
        """One metadata value of type ``vtype``; numeric arrays come back as numpy arrays."""
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype], f"metadata {key!r}")[0]
        if vtype == _STRING:
            return self.string(f"metadata {key!r}")
        if vtype == _ARRAY:
            etype, count = self.unpack("<IQ", f"metadata {key!r}")
            if etype in _NUMPY:
                dt = np.dtype(_NUMPY[etype])
                start = self.take(count * dt.itemsize, f"metadata {key!r}")
                return np.frombuffer(self.buf, dt, count, start).copy()
            if etype == _STRING and key in self.keep_strings:
                return [self.string(f"metadata {key!r}[{i}]") for i in range(count)]
            if etype == _STRING:  # a vocabulary nobody asked for: walk it, decode nothing
                for _ in range(count):
                    (n,) = self.unpack("<Q", f"metadata {key!r}")
                    self.take(n, f"metadata {key!r}")
                return SkippedStrings(count)
            if etype == _ARRAY:  # nested arrays: no Llama key uses them; walk them to skip
                return [self.value(_ARRAY, key) for _ in range(count)]
        raise CheckpointError(f"{self.path}: metadata {key!r} has unknown value type {vtype}: corrupt file")


def _type_info(type_id: int, name: str, path: Path) -> tuple[str, int, int]:
    """(type name, block size, bytes per block) of a ggml type id; unknown ids are refused."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise CheckpointError(
            f"{path}: tensor {name!r} has ggml type id {type_id}, which the installed gguf library "
            "does not know: a newer llama.cpp format? (pip install -U gguf) or a corrupt file"
        ) from None
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    return qtype.name, block, block_bytes


def _tensor_info(cur: _Cursor, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string("a tensor name")
    (n_dims,) = cur.unpack("<I", f"tensor {name!r}")
    if not 1 <= n_dims <= 4:
        raise CheckpointError(f"{path}: tensor {name!r} claims {n_dims} dimensions (1-4 expected): corrupt file")
    dims = cur.unpack(f"<{n_dims}Q", f"tensor {name!r}")
    type_id, offset = cur.unpack("<IQ", f"tensor {name!r}")
    return name, tuple(reversed(dims)), type_id, offset


def _checked_tensor(path, info, data_start, alignment, size) -> GGUFTensor:
    name, shape, type_id, offset = info
    type_name, block, block_bytes = _type_info(type_id, name, path)
    if shape[-1] % block:
        raise CheckpointError(
            f"{path}: tensor {name!r} rows of {shape[-1]} values are not whole {type_name} blocks of "
            f"{block}: corrupt file"
        )
    nbytes = int(np.prod(shape, dtype=np.int64)) // block * block_bytes
    begin = data_start + offset
    if offset % alignment:
        raise CheckpointError(f"{path}: tensor {name!r} starts at offset {offset}, not aligned to {alignment}: corrupt file")
    if begin + nbytes > size:
        raise CheckpointError(
            f"{path}: tensor {name!r} ({type_name}, {nbytes} bytes) ends at byte {begin + nbytes} but "
            f"the file has {size} bytes: the file is truncated (re-download it)"
        )
    return GGUFTensor(name, shape, type_name, type_id, begin, nbytes)


@dataclass
class GGUFFile:
    """A GGUF file's header: metadata and the table of tensors, all checked against its size."""

    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]  # by llama.cpp name, in file order
    data_start: int

    @classmethod
    def open(cls, path: str | os.PathLike, *, strings=()) -> GGUFFile:
        """Read and check the header of the GGUF file at ``path`` (no tensor data is read).

        String arrays are decoded only for the keys in ``strings`` (the tokenizer asks for its
        vocabulary and merges); others are :class:`SkippedStrings`, which keep their length.
        """
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size < 24 or f.read(4) != MAGIC:
                raise CheckpointError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return cls._parse(path, buf, size, strings)

    @classmethod
    def _parse(cls, path: Path, buf, size: int, strings) -> GGUFFile:
        cur = _Cursor(buf, path, strings)
        cur.take(4, "the magic")
        version, n_tensors, n_kv = cur.unpack("<IQQ", "the counts")
        if version not in VERSIONS:
            raise CheckpointError(f"{path}: GGUF version {version}; this reader handles versions {list(VERSIONS)}")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("a metadata key")
            (vtype,) = cur.unpack("<I", f"metadata {key!r}")
            metadata[key] = cur.value(vtype, key)
        infos = [_tensor_info(cur, path) for _ in range(n_tensors)]
        alignment = int(metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if alignment <= 0 or alignment & (alignment - 1):
            raise CheckpointError(f"{path}: general.alignment is {alignment}, not a power of two: corrupt file")
        data_start = -(-cur.pos // alignment) * alignment
        tensors = {i[0]: _checked_tensor(path, i, data_start, alignment, size) for i in infos}
        return cls(path, version, metadata, tensors, data_start)

    # --- what the file says -------------------------------------------------------------------
    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def require_llama(self) -> None:
        """Refuse a file of another architecture, naming it."""
        arch = self.architecture
        if arch != "llama":
            raise CheckpointError(
                f"{self.path}: general.architecture is {arch!r}, but this runtime runs only 'llama' "
                "GGUF files (Llama 1/2/3, SmolLM2, TinyLlama...); use llama.cpp for other architectures"
            )

    def require_decodable(self) -> None:
        """Refuse, before anything is allocated, a tensor type nothing here can dequantize."""
        for t in {t.type_name: t for t in self.tensors.values()}.values():
            if t.type_name in PLAIN or t.type_name in BLOCK_TYPES:
                continue
            _, block, block_bytes = _type_info(t.type_id, t.name, self.path)
            one_block = GGUFTensor(t.name, (block,), t.type_name, t.type_id, 0, block_bytes)
            try:
                dequantize_with_gguf(np.zeros(one_block.nbytes, dtype=np.uint8), one_block)
            except CheckpointError as exc:
                raise CheckpointError(f"{self.path}: {exc}") from None

    def type_counts(self) -> dict[str, int]:
        """How many tensors of each ggml type the file holds (its quantization at a glance)."""
        counts: dict[str, int] = {}
        for t in self.tensors.values():
            counts[t.type_name] = counts.get(t.type_name, 0) + 1
        return counts

    def stored(self) -> dict[str, dict[str, int]]:
        """Per ggml type: its tensors and their bytes in the file (what a quantized load keeps)."""
        out: dict[str, dict[str, int]] = {}
        for t in self.tensors.values():
            row = out.setdefault(t.type_name, {"tensors": 0, "bytes": 0})
            row["tensors"] += 1
            row["bytes"] += t.nbytes
        return out

    def float_dtype(self) -> str:
        """The 16/32-bit type the file's weights stand for: bfloat16 if any tensor is BF16, float32
        if every tensor is F32, else float16 (block scales are float16 in every llama.cpp type)."""
        types = set(self.type_counts())
        if "BF16" in types:
            return dtypes.BFLOAT16.name
        return (dtypes.FLOAT32 if types == {"F32"} else dtypes.FLOAT16).name


# ---------------------------------------------------------------------------------------------
# Metadata -> a hub-style config dict


def _key(g: GGUFFile, name: str, default: Any = ...) -> Any:
    value = g.metadata.get(f"llama.{name}", default)
    if value is ...:
        raise CheckpointError(f"{g.path}: GGUF metadata 'llama.{name}' is missing; the file is incomplete")
    return value.item() if isinstance(value, np.generic) else value


def hf_config(g: GGUFFile) -> dict[str, Any]:
    """The file's metadata as a transformers-style config.json dict, read as transformers' GGUF
    reader does (``integrations/ggml.py``'s GGUF_CONFIG_MAPPING for "llama"), plus the rope scaling
    llama.cpp records (a linear factor in the metadata; Llama 3.1's as the ``rope_freqs`` tensor,
    see :func:`rope_freq_factors`)."""
    g.require_llama()
    g.require_decodable()
    heads = _key(g, "attention.head_count")
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": _key(g, "embedding_length"),
        "intermediate_size": _key(g, "feed_forward_length"),
        "num_hidden_layers": _key(g, "block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _key(g, "attention.head_count_kv", heads),
        "max_position_embeddings": _key(g, "context_length", 2048),
        "rms_norm_eps": _key(g, "attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": _key(g, "rope.freq_base", 10000.0),
        "vocab_size": _key(g, "vocab_size", len(tokens) if tokens is not None else None),
        # llama.cpp writes output.weight only when it is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": _int_or_none(g.metadata.get("tokenizer.ggml.bos_token_id")),
        "eos_token_id": _int_or_none(g.metadata.get("tokenizer.ggml.eos_token_id")),
        "pad_token_id": _int_or_none(g.metadata.get("tokenizer.ggml.padding_token_id")),
        "torch_dtype": g.float_dtype(),
        "attention_bias": "blk.0.attn_q.bias" in g.tensors,
    }
    dim = _key(g, "rope.dimension_count", None)
    if dim is not None:
        config["head_dim"] = dim
    scaling = _key(g, "rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(_key(g, "rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raise CheckpointError(
            f"{g.path}: rope scaling {scaling!r} (llama.rope.scaling.type) is not supported here; "
            "this runtime runs default, linear and Llama 3 rope"
        )
    return config


def _int_or_none(v) -> int | None:
    return None if v is None else int(v)


def rope_freq_factors(g: GGUFFile) -> torch.Tensor | None:
    """Llama 3.1's rope scaling as llama.cpp stores it: the ``rope_freqs`` tensor of per-frequency
    divisors (a frequency is divided by its factor), or None when the file has none."""
    t = g.tensors.get(ROPE_FREQS)
    if t is None:
        return None
    with open(g.path, "rb") as f:
        return torch.from_numpy(_dequantize(_read(f, t.begin, t.nbytes, g.path, t.name), t)).reshape(-1)


# ---------------------------------------------------------------------------------------------
# Tensors: read, dequantize, un-permute


def _read(f, begin: int, nbytes: int, path: Path, name: str) -> np.ndarray:
    """``nbytes`` at ``begin`` as a fresh uint8 array (a plain read: the file's pages go to the page
    cache, not to this process's resident memory, as a mapping's would)."""
    buf = np.empty(nbytes, dtype=np.uint8)
    got = os.preadv(f.fileno(), [memoryview(buf)], begin) if nbytes else 0
    if got != nbytes:
        raise CheckpointError(f"{path}: tensor {name!r} is truncated ({got} of {nbytes} bytes)")
    return buf


def _dequantize(raw: np.ndarray, t: GGUFTensor) -> np.ndarray:
    """Rows of ``t`` as float32 [rows, cols]: llama.cpp's block formats, decoded. The formats most
    files use (``tracer.gguf_blocks.TYPES``: SmolLM2's Q4_1 and Q8_0, the classic Q4_0, Q4_K_M's
    Q4_K and Q6_K) are decoded in torch, on every core, bit for bit as the gguf library decodes
    them; the others go through the library."""
    kind = BLOCK_TYPES.get(t.type_name)
    if kind is None:
        return dequantize_with_gguf(raw, t)
    columns = t.row_bytes // kind.bytes * kind.block
    return dequantize_blocks(raw, kind, (raw.size // t.row_bytes, columns)).numpy()


def dequantize_with_gguf(raw: np.ndarray, t: GGUFTensor) -> np.ndarray:
    """Rows of ``t`` as float32 [rows, cols], by the gguf library (llama.cpp's own Python code)."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    try:
        out = dequantize(raw.reshape(-1, t.row_bytes), GGMLQuantizationType(t.type_id))
    except NotImplementedError:
        raise CheckpointError(
            f"tensor {t.name!r} is stored as {t.type_name}, which the gguf library cannot dequantize; "
            f"supported here: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K and the IQ types"
        ) from None
    return out.astype(np.float32, copy=False)


def unpermute_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row order. llama.cpp's rotary embedding rotates neighbouring pairs
    (2i, 2i + 1) of each head, while transformers' (and ours) rotates the pairs (i, i + d/2), so its
    converter reorders each head's rows; within a head, file row 2i + j is our row j*d/2 + i."""
    rows = w.shape[0]
    d = rows // heads
    return w.reshape(heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


@dataclass(frozen=True)
class StoredBlocks:
    """A 2-D tensor's bytes as the file stores them: a view of the memory-mapped file, no copy."""

    blocks: torch.Tensor  # uint8 [rows, bytes per row]
    type_name: str  # ggml type, e.g. "Q4_1"
    shape: tuple[int, int]  # the values it stands for, [rows, cols]
    row_order: torch.Tensor | None  # our row i is stored row row_order[i] (llama.cpp's q/k), or None


# Dequantize this many values at a time: bounds the float32 scratch to 64 MB whatever the tensor.
CHUNK_VALUES = 16 * 1024 * 1024


class GGUFWeights:
    """A GGUF file opened for the tensor-by-tensor loader, its tensors named as the hub names them.

    ``fill`` dequantizes a tensor (rows in chunks, so scratch memory stays bounded) and undoes the
    q/k permutation; ``view`` maps a plain float tensor that needs neither straight from the file.
    """

    format = "gguf"

    def __init__(self, g: GGUFFile, *, heads: int, kv_heads: int, mapped: bool) -> None:
        self.path, self.g = g.path, g
        self.entries = {hub_name(n): t for n, t in g.tensors.items() if hub_name(n) is not None}
        self.unknown = [n for n in g.tensors if hub_name(n) is None and n != ROPE_FREQS]
        self._heads = {"q_proj": heads, "k_proj": kv_heads}
        self._f = open(self.path, "rb")
        self._mapped = map_file(self._f) if mapped else None

    def check_dtype(self, name: str) -> None:
        """Every ggml type here is a float type or blocks of one; the type itself was checked."""

    def _permuted_heads(self, name: str) -> int | None:
        """Heads of a q or k projection (weight or bias: llama.cpp permutes both), else None."""
        return self._heads.get(name.rsplit(".", 2)[-2])  # "q_proj" in "...self_attn.q_proj.weight"

    def view(self, name: str, param: torch.Tensor) -> torch.Tensor | None:
        """``param`` as a view of the mapped file: plain floats of its dtype, not permuted."""
        t = self.entries[name]
        if self._mapped is None or PLAIN.get(t.type_name) != param.dtype or self._permuted_heads(name):
            return None
        return view_in(self._mapped, t.begin, t.nbytes, param)

    def stored_blocks(self, name: str) -> StoredBlocks | None:
        """Matrix ``name`` as the file stores it (a quantized load keeps these bytes and multiplies
        by them, ``tracer.quant``), with the order that undoes the q/k permutation; None for a
        vector, or when the file is not mapped."""
        t = self.entries[name]
        if self._mapped is None or len(t.shape) != 2:
            return None
        heads = self._permuted_heads(name)
        order = unpermute_rows(torch.arange(t.shape[0]), heads) if heads else None
        raw = self._mapped[t.begin : t.begin + t.nbytes].view(t.shape[0], t.row_bytes)
        return StoredBlocks(raw, t.type_name, (t.shape[0], t.shape[1]), order)

    def fill(self, name: str, dest: torch.Tensor, upload=None) -> None:
        """Dequantize tensor ``name`` into ``dest`` (cast to its dtype), rows in chunks. On a GPU,
        ``upload`` (a tracer.checkpoint.StagedUpload) moves each chunk and casts it on the device."""
        t = self.entries[name]
        heads = self._permuted_heads(name)
        put = upload.put if upload is not None else torch.Tensor.copy_
        if len(t.shape) == 1:  # a norm or a bias: small, in one read
            raw = _read(self._f, t.begin, t.nbytes, self.path, t.name)
            values = torch.from_numpy(self._values(raw, t)).reshape(-1)
            put(dest, unpermute_rows(values, heads) if heads else values)
            return
        rows = t.shape[0]
        step = self._chunk_rows(t, rows, heads)
        flat = dest.view(rows, -1)
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            raw = _read(self._f, t.begin + r0 * t.row_bytes, (r1 - r0) * t.row_bytes, self.path, t.name)
            chunk = torch.from_numpy(self._values(raw, t)).view(r1 - r0, -1)
            if heads:
                chunk = unpermute_rows(chunk, (r1 - r0) * heads // rows)
            put(flat[r0:r1], chunk)

    @staticmethod
    def _chunk_rows(t: GGUFTensor, rows: int, heads: int | None) -> int:
        cols = int(np.prod(t.shape[1:]))
        step = max(1, CHUNK_VALUES // max(cols, 1))
        if heads:  # whole heads at a time: the permutation stays inside a head
            per_head = rows // heads
            step = max(per_head, step // per_head * per_head)
        return min(step, rows)

    @staticmethod
    def _values(raw: np.ndarray, t: GGUFTensor) -> np.ndarray:
        if t.type_name == "F32":
            return raw.view(np.float32)
        if t.type_name == "F16":
            return raw.view(np.float16)  # copy_ widens it on the way into the parameter
        if t.type_name == "BF16":  # numpy has no bfloat16: widen the 16 high bits to float32
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return _dequantize(raw, t)

    def close(self) -> None:
        self._f.close()
