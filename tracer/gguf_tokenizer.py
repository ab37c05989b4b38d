"""Stage 4 for a GGUF file: rebuild its tokenizer from the ``tokenizer.ggml.*`` metadata.

A GGUF carries no tokenizer.json: the vocabulary, the merges (or, for sentencepiece vocabularies,
scores from which merges follow) and the special token ids are metadata, under llama.cpp's key names.
Two vocabulary families run Llama-architecture models, and each becomes a ``tokenizers.Tokenizer``
built the way transformers' GGUF reader builds it (``integrations/gguf/gguf_tokenizer_mapping.py``):

- ``gpt2``: byte-level BPE with merges (Llama 3, SmolLM2). Text is split by the regex that
  ``tokenizer.ggml.pre`` names (llama.cpp's pre-tokenizer types), then mapped to the byte alphabet;
- ``llama``: sentencepiece-style BPE (Llama 1/2, TinyLlama): a "▁" marks a space, a character
  outside the vocabulary falls back to its UTF-8 bytes (``<0xE2>``...), merges follow from scores.

Tokens marked CONTROL become special tokens (a literal ``<|im_start|>`` in a prompt is one id);
BOS/EOS, the add-BOS flag and the chat template come from the metadata too.
"""

from __future__ import annotations

import warnings
from typing import Any

from .errors import TokenizerError
from .gguf_file import GGUFFile

# llama.cpp's token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
FAMILIES = ("gpt2", "llama")
VOCAB_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")  # the string arrays a tokenizer needs

# Pre-tokenizer regexes by tokenizer.ggml.pre (llama.cpp's llama-vocab.cpp; transformers' table).
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2,),
    "gpt-2": (_GPT2,),
    "gpt2": (_GPT2,),
    # SmolLM2, StarCoder: every digit its own piece, then GPT-2's split.
    "smollm": (r"\p{N}", _GPT2),
    "starcoder": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "llama-v3": (_LLAMA3,),
    "llama-bpe": (_LLAMA3,),
    "smaug-bpe": (_LLAMA3,),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte alphabet: every byte as a printable character (printable ASCII and Latin-1 as
    themselves, the rest shifted past 255), so that any byte string is a string of 'letters'."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_settings(g: GGUFFile) -> dict[str, Any]:
    """The metadata as a tokenizer_config.json would say it: special tokens, flags, template."""
    meta, tokens = g.metadata, _tokens(g)
    family = meta["tokenizer.ggml.model"]

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    # A sentencepiece vocabulary adds BOS unless the file says otherwise (llama.cpp's default,
    # and transformers'); a byte-level one only when the flag says so.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", family == "llama")
    return {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "add_bos_token": bool(add_bos),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "chat_template": meta.get("tokenizer.chat_template"),
    }


def _tokens(g: GGUFFile) -> list[str]:
    family = g.metadata.get("tokenizer.ggml.model")
    if family is None or family == "no_vocab":
        raise TokenizerError(
            f"{g.path}: the GGUF has no tokenizer (tokenizer.ggml.model is {family or 'absent'!r}): it "
            "holds weights only, and text needs its vocabulary; use a GGUF converted with the tokenizer "
            "(llama.cpp's convert_hf_to_gguf.py writes it by default)"
        )
    if family not in FAMILIES:
        raise TokenizerError(
            f"{g.path}: tokenizer.ggml.model is {family!r}; this runtime rebuilds {list(FAMILIES)} vocabularies"
        )
    tokens = g.metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise TokenizerError(f"{g.path}: GGUF metadata 'tokenizer.ggml.tokens' is missing or empty")
    return tokens


def build_tokenizer(g: GGUFFile):
    """The file's tokenizer as a ``tokenizers.Tokenizer`` (no post-processor: BOS/EOS follow the
    settings' flags, see :func:`tokenizer_settings`)."""
    tokens = _tokens(g)
    family = g.metadata["tokenizer.ggml.model"]
    types = g.metadata.get("tokenizer.ggml.token_type")
    types = [int(t) for t in types] if types is not None else [NORMAL] * len(tokens)
    tk = _byte_level(g, tokens) if family == "gpt2" else _sentencepiece(g, tokens)
    _add_special_tokens(tk, tokens, types, byte_level=family == "gpt2", settings=tokenizer_settings(g))
    return tk


def _byte_level(g: GGUFFile, tokens: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = g.metadata.get("tokenizer.ggml.merges")
    if not merges:
        raise TokenizerError(f"{g.path}: a 'gpt2' (byte-level BPE) vocabulary needs tokenizer.ggml.merges; it is missing")
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    # Tokens are stored in the byte alphabet already; one that is not (a raw special string with
    # a space, say) is spelled into it, as transformers does.
    vocab = {t if set(t) <= alphabet else "".join(spell[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))
    pre = g.metadata.get("tokenizer.ggml.pre", "default")
    splits = PRE_SPLITS.get(pre)
    if splits is None:
        warnings.warn(f"{g.path}: unknown pre-tokenizer {pre!r} (tokenizer.ggml.pre); splitting text as GPT-2 "
                      "does, as transformers' GGUF reader does", stacklevel=3)
        splits = (_GPT2,)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def _sentencepiece(g: GGUFFile, tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = g.metadata.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = g.metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise TokenizerError(f"{g.path}: a 'llama' vocabulary needs tokenizer.ggml.scores or merges; both are missing")
        pairs = merges_from_scores(vocab, dict(zip(tokens, (float(s) for s in scores))))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None))
    # Llama 2's tokenizer as transformers builds it: "▁" for spaces, one added in front of the
    # text's first piece only (legacy=False), bytes for what the vocabulary lacks.
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(content=" ", left=1)])
    return tk


def merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a token into two tokens of
    the vocabulary, best token score first (what sentencepiece's BPE applies), ties broken by the
    pieces' lengths and ids as transformers' ``generate_merges`` breaks them."""
    merges = []
    for token, score in scores.items():
        local = [(token[:k], token[k:], score) for k in range(1, len(token))
                 if token[:k] in vocab and token[k:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(tk, tokens: list[str], types: list[int], *, byte_level: bool, settings: dict) -> None:
    """CONTROL tokens (and the named BOS/EOS/UNK/PAD) as special tokens, USER_DEFINED ones as plain
    added tokens, so that each stays whole in text. In a byte-level vocabulary a CONTROL token
    spelled outside the byte alphabet is a converter's mislabel and is skipped (transformers)."""
    from tokenizers import AddedToken

    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    named = {settings[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if settings.get(k)}
    special = [t for t, ty in zip(tokens, types) if ty == CONTROL and (alphabet is None or set(t) <= alphabet)]
    special += [t for t in named if t not in special]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    if user:
        tk.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def load_gguf_tokenizer(path, *, bos_id: int | None = None, eos_id: int | None = None):
    """The tokenizer of the GGUF file at ``path``, ready to use (see :func:`build_tokenizer`)."""
    from .tokenizer import HFTokenizersTokenizer

    g = GGUFFile.open(path, strings=VOCAB_KEYS)
    return HFTokenizersTokenizer(build_tokenizer(g), tokenizer_settings(g), source="GGUF metadata",
                                 bos_id=bos_id, eos_id=eos_id)
