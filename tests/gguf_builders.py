"""GGUF files the tests write themselves (nothing is downloaded), on top of benchmarks/gguf_writer.py.

``write_gguf_checkpoint`` turns a transformers ``LlamaForCausalLM`` (tests/builders.py makes random
ones) into a GGUF with its weights and a tokenizer in one of llama.cpp's two Llama families:

- "llama": a sentencepiece vocabulary (Llama 2, TinyLlama), from the model ``builders.train_sentencepiece``
  trains, with the tokens, scores and token types llama.cpp's converter writes;
- "gpt2": a byte-level BPE with merges (SmolLM2, Llama 3), trained here with the ``tokenizers``
  library, special tokens first as in SmolLM2.

The damage helpers copy a good file with exactly one thing wrong, for the loader's error tests.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from benchmarks.gguf_writer import write_llama_gguf
from tracer.config import LlamaConfig

# llama.cpp's token types (gguf.TokenType), spelled out for readers of the tests.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

BPE_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2, as in SmolLM2
# Big enough that merges cross what one pre-tokenizer splits and another does not (digit runs,
# snake_case, tab + word), so a wrong split changes ids; this corpus gives at most ~890.
BPE_VOCAB_SIZE = 768

# SmolLM2-Instruct's ChatML template (its tokenizer_config.json; the GGUF carries it unchanged).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama 3's pre-tokenizer split (its tokenizer.json; llama.cpp's "llama-bpe").
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# --- Tokenizer metadata --------------------------------------------------------------------------


def sentencepiece_metadata(model_file: Path, *, add_bos: bool = True,
                           chat_template: str | None = None) -> dict[str, Any]:
    """``tokenizer.*`` metadata for a sentencepiece model, as llama.cpp's converter writes it
    (``_create_vocab_sentencepiece``): pieces, scores, token types, special ids and flags."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_file).read_bytes())
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        tokens.append(sp.id_to_piece(i))
        scores.append(float(sp.get_score(i)))
        types.append(UNKNOWN if sp.is_unknown(i) else CONTROL if sp.is_control(i)
                     else UNUSED if sp.is_unused(i) else BYTE if sp.is_byte(i) else NORMAL)
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": add_bos,
        "tokenizer.ggml.add_eos_token": False,
        "tokenizer.ggml.add_space_prefix": bool(proto.normalizer_spec.add_dummy_prefix),
    }
    if sp.pad_id() >= 0:
        meta["tokenizer.ggml.padding_token_id"] = sp.pad_id()
    if chat_template:
        meta["tokenizer.chat_template"] = chat_template
    return meta


def bpe_pre_tokenizer(pre: str):
    """The ``tokenizers`` pre-tokenizer of the model family llama.cpp names ``pre``."""
    from tokenizers import Regex, pre_tokenizers

    if pre == "smollm":  # SmolLM2's tokenizer.json: digits one by one, then GPT-2's byte-level split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre == "llama-bpe":  # Llama 3's tokenizer.json
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "default":  # GPT-2's own
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raise ValueError(f"no pre-tokenizer for {pre!r}: use smollm, llama-bpe or default")


def train_byte_bpe(pre: str = "smollm", vocab_size: int = BPE_VOCAB_SIZE):
    """A byte-level BPE ``tokenizers.Tokenizer`` trained on ``builders.corpus_lines()``, with
    ``BPE_SPECIALS`` at ids 0..2 and exactly ``vocab_size`` tokens."""
    import builders
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = bpe_pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(builders.corpus_lines(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"BPE training gave {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    return tok


def bpe_metadata(tok, *, pre: str = "smollm", add_bos: bool = False,
                 chat_template: str | None = CHATML) -> dict[str, Any]:
    """``tokenizer.*`` metadata for a byte-level BPE, as llama.cpp's converter writes a gpt2-family
    vocabulary (``get_vocab_base``): tokens in the byte alphabet, merges as "a b", specials CONTROL."""
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    specials = {a.content for a in tok.get_added_tokens_decoder().values() if a.special}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    ids = {t: tok.token_to_id(t) for t in BPE_SPECIALS}
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL if t in specials else NORMAL for t in tokens],
        "tokenizer.ggml.merges": merges,
        # SmolLM2-Instruct's: <|im_start|> begins, <|im_end|> ends and pads, <|endoftext|> is unk.
        "tokenizer.ggml.bos_token_id": ids["<|im_start|>"],
        "tokenizer.ggml.eos_token_id": ids["<|im_end|>"],
        "tokenizer.ggml.unknown_token_id": ids["<|endoftext|>"],
        "tokenizer.ggml.padding_token_id": ids["<|im_end|>"],
        "tokenizer.ggml.add_bos_token": add_bos,
    }
    if chat_template:
        meta["tokenizer.chat_template"] = chat_template
    return meta


# --- Whole files ---------------------------------------------------------------------------------


def hf_config(hf_model) -> LlamaConfig:
    """Our config for a transformers Llama (what the GGUF's ``llama.*`` keys describe)."""
    return LlamaConfig.from_dict(hf_model.config.to_dict(), source="transformers config")


def hf_tensors(hf_model):
    """``(hub name, float32 array)`` for each weight of a transformers model, one at a time."""
    for name, t in hf_model.state_dict().items():
        yield name, t.detach().float().cpu().numpy()


def write_gguf_checkpoint(path: Path, hf_model, *, tokenizer: str | None = "gpt2", source=None,
                          qtype: str = "F16", embed_qtype: str | None = None, tie: bool | None = None,
                          pre: str = "smollm", add_bos: bool | None = None,
                          chat_template: str | None = None) -> Path:
    """``hf_model`` as a GGUF at ``path`` with a ``tokenizer`` family's metadata ("gpt2", "llama" or
    None for none). ``source``: the tokenizer to describe, a trained ``tokenizers.Tokenizer`` for
    gpt2 (default: ``train_byte_bpe(pre)``) or a sentencepiece ``tokenizer.model`` for llama
    (required). ``add_bos`` defaults as the families do (llama True, SmolLM2 False); ``chat_template``
    defaults to ChatML for gpt2 and none for llama. The model's vocab_size must equal the tokenizer's.
    """
    if tokenizer == "gpt2":
        tok = source if source is not None else train_byte_bpe(pre)
        meta = bpe_metadata(tok, pre=pre, add_bos=bool(add_bos), chat_template=chat_template or CHATML)
    elif tokenizer == "llama":
        if source is None:
            raise ValueError("tokenizer='llama' needs source=<path of a sentencepiece tokenizer.model>")
        meta = sentencepiece_metadata(Path(source), add_bos=True if add_bos is None else add_bos,
                                      chat_template=chat_template)
    elif tokenizer is None:
        meta = None
    else:
        raise ValueError(f"tokenizer family {tokenizer!r}: use 'gpt2', 'llama' or None")
    cfg = hf_config(hf_model)
    if meta is not None and len(meta["tokenizer.ggml.tokens"]) != cfg.vocab_size:
        raise ValueError(f"the model's vocab_size {cfg.vocab_size} is not the tokenizer's "
                         f"{len(meta['tokenizer.ggml.tokens'])} tokens")
    return write_llama_gguf(path, cfg, hf_tensors(hf_model), qtype=qtype, embed_qtype=embed_qtype, tie=tie,
                            tokenizer=meta, name=f"tiny-{tokenizer or 'none'}-{qtype}")


# --- Damaged copies of a good file ---------------------------------------------------------------


def tensor_table(path: Path) -> tuple[int, list[dict[str, Any]]]:
    """``(data_start, tensors)`` of a GGUF: each tensor's name, type, file offset, byte size and
    where its offset field sits in the file (for the helpers that patch it)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = []
    for t in reader.tensors:
        parts = t.field.parts
        tensors.append({"name": t.name, "type": t.tensor_type, "start": t.data_offset, "nbytes": t.n_bytes,
                        "offset_field": t.field.offset + sum(p.nbytes for p in parts[:-1])})
    return reader.data_offset, tensors


def truncate_in_tensor_data(src: Path, dst: Path) -> str:
    """``dst``: ``src`` cut halfway through the data of its last tensor; returns that tensor's name."""
    _, tensors = tensor_table(src)
    last = max(tensors, key=lambda t: t["start"])
    with open(src, "rb") as f:
        dst.write_bytes(f.read(last["start"] + last["nbytes"] // 2))
    return last["name"]


def claim_extra_tensors(src: Path, dst: Path, extra: int = 1) -> int:
    """``dst``: ``src`` with the header's tensor count raised by ``extra`` (the table and data
    unchanged); returns the count it claims. The count is the uint64 after magic and version."""
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        f.seek(8)
        (count,) = struct.unpack("<Q", f.read(8))
        f.seek(8)
        f.write(struct.pack("<Q", count + extra))
    return count + extra


def tensor_past_end(src: Path, dst: Path, name: str | None = None) -> tuple[str, int]:
    """``dst``: ``src`` with one tensor's data offset (default: the first tensor's) moved so that its
    data would start at the end of the file, so its declared range ends past it. Returns
    ``(name, file size)``."""
    data_start, tensors = tensor_table(src)
    t = next(t for t in tensors if name in (None, t["name"]))
    shutil.copyfile(src, dst)
    size = dst.stat().st_size
    with open(dst, "r+b") as f:
        f.seek(t["offset_field"])
        f.write(struct.pack("<Q", size - data_start))  # relative to the data section
    return t["name"], size


def rewrite(src: Path, dst: Path, *, architecture: str | None = None, drop=lambda key: False,
            set_fields: dict[str, Any] | None = None, raw_tensors: dict[str, tuple[str, np.ndarray]] | None = None) -> Path:
    """``dst``: ``src`` read with GGUFReader and written again with GGUFWriter, with its
    ``general.architecture`` (and the ``{arch}.*`` keys) renamed, keys for which ``drop(key)`` is
    true left out, ``set_fields`` added as strings, and tensors in ``raw_tensors`` replaced by
    ``(ggml type name, raw bytes)``. Values keep their GGUF types."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    old_arch = reader.fields["general.architecture"].contents()
    arch = architecture or old_arch
    w = gguf.GGUFWriter(str(dst), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or drop(key):
            continue
        if key.startswith(old_arch + "."):
            key = arch + key[len(old_arch):]
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for key, value in (set_fields or {}).items():
        w.add_string(key, value)
    for t in reader.tensors:
        qtype, data = (raw_tensors or {}).get(t.name, (t.tensor_type.name, t.data))
        w.add_tensor(t.name, np.asarray(data), raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def undequantizable_tensor(src: Path, dst: Path, name: str = "blk.0.ffn_down.weight", qtype: str = "Q1_0",
                           seed: int = 0) -> str:
    """``dst``: ``src`` with tensor ``name`` stored as ``qtype``, a type gguf-py 0.19 cannot
    dequantize (``gguf.quants.dequantize`` raises NotImplementedError for Q1_0, Q8_1, Q8_K), as
    random bytes of exactly that type's size. Q1_0 (llama.cpp's 1-bit type, 128-value blocks of 18
    bytes) needs a row length that is a multiple of 128: ffn_down of a model with intermediate 128.
    Returns the type's name."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    (t,) = [t for t in reader.tensors if t.name == name]
    shape = tuple(int(x) for x in reversed(t.shape))
    nbytes = gguf.quants.quant_shape_to_byte_shape(shape, gguf.GGMLQuantizationType[qtype])  # raises if rows do not fit
    raw = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
    rewrite(src, dst, raw_tensors={name: (qtype, raw)})
    return qtype


def other_architecture(src: Path, dst: Path, architecture: str = "qwen2") -> Path:
    """``dst``: ``src`` declared as ``architecture`` (its ``llama.*`` keys renamed to match)."""
    return rewrite(src, dst, architecture=architecture)


def without_tokenizer(src: Path, dst: Path) -> Path:
    """``dst``: ``src`` without any ``tokenizer.*`` key (no ``tokenizer.ggml.model`` at all)."""
    return rewrite(src, dst, drop=lambda key: key.startswith("tokenizer."))


def no_vocab(src: Path, dst: Path) -> Path:
    """``dst``: ``src`` with ``tokenizer.ggml.model = "no_vocab"`` and no vocabulary, as llama.cpp's
    vocab-less files are (what benchmarks/llamacpp.py writes)."""
    return rewrite(src, dst, drop=lambda key: key.startswith("tokenizer."),
                   set_fields={"tokenizer.ggml.model": "no_vocab"})


# --- The files the session fixtures build (tests/conftest.py: gguf_file, damaged_gguf) -------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# kind -> (builders.build_checkpoint kwargs, write_gguf_checkpoint kwargs). The vocabulary size
# follows the tokenizer family: BPE_VOCAB_SIZE byte-level BPE tokens, 400 sentencepiece pieces.
KINDS: dict[str, tuple[dict, dict]] = {
    "gpt2-f32": ({}, {"tokenizer": "gpt2", "qtype": "F32"}),
    "gpt2-f32-tied": ({"tie": True}, {"tokenizer": "gpt2", "qtype": "F32"}),
    "llama-f32": ({}, {"tokenizer": "llama", "qtype": "F32"}),
    "llama-f32-tied": ({"tie": True}, {"tokenizer": "llama", "qtype": "F32"}),
    "gpt2-f16-tied": ({"tie": True}, {"tokenizer": "gpt2", "qtype": "F16"}),
    "llama-f16": ({}, {"tokenizer": "llama", "qtype": "F16"}),
    "llama-bf16": ({}, {"tokenizer": "llama", "qtype": "BF16"}),
    "gpt2-q8_0-tied": ({"tie": True}, {"tokenizer": "gpt2", "qtype": "Q8_0"}),
    # SmolLM2's mix: 4-bit matrices, the (tied) embedding in Q8_0.
    "gpt2-q4_0-tied": ({"tie": True}, {"tokenizer": "gpt2", "qtype": "Q4_0", "embed_qtype": "Q8_0"}),
    "llama-q4_1": ({}, {"tokenizer": "llama", "qtype": "Q4_1"}),
    # Llama 3.2's shape of file: Llama 3 pre-tokenizer, BOS added, rope_freqs for llama3 scaling.
    # transformers' GGUF reader ignores rope scaling, so its logits differ from the source model's.
    "llama3-bpe": ({"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0},
                   {"tokenizer": "gpt2", "pre": "llama-bpe", "add_bos": True, "qtype": "F32"}),
    # ffn_down rows of 128: room for a 128-value block type (undequantizable_tensor's Q1_0).
    "gpt2-f32-ffn128": ({"intermediate": 128}, {"tokenizer": "gpt2", "qtype": "F32"}),
}

# damage -> (base kind, helper(src, dst))
DAMAGES = {
    "truncated": ("gpt2-f32", truncate_in_tensor_data),
    "extra_tensors": ("gpt2-f32", claim_extra_tensors),
    "past_end": ("gpt2-f32", tensor_past_end),
    "undequantizable": ("gpt2-f32-ffn128", undequantizable_tensor),
    "qwen2": ("gpt2-f32", other_architecture),
    "no_tokenizer": ("gpt2-f32", without_tokenizer),
    "no_vocab": ("gpt2-f32", no_vocab),
}


class GgufCase(NamedTuple):
    """A GGUF file, the transformers model it was written from, and the source tokenizer as a
    transformers tokenizer (the sentencepiece folder's, or one built from the trained BPE's
    tokenizer.json)."""

    path: Path
    hf_model: Any
    tokenizer: Any


def perturb_norms(model, seed: int = 0) -> None:
    """RMSNorm weights away from their init of 1.0, so that a misplaced norm shows in the logits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def bpe_source(tok, folder: Path, *, add_bos: bool):
    """The trained BPE as the source transformers tokenizer: its tokenizer.json in ``folder``, with
    a BOS post-processor when the file says add_bos (as Llama 3's tokenizer.json has)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tok.to_str())
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B",
            special_tokens=[("<|im_start|>", tok.token_to_id("<|im_start|>"))])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", unk_token="<|endoftext|>", pad_token="<|im_end|>")


class GgufCases:
    """Builds each KINDS file (and each DAMAGES copy) once under ``root``. Each file sits alone in
    its folder: transformers' from_pretrained(folder, gguf_file=...) would read a tokenizer.json
    or config.json lying beside it instead of the GGUF's metadata."""

    def __init__(self, root: Path, sp_dir: Path):
        self.root, self.sp_dir = root, sp_dir
        self.models: dict[str, Any] = {}
        self.bpe: dict[str, Any] = {}
        self.cases: dict[str, GgufCase] = {}
        self.damaged: dict[str, Path] = {}

    def model(self, model_kwargs: dict, vocab_size: int):
        """A random transformers Llama (norms perturbed), built once per shape."""
        import builders

        key = repr(sorted({**model_kwargs, "vocab_size": vocab_size}.items()))
        if key not in self.models:
            folder = self.root / f"hf-{len(self.models)}"
            model = builders.build_checkpoint(folder, self.sp_dir, vocab_size=vocab_size, **model_kwargs)
            perturb_norms(model)
            model.save_pretrained(folder)  # the folder stays the model's checkpoint
            self.models[key] = model
        return self.models[key]

    def source_tokenizer(self, kind: str, write: dict):
        """(the ``source`` for write_gguf_checkpoint, the source transformers tokenizer)."""
        from transformers import AutoTokenizer

        if write["tokenizer"] == "llama":
            return self.sp_dir / "tokenizer.model", AutoTokenizer.from_pretrained(self.sp_dir)
        pre = write.get("pre", "smollm")
        if pre not in self.bpe:
            self.bpe[pre] = train_byte_bpe(pre)
        return self.bpe[pre], bpe_source(self.bpe[pre], self.root / f"tok-{kind}", add_bos=bool(write.get("add_bos")))

    def get(self, kind: str) -> GgufCase:
        """The ``kind`` file (see KINDS) as a GgufCase."""
        if kind not in self.cases:
            model_kwargs, write = KINDS[kind]
            vocab = BPE_VOCAB_SIZE if write["tokenizer"] == "gpt2" else 400
            model = self.model(model_kwargs, vocab)
            source, tokenizer = self.source_tokenizer(kind, write)
            folder = self.root / kind
            folder.mkdir(parents=True, exist_ok=True)
            path = write_gguf_checkpoint(folder / "model.gguf", model, source=source, **write)
            self.cases[kind] = GgufCase(path, model, tokenizer)
        return self.cases[kind]

    def damage(self, name: str) -> Path:
        """The ``name`` damaged copy (see DAMAGES), alone in its folder as ``model.gguf``."""
        if name not in self.damaged:
            base, helper = DAMAGES[name]
            folder = self.root / f"damaged-{name}"
            folder.mkdir(parents=True, exist_ok=True)
            helper(self.get(base).path, folder / "model.gguf")
            self.damaged[name] = folder / "model.gguf"
        return self.damaged[name]
