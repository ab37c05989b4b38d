"""A GGUF writer for Llama checkpoints that llama.cpp and transformers' GGUF reader both load.

It writes what llama.cpp's ``convert_hf_to_gguf.py`` writes for a Llama: ``llama.*`` hyper-parameters,
``general.*`` keys, optional ``tokenizer.*`` metadata, and the tensors under llama.cpp's names with
the q/k rows permuted for its rotary layout, matrices in one ggml type (F32, F16, BF16 or a 32-block
quant that ``gguf.quants.quantize`` implements) and 1-D norm weights in F32.

Streaming: ``GGUFWriter.add_tensor`` keeps a reference to every array until ``write_tensors_to_file``,
so a 7B model would sit in memory whole. The tensor table only needs names, shapes and byte sizes,
which the config gives, so ``add_tensor_info`` records them all first; the header, metadata and
table are written; then each tensor is quantized and written at its offset as it arrives, in any
order, and dropped. Peak memory is about one tensor (plus its quantized bytes).

The file is written under a temporary name and renamed at the end, so a crash leaves no
half-written ``.gguf``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tracer.config import LlamaConfig

if TYPE_CHECKING:
    import gguf

# HF tensor name (after "model.layers.{i}.") -> GGUF tensor name (after "blk.{i}."), as in
# gguf-py's tensor_mapping.py for MODEL_ARCH.LLAMA.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}

# The matrix types this writer can produce: those gguf.quants.quantize implements for dense
# Llama weights (the K-quants and IQ types are dequantize-only in gguf-py; llama-quantize makes them).
MATRIX_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")

# general.file_type for a file whose matrices are in a given type (llama.h's llama_ftype).
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
              "Q5_1": "MOSTLY_Q5_1", "Q5_0": "MOSTLY_Q5_0", "Q4_1": "MOSTLY_Q4_1", "Q4_0": "MOSTLY_Q4_0"}


# Block types gguf.quants cannot make (it only dequantizes them): written as random blocks with sane
# scales (random_blocks), for files that are read for their speed and memory, not their answers.
RANDOM_BLOCK_TYPES = ("Q4_K", "Q6_K")

# llama.cpp's mixed file types written here (random blocks) -> general.file_type. Which tensor takes
# which type is tracer.requant.tensor_types (llama-quant.cpp's rule, declared once there).
MIXES = {"Q4_K_M": "MOSTLY_Q4_K_M"}


def random_blocks(qtype: str, shape: tuple[int, int], seed: list[int], std: float = 0.02) -> np.ndarray:
    """Random ``qtype`` blocks for a [rows, cols] matrix: random codes and sub-block scales, with the
    float16 super-block scales set so that the values have a standard deviation near ``std``."""
    import gguf

    rows, cols = shape
    block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    raw = np.random.default_rng(seed).integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    if qtype == "Q4_K":  # d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit codes
        # value = d * scale * q - dmin * min, scale and min ~ U(0, 63), q ~ U(0, 15): dmin = 7.5 d centres it.
        d = std / (31.5 * 4.6 * 1.15)
        raw[..., 0:2] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
        raw[..., 2:4] = np.frombuffer(np.float16(7.5 * d).tobytes(), np.uint8)
    elif qtype == "Q6_K":  # 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, d
        d = std / (74.0 * 18.5)  # value = d * scale * (q - 32), scale ~ U(-128, 127), q ~ U(0, 63)
        raw[..., 208:210] = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    else:
        raise ValueError(f"no random blocks for {qtype!r}; these are: {', '.join(RANDOM_BLOCK_TYPES)}")
    return raw.reshape(rows, -1)


def rope_pairs_to_neighbours(w: np.ndarray, heads: int) -> np.ndarray:
    """Re-order a q/k projection's rows from HF's half-split RoPE layout to llama.cpp's interleaved
    one (llama.cpp's converter permutes q/k rows this way; transformers' reader undoes it)."""
    out, cols = w.shape
    d = out // heads
    return w.reshape(heads, 2, d // 2, cols).transpose(0, 2, 1, 3).reshape(out, cols)


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers Llama tensor name."""
    if hf_name in TOP_NAMES:
        return TOP_NAMES[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, i, rest
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in LAYER_NAMES:
        raise ValueError(f"no GGUF name for tensor {hf_name!r}")
    return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}"


@dataclasses.dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the file: its names, its shape (numpy/torch order) and how it is stored."""

    hf_name: str | None  # None for tensors the writer makes itself (rope_freqs)
    name: str
    shape: tuple[int, ...]
    qtype_name: str
    rope_heads: int | None = None  # q/k projections: heads to permute over

    @property
    def nbytes(self) -> int:
        """Bytes in the file (before alignment padding)."""
        import gguf

        qtype = gguf.GGMLQuantizationType[self.qtype_name]
        return prod(gguf.quants.quant_shape_to_byte_shape(self.shape, qtype))


def stored_type(qtype: str, shape: tuple[int, ...]) -> str:
    """The type a tensor of ``shape`` is stored in when ``qtype`` is asked for: 1-D tensors stay F32
    (llama.cpp's converter keeps norms and rope_freqs in F32), and a row length that is not a
    multiple of the quant block falls back to F16 (the converter's fallback on a QuantError)."""
    import gguf

    if len(shape) <= 1:
        return "F32"
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    return qtype if shape[-1] % block == 0 else "F16"


def check_qtype(qtype: str) -> str:
    """``qtype`` if this writer can produce it, else a ValueError naming the ones it can."""
    if qtype not in MATRIX_TYPES:
        raise ValueError(f"GGUF matrix type {qtype!r} cannot be written with gguf.quants; "
                         f"choose one of {', '.join(MATRIX_TYPES)}")
    return qtype


def tensor_plan(cfg: LlamaConfig, qtype: str = "F16", *, embed_qtype: str | None = None,
                tie: bool | None = None) -> list[PlannedTensor]:
    """Every tensor a llama.cpp Llama file of this shape holds, in file order (rope_freqs first,
    as the converter's generate_extra_tensors comes first; output.weight only when untied)."""
    check_qtype(qtype)
    check_qtype(embed_qtype or qtype)
    tie = cfg.tie_word_embeddings if tie is None else tie
    D, F, V = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    hd, H, Hkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    shapes: list[tuple[str, tuple[int, ...], int | None]] = [("model.embed_tokens.weight", (V, D), None)]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (D,), None),
            (p + "self_attn.q_proj.weight", (H * hd, D), H),
            (p + "self_attn.k_proj.weight", (Hkv * hd, D), Hkv),
            (p + "self_attn.v_proj.weight", (Hkv * hd, D), None),
            (p + "self_attn.o_proj.weight", (D, H * hd), None),
            (p + "post_attention_layernorm.weight", (D,), None),
            (p + "mlp.gate_proj.weight", (F, D), None),
            (p + "mlp.up_proj.weight", (F, D), None),
            (p + "mlp.down_proj.weight", (D, F), None),
        ]
    shapes.append(("model.norm.weight", (D,), None))
    if not tie:
        shapes.append(("lm_head.weight", (V, D), None))
    plan = [PlannedTensor(None, "rope_freqs.weight", (hd // 2,), "F32")] if rope_divisors(cfg) is not None else []
    for hf, shape, heads in shapes:
        want = embed_qtype if hf == "model.embed_tokens.weight" and embed_qtype else qtype
        plan.append(PlannedTensor(hf, gguf_name(hf), shape, stored_type(want, shape), heads))
    return plan


def rope_divisors(cfg: LlamaConfig) -> np.ndarray | None:
    """Llama 3.1's rope_freqs tensor (unscaled / scaled inverse frequency, as llama.cpp's converter
    writes it), or None for a rope type that needs no tensor."""
    if cfg.rope.rope_type in ("default", "linear"):
        return None
    if cfg.rope.rope_type != "llama3":
        raise ValueError(f"rope_type {cfg.rope.rope_type!r} has no llama.cpp equivalent written here")
    from tracer.model import rope_inv_freq

    plain = dataclasses.replace(cfg, rope=dataclasses.replace(cfg.rope, rope_type="default"))
    return (rope_inv_freq(plain) / rope_inv_freq(cfg)).numpy().astype(np.float32)


def add_hparams(w: gguf.GGUFWriter, cfg: LlamaConfig) -> None:
    """The ``{arch}.*`` keys convert_hf_to_gguf.py writes for a Llama."""
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope.theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope.rope_type == "linear":
        import gguf

        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg.rope.factor)


def add_metadata(w: gguf.GGUFWriter, key: str, value: Any) -> None:
    """One metadata entry, typed as llama.cpp's converter types it: ints (token ids, counts) as
    uint32, lists as arrays of their element type (token types int32, scores float32)."""
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (bytes, list, tuple)):
        w.add_array(key, value if isinstance(value, bytes) else list(value))
    else:
        raise TypeError(f"GGUF metadata {key!r}: cannot write a {type(value).__name__}")


def encode(t: PlannedTensor, data: np.ndarray) -> np.ndarray:
    """A hub-layout float array as the bytes (or floats) the file stores for ``t``."""
    import gguf

    if tuple(data.shape) != t.shape:
        raise ValueError(f"tensor {t.hf_name}: shape {tuple(data.shape)}, expected {t.shape}")
    data = np.ascontiguousarray(data, dtype=np.float32)
    if t.rope_heads is not None:
        data = rope_pairs_to_neighbours(data, t.rope_heads)
    return np.ascontiguousarray(gguf.quants.quantize(data, gguf.GGMLQuantizationType[t.qtype_name]))


def open_writer(tmp: Path, cfg: LlamaConfig, plan: list[PlannedTensor], *, qtype: str, name: str,
                tokenizer: Mapping[str, Any] | None, architecture: str) -> gguf.GGUFWriter:
    """A GGUFWriter with header, metadata and tensor table written; its file sits at the data.
    ``qtype``: a matrix type or a mix (MIXES), for general.file_type."""
    import gguf

    w = gguf.GGUFWriter(str(tmp), architecture)
    w.add_type("model")
    w.add_name(name)
    add_hparams(w, cfg)
    w.add_file_type(gguf.LlamaFileType[{**FILE_TYPES, **MIXES}[qtype]])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (tokenizer or {}).items():
        add_metadata(w, key, value)
    for t in plan:
        # float32 with a raw_dtype: GGUFWriter then takes the shape as the logical one.
        w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[t.qtype_name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    return w


def data_offsets(plan: list[PlannedTensor], alignment: int) -> dict[str, int]:
    """Each tensor's offset from the start of the data section, as write_ti_data_to_file laid them out."""
    offsets, at = {}, 0
    for t in plan:
        offsets[t.name] = at
        at += -(-t.nbytes // alignment) * alignment
    return offsets


def stream_tensors(w: gguf.GGUFWriter, cfg: LlamaConfig, plan: list[PlannedTensor],
                   tensors: Iterable[tuple[str, np.ndarray]]) -> None:
    """Quantize and write each tensor at the offset the table gave it, as it arrives, and drop it.
    Offsets follow the table order (ggml's reader requires that), whatever order tensors come in."""
    fout = w.fout[0]
    w.write_padding(fout, fout.tell())  # the data section starts aligned, as write_tensors_to_file does
    start, offsets, done = fout.tell(), data_offsets(plan, w.data_alignment), set()
    by_hf = {t.hf_name: t for t in plan if t.hf_name}

    def put(t: PlannedTensor, data: np.ndarray) -> None:
        fout.seek(start + offsets[t.name])
        data.tofile(fout)
        w.write_padding(fout, data.nbytes)
        done.add(t.name)

    if (divisors := rope_divisors(cfg)) is not None:
        put(plan[0], divisors)
    for hf_name, data in tensors:
        t = by_hf.get(hf_name)
        if t is None and hf_name == "lm_head.weight":
            continue  # tied: llama.cpp reads the logits from token_embd
        if t is None:
            raise ValueError(f"tensor {hf_name!r} is not part of a Llama of this config")
        if t.name in done:
            raise ValueError(f"tensor {hf_name!r} given twice")
        put(t, encode(t, data))
        del data  # else the loop variable keeps this tensor alive while the next one is made
    missing = [t.hf_name for t in plan if t.name not in done]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"no data given for {missing[:5]}{more}")


def write_llama_gguf(path: str | os.PathLike, cfg: LlamaConfig, tensors: Iterable[tuple[str, np.ndarray]], *,
                     qtype: str = "F16", embed_qtype: str | None = None, tie: bool | None = None,
                     tokenizer: Mapping[str, Any] | None = None, name: str = "llama",
                     architecture: str = "llama") -> Path:
    """Write a llama.cpp Llama GGUF at ``path`` from ``(hub name, float array)`` pairs in any order.

    ``qtype``: the matrices' ggml type (see MATRIX_TYPES); ``embed_qtype``: the embedding's, if
    different (SmolLM2's Q4_K_M file keeps token_embd in Q8_0); ``tie``: no ``output.weight``
    (default: ``cfg.tie_word_embeddings``); a tied checkpoint's ``lm_head.weight``, if given, is
    skipped. ``tokenizer``: ``tokenizer.*`` metadata written as given (none when None).
    ``architecture`` is for tests that need a file of another architecture.
    """
    path = Path(path)
    plan = tensor_plan(cfg, qtype, embed_qtype=embed_qtype, tie=tie)
    tmp = path.with_name(path.name + ".partial")
    try:
        with contextlib.closing(open_writer(tmp, cfg, plan, qtype=qtype, name=name, tokenizer=tokenizer,
                                            architecture=architecture)) as w:
            stream_tensors(w, cfg, plan, tensors)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file, under either name
        raise
    return path


def random_tensor(shape: tuple[int, ...], seed: list[int], std: float) -> np.ndarray:
    """N(0, std) float32 of ``shape`` (numpy's float32 normal sampler: no float64 detour), or 1.0
    for a 1-D (norm) weight."""
    if len(shape) == 1:
        return np.ones(shape, np.float32)
    data = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    data *= np.float32(std)
    return data


def random_tensors(cfg: LlamaConfig, *, seed: int = 0, std: float = 0.02,
                   tie: bool | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Random weights of ``cfg``'s shape, one tensor at a time: N(0, std) float32 matrices, norms 1.0.
    Each tensor has its own generator (seed, index), so any tensor is reproducible on its own."""
    for i, t in enumerate(p for p in tensor_plan(cfg, "F32", tie=tie) if p.hf_name):
        # Made inside the yield: a local name would keep the array alive while the next is made.
        yield t.hf_name, random_tensor(t.shape, [seed, i], std)


def write_random_gguf(path: str | os.PathLike, cfg: LlamaConfig, *, qtype: str = "Q4_0", seed: int = 0,
                      std: float = 0.02, tokenizer: Mapping[str, Any] | None = None,
                      embed_qtype: str | None = None, name: str = "random-llama") -> Path:
    """A GGUF of random weights in ``cfg``'s shape (``random_tensors``), written tensor by tensor:
    a 7B-shape file never holds more than one tensor in memory."""
    tie = cfg.tie_word_embeddings
    return write_llama_gguf(path, cfg, random_tensors(cfg, seed=seed, std=std, tie=tie), qtype=qtype,
                            embed_qtype=embed_qtype, tie=tie, tokenizer=tokenizer, name=name)


def write_random_mixed_gguf(path: str | os.PathLike, cfg: LlamaConfig, *, mix: str = "Q4_K_M", seed: int = 0,
                            std: float = 0.02, tokenizer: Mapping[str, Any] | None = None,
                            name: str = "random-llama") -> Path:
    """A GGUF in llama.cpp's ``mix`` (e.g. Q4_K_M) with random blocks (:func:`random_blocks`; norms
    1.0), tensor by tensor, written under a temporary name and renamed at the end."""
    if mix not in MIXES:
        raise ValueError(f"mix {mix!r} is not written here; choose one of {', '.join(MIXES)}")
    from tracer.requant import tensor_types

    path, types = Path(path), tensor_types(cfg, mix)
    plan = [dataclasses.replace(t, qtype_name=types[t.name]) if len(t.shape) == 2 else t
            for t in tensor_plan(cfg, "F32", tie=cfg.tie_word_embeddings)]
    tmp = path.with_name(path.name + ".partial")
    try:
        with contextlib.closing(open_writer(tmp, cfg, plan, qtype=mix, name=name, tokenizer=tokenizer,
                                            architecture="llama")) as w:
            fout = w.fout[0]
            w.write_padding(fout, fout.tell())
            start, offsets = fout.tell(), data_offsets(plan, w.data_alignment)
            for i, t in enumerate(plan):
                data = (random_blocks(t.qtype_name, t.shape, [seed, i], std) if len(t.shape) == 2
                        else rope_divisors(cfg) if t.hf_name is None else np.ones(t.shape, np.float32))
                fout.seek(start + offsets[t.name])
                data.tofile(fout)
                w.write_padding(fout, data.nbytes)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
