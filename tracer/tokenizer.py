"""Stage 4 of the walkthrough: text <-> token ids, with each checkpoint's own rules.

Llama 1/2 ship a sentencepiece model (``tokenizer.model``): BPE with byte fallback (an emoji
becomes its UTF-8 bytes ``<0xF0>...``), a dummy prefix (a leading "▁" so that "Hello" at the start
is the same piece as " Hello" mid-sentence), BOS = 1 and EOS = 2 as control tokens. Llama 3 and
later chat models (SmolLM2...) ship only ``tokenizer.json``, read with the ``tokenizers`` library.

What transformers' ``tokenizer(text)`` does, this does too:

- BOS/EOS: added exactly when the checkpoint's tokenizer adds them (see :meth:`Tokenizer.encode`);
- special-token strings in the text (``<|im_start|>``, ``</s>``) become their ids;
- chat: the checkpoint's own jinja chat template, rendered as transformers renders it and
  tokenized without BOS/EOS (the template writes its own); the Llama 2 ``[INST]`` format, built
  at the token level as Meta's reference does, only for a Llama 2 vocabulary without a template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from . import chat_template
from .config import read_json
from .errors import TokenizerError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_CHAT = "llama2-chat"  # the tokenize event's ``template`` when the [INST] format was built
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece
# The named special tokens transformers hands a chat template (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class Encoding:
    """A tokenized prompt: ids, their pieces, and what was added (for the ``tokenize`` event).

    ``added_bos``/``added_eos``: the tokenizer (or, for a chat, the template) put a BOS first or an
    EOS last; ids the caller wrote are not "added". ``template``: where the chat template came
    from (``"tokenizer_config.json"``, ``"chat_template.jinja"``, ``"GGUF metadata"``...) or
    ``"llama2-chat"``; None for plain text.
    """

    text: str
    ids: list[int]
    pieces: list[str]
    added_bos: bool
    added_eos: bool = False
    template: str | None = None


class Tokenizer:
    """Common interface over the sentencepiece and tokenizers backends.

    ``add_bos_token``/``add_eos_token`` say what :meth:`encode` adds by default (what the
    checkpoint's tokenizer adds); ``source`` is a short label of where the settings and the chat
    template came from, used in messages and in the ``tokenize`` event.
    """

    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    chat_template: str | None
    backend: str
    source: str
    special_tokens: dict[str, int]
    token_strings: dict[str, str]  # bos_token, eos_token... as the chat template sees them
    add_bos_token: bool
    add_eos_token: bool

    # --- backend primitives -----------------------------------------------------------------
    def _encode_plain(self, text: str, first: bool = True) -> list[int]:
        """Ids of plain text (no special-token parsing); ``first``: the text starts the prompt."""
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def _encode_body(self, text: str, parse_special: bool) -> list[int]:
        """The text's own ids (no BOS/EOS); special-token strings become their ids when asked."""
        if not parse_special or not self.special_tokens:
            return self._encode_plain(text)
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")"
        ids: list[int] = []
        for n, part in enumerate(re.split(pattern, text)):
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self._encode_plain(part, first=n == 0)
        return ids

    def _default_ends(self) -> tuple[list[int], list[int]]:
        """The ids the checkpoint's tokenizer puts before and after a text."""
        return ([self.bos_id] if self.add_bos_token else []), ([self.eos_id] if self.add_eos_token else [])

    def _ends(self, add_bos: bool | None, add_eos: bool | None) -> tuple[list[int], list[int]]:
        head, tail = self._default_ends()
        if add_bos is not None:
            head = [_required(self.bos_id, "add_bos", "BOS")] if add_bos else []
        if add_eos is not None:
            tail = [_required(self.eos_id, "add_eos", "EOS")] if add_eos else []
        return head, tail

    # --- public API -------------------------------------------------------------------------
    def encode(
        self, text: str, add_bos: bool | None = None, *, add_eos: bool | None = None, parse_special: bool = True
    ) -> list[int]:
        """Token ids for ``text``, as transformers' ``tokenizer(text)["input_ids"]``.

        BOS first / EOS last exactly when the checkpoint's tokenizer adds them (``add_bos_token``,
        ``add_eos_token``); ``add_bos``/``add_eos`` True or False override that. Special-token
        strings in the text (``<s>``, ``<|im_start|>``) become their ids, as in transformers;
        ``parse_special=False`` reads them as plain characters.
        """
        return self._encode(text, add_bos, add_eos, parse_special)[0]

    def tokenize(
        self, text: str, add_bos: bool | None = None, *, add_eos: bool | None = None, parse_special: bool = True
    ) -> Encoding:
        """Like :meth:`encode`, with the pieces too (for showing how text is split) and what was added."""
        ids, added_bos, added_eos = self._encode(text, add_bos, add_eos, parse_special)
        return Encoding(text, ids, self.pieces(ids), added_bos=added_bos, added_eos=added_eos)

    def _encode(self, text, add_bos, add_eos, parse_special) -> tuple[list[int], bool, bool]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        head, tail = self._ends(add_bos, add_eos)
        ids = head + self._encode_body(text, parse_special) + tail
        return ids, head[:1] == [self.bos_id], tail[-1:] == [self.eos_id]

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text for ``ids``, as transformers' ``tokenizer.decode(ids, skip_special_tokens=...)``:
        special tokens dropped, or written as their strings."""
        return self._decode(self._check_ids(ids), skip_special_tokens)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        raise NotImplementedError

    def pieces(self, ids) -> list[str]:
        """The vocabulary piece of each id (``▁`` marks a leading space in sentencepiece vocabularies)."""
        return [self.id_to_piece(int(i)) for i in ids]

    # --- chat -------------------------------------------------------------------------------
    def chat(self, messages: list[dict[str, str]]) -> Encoding:
        """The prompt ids of a conversation, ready for the assistant's answer.

        With a chat template: the same ids as transformers'
        ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``
        (the rendered text tokenized with special tokens parsed and no BOS/EOS added: the template
        writes its own). Without one, a Llama 2 vocabulary (:meth:`is_llama2_style`) gets the
        ``[INST]`` format (:meth:`llama2_chat`); anything else is a :class:`TokenizerError`.
        """
        if self.chat_template:
            text = self.apply_chat_template(messages, add_generation_prompt=True)
            ids = self.encode(text, add_bos=False, add_eos=False, parse_special=True)
            return Encoding(text, ids, self.pieces(ids), added_bos=ids[:1] == [self.bos_id],
                            added_eos=False, template=self.source)
        if not self.is_llama2_style():
            raise TokenizerError(
                f"{self.source}: no chat template, and this is not a Llama 2 vocabulary (<s>/</s>, spaces as "
                "'▁') that could use the [INST] format; add the model's chat_template.jinja or use chat=False"
            )
        ids = self.llama2_chat(messages)
        return Encoding(self.decode(ids, skip_special_tokens=False), ids, self.pieces(ids),
                        added_bos=ids[:1] == [self.bos_id], template=LLAMA2_CHAT)

    @cached_property
    def byte_level(self) -> bool:
        """Whether the vocabulary spells bytes as letters (byte-level BPE: a space is ``Ġ``, a
        newline ``Ċ``), as GPT-2, Llama 3 and SmolLM2 do; what renderers need to show pieces."""
        first = self.pieces(self._encode_body(" a", parse_special=False))[:1]
        return bool(first) and first[0].startswith("Ġ")

    def is_llama2_style(self) -> bool:
        """Whether Llama 2's ``[INST]`` format fits: BOS/EOS are the pieces ``<s>``/``</s>`` and a
        space is written ``▁`` (a sentencepiece vocabulary, whichever backend reads it)."""
        if self.bos_id is None or self.eos_id is None:
            return False
        if (self.id_to_piece(self.bos_id), self.id_to_piece(self.eos_id)) != ("<s>", "</s>"):
            return False
        first = self.pieces(self._encode_body(" a", parse_special=False))[:1]
        return bool(first) and first[0].startswith("▁")

    def llama2_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Llama 2 chat ids: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST]``, later
        turns ``{answer} </s><s>[INST] {user} [/INST]`` (built per turn, as Meta's reference)."""
        msgs = list(messages)
        if not msgs:
            raise TokenizerError("chat needs at least one message")
        if msgs[0].get("role") == "system":
            system = msgs.pop(0)["content"]
            if not msgs:
                raise TokenizerError("chat needs a user message after the system message")
            msgs[0] = {"role": msgs[0]["role"], "content": B_SYS + system + E_SYS + msgs[0]["content"]}
        roles = [m.get("role") for m in msgs]
        if roles[::2] != ["user"] * len(roles[::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
            raise TokenizerError(f"chat roles must alternate user/assistant (after an optional system), got {roles}")
        if roles[-1] != "user":
            raise TokenizerError("the last chat message must be from the user")

        # Meta's reference encodes each turn as plain text (sp.encode), with BOS and without EOS.
        def turn(text: str) -> list[int]:
            return self.encode(text, add_bos=True, add_eos=False, parse_special=False)

        ids: list[int] = []
        for user, answer in zip(msgs[::2], msgs[1::2]):
            ids += turn(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ")
            if self.eos_id is not None:
                ids.append(self.eos_id)
        ids += turn(f"{B_INST} {msgs[-1]['content'].strip()} {E_INST}")
        return ids

    def _template(self):
        """The compiled chat template (compiled again only when ``chat_template`` changes)."""
        cached = getattr(self, "_compiled", None)
        if cached is None or cached[0] != self.chat_template:
            self._compiled = (self.chat_template, chat_template.compile_template(self.chat_template))
        return self._compiled[1]

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The checkpoint's own jinja chat template rendered as text, as transformers'
        ``apply_chat_template(..., tokenize=False)`` renders it (see ``tracer.chat_template``)."""
        if not self.chat_template:
            raise TokenizerError(f"{self.source}: this tokenizer has no chat_template; use chat() (which falls "
                                 "back to llama2_chat() for Llama 2 vocabularies)")
        return chat_template.render(self._template, messages, add_generation_prompt=add_generation_prompt,
                                    token_strings=self.token_strings, source=self.source)


def _required(token_id: int | None, flag: str, name: str) -> int:
    if token_id is None:
        raise TokenizerError(f"{flag}=True, but this tokenizer has no {name} token; leave {flag}=None")
    return token_id


class SentencePieceTokenizer(Tokenizer):
    """tokenizer.model through the ``sentencepiece`` library (Llama 1/2)."""

    backend = "sentencepiece"

    def __init__(self, path: Path, settings: dict[str, Any], *, source: str = "tokenizer_config.json") -> None:
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise TokenizerError(f"{path}: not a valid sentencepiece model ({exc}); re-download it") from None
        self.vocab_size = self.sp.get_piece_size()
        if self.vocab_size == 0:
            raise TokenizerError(f"{path}: sentencepiece model has an empty vocabulary")
        self.source = source
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos if eos >= 0 else None
        self.special_tokens = {
            self.sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        self.chat_template = _chat_template(settings)
        # LlamaTokenizer's defaults for the template's variables, then tokenizer_config.json's.
        unk = self.sp.unk_id()
        defaults = {name: self.sp.id_to_piece(i) for name, i in
                    (("bos_token", bos), ("eos_token", eos), ("unk_token", unk)) if i >= 0}
        self.token_strings = {**defaults, **_token_strings(settings)}
        # transformers builds the post-processor from these two flags, each False when absent
        # (TokenizersBackend.__init__ and update_post_processor), and drops a flag whose token is missing.
        self.add_bos_token = bool(settings.get("add_bos_token", False)) and self.bos_id is not None
        self.add_eos_token = bool(settings.get("add_eos_token", False)) and self.eos_id is not None
        legacy = settings.get("legacy", False)
        add_prefix = settings.get("add_prefix_space")
        add_prefix = True if add_prefix is None else bool(add_prefix)
        self.prepend = ("always" if legacy else "first") if add_prefix else "never"
        self._guard = self.sp.id_to_piece(0) if self.sp.is_unknown(0) else "<unk>"
        self._guard_len = len(self.sp.encode(self._guard, out_type=int))

    def _encode_plain(self, text: str, first: bool = True) -> list[int]:
        # transformers' Llama tokenizer (a "Metaspace" pre-tokenizer) turns a leading space into
        # the "▁" itself instead of adding a dummy prefix in front of it, and (legacy=False) adds
        # the prefix only to the first segment of a text, not to text after a special token.
        # sentencepiece always adds "▁"; these rules map one onto the other.
        if not text:
            return []
        if text.startswith(" "):
            rest = text[1:]
            return self.sp.encode(rest, out_type=int) if rest else [self.sp.piece_to_id("▁")]
        if self.prepend == "always" or (self.prepend == "first" and first):
            return self.sp.encode(text, out_type=int)
        # No prefix wanted: encode behind a throwaway token and cut it off again.
        return self.sp.encode(self._guard + text, out_type=int)[self._guard_len :]

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # transformers' LlamaTokenizer decoder, piece by piece: Replace("▁", " "), ByteFallback
        # (a run of <0xNN> pieces that is not valid UTF-8 becomes one U+FFFD per byte), Fuse, then
        # Strip(left=1) when add_prefix_space: one space off the start of the whole text, so a
        # written <s> keeps the space of the piece after it (sentencepiece's own decode differs).
        if skip_special_tokens:
            specials = set(self.special_tokens.values())
            ids = [i for i in ids if i not in specials]
        text = "".join(_byte_fallback([p.replace("▁", " ") for p in self.pieces(ids)]))
        if self.prepend != "never" and text.startswith(" "):
            text = text[1:]
        return text

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


class HFTokenizersTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (tokenizer.json, or one rebuilt from GGUF metadata) with the
    settings transformers reads beside it (tokenizer_config.json's keys: bos_token, eos_token,
    unk_token, pad_token, add_bos_token, add_eos_token, chat_template, clean_up_tokenization_spaces).

    BOS/EOS follow transformers' ``TokenizersBackend.__init__``: when ``settings`` has
    ``add_bos_token`` or ``add_eos_token`` the post-processor becomes ``[BOS] $A [EOS]`` with
    each flag False unless set (``update_post_processor``); otherwise the tokenizer's own
    post-processor decides, and none adds nothing. (For a tokenizer.json file transformers drops
    the two flags first: :meth:`from_file`.) ``bos_id``/``eos_id`` are used only when the
    settings name no such token (config.json's ids). ``source`` labels where the settings came
    from ("tokenizer_config.json", "GGUF metadata") in messages and in the tokenize event.
    """

    backend = "tokenizers"

    def __init__(self, tk, settings: dict[str, Any], *, source: str,
                 bos_id: int | None = None, eos_id: int | None = None) -> None:
        self.tk = tk
        # transformers sets this from split_special_tokens (False): special-token strings are parsed.
        self.tk.encode_special_tokens = False
        self.source = source
        self.vocab_size = tk.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {t.content: i for i, t in tk.get_added_tokens_decoder().items() if t.special}
        self.token_strings = _token_strings(settings)
        named_bos = self._token_id(self.token_strings.get("bos_token"))
        named_eos = self._token_id(self.token_strings.get("eos_token"))
        self.bos_id = named_bos if named_bos is not None else bos_id
        self.eos_id = named_eos if named_eos is not None else eos_id
        self.chat_template = _chat_template(settings)
        if "add_bos_token" in settings or "add_eos_token" in settings:
            head = [named_bos] if settings.get("add_bos_token") and named_bos is not None else []
            tail = [named_eos] if settings.get("add_eos_token") and named_eos is not None else []
        else:
            head, tail = _post_processor_ends(tk)
        self._head, self._tail = head, tail
        self.add_bos_token = bool(head) and head[0] == self.bos_id
        self.add_eos_token = bool(tail) and tail[-1] == self.eos_id
        # TokenizersBackend._decode skips clean_up_tokenization_spaces for BPE models.
        self._clean_up = bool(settings.get("clean_up_tokenization_spaces")) and type(tk.model).__name__ != "BPE"

    @classmethod
    def from_file(cls, path: str | Path, settings: dict[str, Any], bos_id: int | None = None,
                  eos_id: int | None = None, *, source: str = "tokenizer_config.json") -> HFTokenizersTokenizer:
        """Read ``tokenizer.json``; ``settings`` is its folder's tokenizer_config.json."""
        from tokenizers import Tokenizer as TkTokenizer

        try:
            tk = TkTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a generic Exception with its message
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({chat_template.one_line(exc)}); re-download it") from None
        # With a tokenizer.json, transformers ignores tokenizer_config.json's add_bos_token and
        # add_eos_token: the file's post-processor decides (PreTrainedTokenizerBase._from_pretrained
        # pops both, tokenization_utils_base.py:1818-1820 in 5.24).
        kept = {k: v for k, v in settings.items() if k not in ("add_bos_token", "add_eos_token")}
        return cls(tk, kept, source=source, bos_id=bos_id, eos_id=eos_id)

    @cached_property
    def _tk_literal(self):
        """A copy that reads special-token strings as plain text (built on first use: copying a
        128k-token vocabulary takes a fifth of a second)."""
        from tokenizers import Tokenizer as TkTokenizer

        tk = TkTokenizer.from_str(self.tk.to_str())
        tk.encode_special_tokens = True
        return tk

    def _token_id(self, token: str | None) -> int | None:
        return self.tk.token_to_id(token) if isinstance(token, str) else None

    def _default_ends(self) -> tuple[list[int], list[int]]:
        return list(self._head), list(self._tail)

    def _encode_body(self, text: str, parse_special: bool) -> list[int]:
        # The tokenizers library splits special-token strings itself (and knows its own
        # prefix-space rules around them); a second instance reads them as plain text.
        tk = self.tk if parse_special else self._tk_literal
        return tk.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # TokenizersBackend._decode: the tokenizers decoder, then the clean-up of spaces where it
        # applies (never for BPE).
        text = self.tk.decode(ids, skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text

    def id_to_piece(self, i: int) -> str:
        piece = self.tk.id_to_token(int(i))
        return piece if piece is not None else f"<id {i}>"


def _post_processor_ends(tk) -> tuple[list[int], list[int]]:
    """The ids a tokenizers post-processor puts before and after a text (what transformers'
    ``tokenizer(text)`` adds when it keeps tokenizer.json's post-processor)."""
    if tk.post_processor is None:
        return [], []
    probe = "a"
    body = tk.encode(probe, add_special_tokens=False).ids
    full = tk.encode(probe, add_special_tokens=True)
    if not body:
        return list(full.ids), []
    head = 0
    while head < len(full.ids) and full.special_tokens_mask[head]:
        head += 1
    if full.ids[head:head + len(body)] != body:
        raise TokenizerError(f"the tokenizer's {type(tk.post_processor).__name__} post-processor changes the "
                             "text's own ids, not only tokens around them; this runtime cannot follow it")
    return list(full.ids[:head]), list(full.ids[head + len(body):])


def _byte_fallback(pieces: list[str]) -> list[str]:
    """tokenizers' ByteFallback decoder: each run of ``<0xNN>`` pieces becomes its UTF-8 text, or
    one U+FFFD per byte when the run is not valid UTF-8; other pieces pass unchanged."""
    out: list[str] = []
    run = bytearray()
    for piece in pieces + [None]:
        if piece is not None and _BYTE_PIECE.fullmatch(piece):
            run.append(int(piece[3:5], 16))
            continue
        if run:
            try:
                out.append(run.decode("utf-8"))
            except UnicodeDecodeError:
                out.append("\ufffd" * len(run))
            run.clear()
        if piece is not None:
            out.append(piece)
    return out


def _clean_up_tokenization(text: str) -> str:
    # PreTrainedTokenizerBase.clean_up_tokenization (meant for WordPiece vocabularies).
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


def _token_strings(settings: dict[str, Any]) -> dict[str, str]:
    """The named special tokens of tokenizer_config.json as strings (transformers'
    ``special_tokens_map``): a value may be a string or an AddedToken dict with "content"."""
    out = {}
    for name in SPECIAL_TOKEN_NAMES:
        token = settings.get(name)
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str):
            out[name] = token
    return out


def _chat_template(settings: dict[str, Any]) -> str | None:
    template = settings.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    if isinstance(template, dict):  # named templates: transformers' get_chat_template takes "default"
        template = template.get("default")
    return template if isinstance(template, str) else None


def _read_settings(folder: Path) -> tuple[dict[str, Any], str]:
    """tokenizer_config.json, with chat_template.jinja's template when there is one (transformers
    lets the file win over the config's entry); and the label of where the template came from."""
    settings: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        settings = read_json(folder / "tokenizer_config.json", TokenizerError)
    if (folder / "chat_template.jinja").is_file():
        settings["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        return settings, "chat_template.jinja"
    return settings, "tokenizer_config.json"


def _flags_from_tokenizer_json(path: Path) -> dict[str, bool]:
    """add_bos_token/add_eos_token as tokenizer.json's post-processor has them: transformers reads a
    folder that has both tokenizer.model and tokenizer.json through the json."""
    from tokenizers import Tokenizer as TkTokenizer

    try:
        tk = TkTokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises a generic Exception with its message
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({chat_template.one_line(exc)}); re-download it") from None
    head, tail = _post_processor_ends(tk)
    return {"add_bos_token": bool(head), "add_eos_token": bool(tail)}


def load_tokenizer(folder: Path, *, bos_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
    """tokenizer.model (sentencepiece) when present, else tokenizer.json (tokenizers), with the
    folder's tokenizer_config.json and chat_template.jinja; ``bos_id``/``eos_id`` (config.json's)
    are used where the settings name no BOS/EOS token."""
    folder = Path(folder)
    settings, source = _read_settings(folder)
    if (folder / "tokenizer.model").is_file():
        if (folder / "tokenizer.json").is_file():
            settings = {**settings, **_flags_from_tokenizer_json(folder / "tokenizer.json")}
        return SentencePieceTokenizer(folder / "tokenizer.model", settings, source=source)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizersTokenizer.from_file(folder / "tokenizer.json", settings, bos_id, eos_id, source=source)
    raise TokenizerError(
        f"{folder}: no tokenizer found: expected tokenizer.model (Llama 1/2) or tokenizer.json (Llama 3)"
    )
