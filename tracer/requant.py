"""Quantization taken apart (notebook 07): what a file of each type weighs, what one block holds,
and what rounding a float model to a block format does to it.

Three questions, three parts:

- **What does a file weigh?** :func:`tensor_types` says which ggml type llama.cpp's quantizer
  (``llama-quantize``) gives each tensor of a Llama for a file type ("F16", "Q8_0", "Q4_0",
  "Q4_1", "Q4_K_M": :data:`FILE_TYPES`), and :func:`bytes_by_type` / :func:`file_bytes` add up
  their bytes from the gguf library's block sizes. No file is needed: a config is enough.
- **What is in a block?** :func:`take_apart` reads 32-weight blocks (Q8_0, Q4_0, Q4_1) through
  the layout that ``tracer.gguf_blocks`` declares (:class:`~tracer.gguf_blocks.ScaledCodes`): the
  scale d, the minimum m, the integer codes q, and the values w = d * (q - zero) + m they stand for.
- **What does rounding cost the model?** :func:`requantize` rounds a float model's linear layers
  to a block format with the gguf library (llama.cpp's own Python quantizer) and returns a copy
  whose layers are :class:`~tracer.quant.QuantLinear` over the new bytes; the original is untouched.

The gguf library quantizes the 32-weight formats only (the K formats, 256-weight super-blocks with
scales of scales, it decodes but cannot write): :data:`QUANTIZABLE`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .config import LlamaConfig
from .errors import TracerError
from .gguf_blocks import TYPES, BlockType, ScaledCodes, as_bytes, block_type
from .model import LlamaModel, Stacked
from .quant import EachLayer, QuantLinear
from .trace import Trace

# The formats a block can be taken apart in and a float weight rounded to: the 32-weight ones,
# whose layout is a ScaledCodes (exactly those the gguf library can also quantize).
QUANTIZABLE: tuple[str, ...] = tuple(name for name, t in TYPES.items() if isinstance(t.decode, ScaledCodes))


class QuantizeError(TracerError):
    """A block format this module cannot take apart or quantize to."""


def _scaled(kind: str | BlockType, what: str) -> tuple[BlockType, ScaledCodes]:
    """``kind``'s BlockType and layout, or a QuantizeError naming it and the formats that work."""
    name = kind.name if isinstance(kind, BlockType) else str(kind)
    if name not in QUANTIZABLE:
        raise QuantizeError(f"{what} works on {', '.join(QUANTIZABLE)} blocks, not {name!r} "
                            "(the gguf library decodes the K formats but cannot quantize to them)")
    t = block_type(name)
    return t, t.decode


# ---------------------------------------------------------------------------------------------
# What a file weighs: llama.cpp's choice of type per tensor (src/llama-quant.cpp,
# llama_tensor_get_type), for a Llama without biases and the file types below.

FILE_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q4_K_M")
# Q4_K_M is "mostly Q4_K": its default type, with some tensors given more bits (below).
_DEFAULT = {"Q4_K_M": "Q4_K"}
# Q4_K_M gives these Q6_K in the layers use_more_bits picks: the first and last eighth, every third between.
_MORE_BITS = ("attn_v.weight", "ffn_down.weight")
# A tensor whose rows are not whole blocks of its type falls back to a 32-weight format.
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def gguf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Llama GGUF by llama.cpp's name, in file order, with its torch shape
    (rows, row length); a tied model has no ``output.weight`` (the embedding serves)."""
    D, F = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    layer = {"attn_norm.weight": (D,), "attn_q.weight": (q, D), "attn_k.weight": (kv, D),
             "attn_v.weight": (kv, D), "attn_output.weight": (D, q), "ffn_norm.weight": (D,),
             "ffn_gate.weight": (F, D), "ffn_up.weight": (F, D), "ffn_down.weight": (D, F)}
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (cfg.vocab_size, D)}
    for i in range(cfg.num_hidden_layers):
        shapes.update({f"blk.{i}.{name}": shape for name, shape in layer.items()})
    shapes["output_norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, D)
    return shapes


def block_size(kind: str) -> tuple[int, int]:
    """(weights, bytes) of one block of ggml type ``kind`` ("F32" and "F16": one weight), from the
    gguf library's table (imported when first asked: 0.3 s)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[kind]]


def bits_per_weight(kind: str) -> float:
    """Bits one weight takes in ``kind``, its share of the scales included (Q4_1: 160 / 32 = 5)."""
    weights, nbytes = block_size(kind)
    return 8 * nbytes / weights


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, and every third between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def _fitting(kind: str, row: int, name: str) -> str:
    """``kind``, or its fallback where a row of ``row`` weights is not whole blocks of it."""
    if row % block_size(kind)[0] == 0:
        return kind
    if kind in _FALLBACK and row % block_size(_FALLBACK[kind])[0] == 0:
        return _FALLBACK[kind]
    raise QuantizeError(f"{name}: rows of {row} weights are not whole {kind} blocks, and llama.cpp has no fallback")


def tensor_types(cfg: LlamaConfig, ftype: str) -> dict[str, str]:
    """The ggml type llama.cpp's quantizer gives each tensor (:func:`gguf_shapes`) of a file of
    type ``ftype`` (:data:`FILE_TYPES`): norms stay F32; the output matrix (the embedding, in a
    tied model) gets Q6_K unless the file is Q8_0; Q4_K_M also gives Q6_K to attn_v and ffn_down in
    the layers ``use_more_bits`` picks; rows that are not whole blocks fall back (Q6_K -> Q8_0)."""
    if ftype not in FILE_TYPES:
        raise QuantizeError(f"no type rule for file type {ftype!r}; these are: {', '.join(FILE_TYPES)}")
    shapes = gguf_shapes(cfg)
    default = _DEFAULT.get(ftype, ftype)
    output = "output.weight" if "output.weight" in shapes else "token_embd.weight"
    types = {}
    for name, shape in shapes.items():
        if len(shape) == 1 or ftype == "F16":
            types[name] = "F32" if len(shape) == 1 else "F16"
            continue
        kind = default
        if name == output and default != "Q8_0":
            kind = "Q6_K"
        elif ftype == "Q4_K_M" and name.endswith(_MORE_BITS) and _more_bits(int(name.split(".")[1]),
                                                                           cfg.num_hidden_layers):
            kind = "Q6_K"
        types[name] = _fitting(kind, shape[-1], name)
    return types


def bytes_by_type(cfg: LlamaConfig, ftype: str) -> dict[str, dict[str, int]]:
    """Per ggml type in a file of type ``ftype``: its tensors, weights and bytes (tensor data only:
    the header and the tokenizer add about a megabyte)."""
    shapes, out = gguf_shapes(cfg), {}
    for name, kind in tensor_types(cfg, ftype).items():
        weights = math.prod(shapes[name])
        per_block, nbytes = block_size(kind)
        row = out.setdefault(kind, {"tensors": 0, "weights": 0, "bytes": 0})
        row["tensors"] += 1
        row["weights"] += weights
        row["bytes"] += weights // per_block * nbytes
    return out


def file_bytes(cfg: LlamaConfig, ftype: str) -> int:
    """Bytes of a file of type ``ftype``'s tensor data (:func:`bytes_by_type`, summed)."""
    return sum(row["bytes"] for row in bytes_by_type(cfg, ftype).values())


# ---------------------------------------------------------------------------------------------
# One block, taken apart


@dataclass(frozen=True)
class BlockParts:
    """32-weight blocks taken apart (:func:`take_apart`): each block's scale d and minimum m (float16
    in the file, here float32), its codes q, and the values w = d * (q - zero) + m they stand for."""

    kind: str
    scales: torch.Tensor  # float32 [n]: d
    minimums: torch.Tensor | None  # float32 [n]: m (Q4_1); None where the format has none (Q8_0, Q4_0)
    zero: int  # the code that stands for 0 (Q4_0: 8)
    code_range: tuple[int, int]  # the smallest and largest code (4 bits: 0..15; Q8_0: -128..127)
    codes: torch.Tensor  # int64 [n, 32], in weight order
    values: torch.Tensor  # float32 [n, 32], equal to tracer.gguf_blocks.dequantize of the same bytes

    def __len__(self) -> int:
        return self.scales.numel()

    @property
    def levels(self) -> torch.Tensor:
        """[n, number of codes]: the value each possible code stands for, lowest code first (the
        grid a block's weights are rounded to: 16 evenly spaced values for the 4-bit formats)."""
        lo, hi = self.code_range
        grid = self.scales[:, None] * (torch.arange(lo, hi + 1) - self.zero).float()
        return grid + self.minimums[:, None] if self.minimums is not None else grid

    def block(self, i: int) -> BlockParts:
        """Block ``i`` alone."""
        at = slice(i, i + 1) if i >= 0 else slice(i, i + 1 or None)
        return BlockParts(self.kind, self.scales[at], None if self.minimums is None else self.minimums[at],
                          self.zero, self.code_range, self.codes[at], self.values[at])


def take_apart(blocks, kind: str | BlockType) -> BlockParts:
    """Blocks of ``kind`` (Q8_0, Q4_0, Q4_1: :data:`QUANTIZABLE`), as bytes (a row of a
    QuantLinear's ``blocks``, a numpy array, bytes), taken apart into their fields."""
    t, layout = _scaled(kind, "take_apart")
    raw = as_bytes(blocks)
    if raw.numel() % t.bytes:
        raise ValueError(f"{raw.numel()} bytes are not whole {t.name} blocks of {t.bytes} bytes")
    raw = raw.view(-1, t.bytes)
    return BlockParts(t.name, layout.d(raw)[:, 0], layout.m(raw)[:, 0] if layout.minimum else None,
                      layout.zero, layout.code_range, layout.codes(raw).long(), layout(raw))


def quantize(weights: torch.Tensor, kind: str | BlockType) -> torch.Tensor:
    """Float ``weights`` [..., k] (k whole blocks) rounded to ``kind`` by the gguf library
    (``gguf.quants.quantize``, llama.cpp's reference rounding): uint8 [..., bytes of a row]."""
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize

    t, _ = _scaled(kind, "quantize")
    w = weights.detach().to("cpu", torch.float32)
    t.row_bytes(w.shape[-1])  # whole blocks, or a ValueError naming the type
    return torch.from_numpy(np.ascontiguousarray(gguf_quantize(w.numpy(), GGMLQuantizationType[t.name])))


# ---------------------------------------------------------------------------------------------
# A whole model, rounded


def weight_bytes(module: nn.Module) -> int:
    """Bytes of the weights of the linear layers in ``module`` (a model's ``blocks``, say) as they
    are held: a QuantLinear's blocks, an nn.Linear's float weight."""
    total = 0
    for m in module.modules():
        if isinstance(m, QuantLinear):
            total += m.blocks.numel()
        elif isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


@dataclass(frozen=True)
class LogitGap:
    """How far a model's logits moved from a reference's on the same ids (:func:`logit_gap`)."""

    max_abs: float  # the largest |logit difference| over every position and token
    kl: float  # KL(reference || other) in nats, averaged over positions: the information lost
    same_top1: float  # the share of positions whose most likely next token did not change


def logit_gap(reference: torch.Tensor, other: torch.Tensor) -> LogitGap:
    """Logits [T, V] of a model against a reference's on the same T tokens."""
    ref, out = reference.detach().float().cpu(), other.detach().float().cpu()
    if ref.shape != out.shape:
        raise ValueError(f"logits of shapes {tuple(ref.shape)} and {tuple(out.shape)} do not compare")
    ref, out = ref.reshape(-1, ref.shape[-1]), out.reshape(-1, out.shape[-1])
    log_p, log_q = torch.log_softmax(ref, -1), torch.log_softmax(out, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    same = (ref.argmax(-1) == out.argmax(-1)).float().mean()
    return LogitGap(float((ref - out).abs().max()), float(kl), float(same))


def requantize(llm_or_model, kind: str | BlockType):
    """A copy of a Llama (``tracer.load``'s) or a LlamaModel whose linear layers are
    :class:`~tracer.quant.QuantLinear` over their float weights rounded to ``kind`` (Q8_0, Q4_0,
    Q4_1), in the model's own row order (a QuantLinear's weight, dequantized, is rounded again).
    A tied lm_head is the embedding's matrix and stays as it is. The copy shares every tensor it
    does not round (embedding, norms) and the tokenizer; the original is untouched. A Llama's copy has its own load trace, whose meta
    ``"quantized"`` says what each linear layer became and ``"requantized"`` the format."""
    t, _ = _scaled(kind, "requantize")
    if isinstance(llm_or_model, nn.Module):
        return _rounded(llm_or_model, t)[0]
    llm = copy.copy(llm_or_model)  # the same tokenizer, config and defaults
    llm.model, paths = _rounded(llm_or_model.model, t)
    llm.fast_step = None  # a compiled step belongs to the original model
    old = llm_or_model.load_trace
    llm.load_trace = Trace(list(old.events), {**old.meta, "quantized": paths, "requantized": t.name})
    return llm


@torch.no_grad()
def _rounded(model: LlamaModel, t: BlockType) -> tuple[LlamaModel, dict[str, str]]:
    """``model`` copied with its linear layers rounded to ``t``, and what each layer became."""
    shared = {id(x): x for x in (*model.parameters(), *model.buffers())}
    new = copy.deepcopy(model, shared)  # new modules over the same tensors: nothing is copied twice
    tied = "lm_head" if model.config.tie_word_embeddings else None
    paths = {}
    for name, module in list(new.named_modules()):
        if isinstance(module, Stacked) and not isinstance(module, EachLayer):
            _put(new, name, EachLayer())  # a stacked product reads .weight; each QuantLinear computes its part
        elif name == tied:
            paths[name] = "tied:embed"  # the embedding's own matrix: left as it is
        elif isinstance(module, QuantLinear) or (isinstance(module, nn.Linear) and module.bias is None):
            w = module.weight  # a QuantLinear's: dequantized, in the model's row order
            _put(new, name, QuantLinear(quantize(w, t), t, w.shape[0], w.shape[1]))
            paths[name] = f"quantized:{t.name}"
    return new, paths


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
