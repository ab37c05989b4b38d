"""Stage 4 of the walkthrough: text <-> token ids.

Llama 1/2 ship a sentencepiece model (``tokenizer.model``): BPE with byte fallback (an emoji
becomes its UTF-8 bytes ``<0xF0>...``), a dummy prefix (a leading "▁" so that "Hello" at the start
is the same piece as " Hello" mid-sentence), BOS = 1 and EOS = 2 as control tokens. Llama 3 ships
only ``tokenizer.json``, read with the ``tokenizers`` library. The Llama 2 chat format is built at
the token level, as Meta's reference does; a checkpoint's own jinja ``chat_template`` is rendered
too when it has one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .config import read_json
from .errors import TokenizerError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


@dataclass(frozen=True)
class Encoding:
    """A tokenized text: ids, their pieces, and what was added (for the ``tokenize`` event)."""

    text: str
    ids: list[int]
    pieces: list[str]
    added_bos: bool


class Tokenizer:
    """Common interface over the sentencepiece and tokenizers backends."""

    bos_id: int | None
    eos_id: int | None
    vocab_size: int
    chat_template: str | None
    backend: str
    special_tokens: dict[str, int]

    # --- backend primitives -----------------------------------------------------------------
    def _encode_plain(self, text: str, first: bool = True) -> list[int]:
        raise NotImplementedError

    def _decode_plain(self, ids: list[int]) -> str:
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    # --- public API -------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True, *, parse_special: bool = False) -> list[int]:
        """Token ids for ``text``; BOS first when ``add_bos``. With ``parse_special`` the literal
        strings of special tokens (``<s>``, ``</s>``...) become their ids, as in chat templates."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        ids: list[int] = [self.bos_id] if add_bos and self.bos_id is not None else []
        if not parse_special or not self.special_tokens:
            return ids + self._encode_plain(text)
        pattern = "(" + "|".join(re.escape(s) for s in sorted(self.special_tokens, key=len, reverse=True)) + ")"
        for n, part in enumerate(re.split(pattern, text)):
            if part in self.special_tokens:
                ids.append(self.special_tokens[part])
            elif part:
                ids += self._encode_plain(part, first=n == 0)
        return ids

    def tokenize(self, text: str, add_bos: bool = True, *, parse_special: bool = False) -> Encoding:
        """Like :meth:`encode`, with the pieces too (for showing how text is split)."""
        ids = self.encode(text, add_bos, parse_special=parse_special)
        return Encoding(text, ids, [self.id_to_piece(i) for i in ids], add_bos and self.bos_id is not None)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; special tokens are dropped (or written as their strings)."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        specials = set(self.special_tokens.values())
        if skip_special_tokens:
            return self._decode_plain([i for i in ids if i not in specials])
        # Special tokens written out: decode the runs between them, keeping a run's leading
        # space unless it starts the text (only the dummy prefix of the very start is dropped).
        out: list[str] = []
        run: list[int] = []
        for i in ids + [None]:
            if i is None or i in specials:
                if run:
                    text = self._decode_plain(run)
                    if out and self.id_to_piece(run[0]).startswith("▁") and not text.startswith(" "):
                        text = " " + text
                    out.append(text)
                    run = []
                if i is not None:
                    out.append(self.id_to_piece(i))
            else:
                run.append(i)
        return "".join(out)

    def pieces(self, ids) -> list[str]:
        """The vocabulary piece of each id (``▁`` marks a leading space)."""
        return [self.id_to_piece(int(i)) for i in ids]

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
        ids: list[int] = []
        for user, answer in zip(msgs[::2], msgs[1::2]):
            ids += self.encode(f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} ")
            if self.eos_id is not None:
                ids.append(self.eos_id)
        ids += self.encode(f"{B_INST} {msgs[-1]['content'].strip()} {E_INST}")
        return ids

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render the checkpoint's own jinja chat template (sandboxed, as transformers does)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template; use llama2_chat() for Llama 2")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TokenizerError(f"chat template refused the messages: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.id_to_piece(self.bos_id) if self.bos_id is not None else "",
                eos_token=self.id_to_piece(self.eos_id) if self.eos_id is not None else "",
            )
        except TemplateError as exc:
            raise TokenizerError(f"chat template failed to render: {exc}") from None


class SentencePieceTokenizer(Tokenizer):
    """tokenizer.model through the ``sentencepiece`` library (Llama 1/2)."""

    backend = "sentencepiece"

    def __init__(self, path: Path, settings: dict[str, Any]) -> None:
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise TokenizerError(f"{path}: not a valid sentencepiece model ({exc}); re-download it") from None
        self.vocab_size = self.sp.get_piece_size()
        if self.vocab_size == 0:
            raise TokenizerError(f"{path}: sentencepiece model has an empty vocabulary")
        bos, eos = self.sp.bos_id(), self.sp.eos_id()
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = eos if eos >= 0 else None
        self.special_tokens = {
            self.sp.id_to_piece(i): i
            for i in range(self.vocab_size)
            if self.sp.is_control(i) or self.sp.is_unknown(i)
        }
        self.chat_template = _chat_template(settings)
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

    def _decode_plain(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))


class HFTokenizersTokenizer(Tokenizer):
    """tokenizer.json through the ``tokenizers`` library (Llama 3 family)."""

    backend = "tokenizers"

    def __init__(self, path: Path, settings: dict[str, Any], bos_id: int | None, eos_id: int | None) -> None:
        from tokenizers import Tokenizer as TkTokenizer

        try:
            self.tk = TkTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a generic Exception with its message
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({exc}); re-download it") from None
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        self.special_tokens = {
            t.content: i for i, t in self.tk.get_added_tokens_decoder().items() if t.special
        }
        self.bos_id = self._token_id(settings.get("bos_token"), bos_id)
        self.eos_id = self._token_id(settings.get("eos_token"), eos_id)
        self.chat_template = _chat_template(settings)

    @cached_property
    def _tk_literal(self):
        """A copy that reads special-token strings as plain text (built on first use: copying a
        128k-token vocabulary takes a fifth of a second)."""
        from tokenizers import Tokenizer as TkTokenizer

        tk = TkTokenizer.from_str(self.tk.to_str())
        tk.encode_special_tokens = True
        return tk

    def _token_id(self, token, fallback: int | None) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and self.tk.token_to_id(token) is not None:
            return self.tk.token_to_id(token)
        return fallback

    def encode(self, text: str, add_bos: bool = True, *, parse_special: bool = False) -> list[int]:
        # The tokenizers library splits special-token strings itself (and knows its own
        # prefix-space rules around them); a second instance reads them as plain text.
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        tk = self.tk if parse_special else self._tk_literal
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        return ids + tk.encode(text, add_special_tokens=False).ids

    def _encode_plain(self, text: str, first: bool = True) -> list[int]:
        return self._tk_literal.encode(text, add_special_tokens=False).ids

    def _decode_plain(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        piece = self.tk.id_to_token(int(i))
        return piece if piece is not None else f"<id {i}>"


def _chat_template(settings: dict[str, Any]) -> str | None:
    template = settings.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def load_tokenizer(folder: Path, *, bos_id: int | None = None, eos_id: int | None = None) -> Tokenizer:
    """tokenizer.model (sentencepiece) when present, else tokenizer.json (tokenizers)."""
    folder = Path(folder)
    settings: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        settings = read_json(folder / "tokenizer_config.json", TokenizerError)
    if (folder / "chat_template.jinja").is_file() and "chat_template" not in settings:
        settings["chat_template"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "tokenizer.model").is_file():
        return SentencePieceTokenizer(folder / "tokenizer.model", settings)
    if (folder / "tokenizer.json").is_file():
        return HFTokenizersTokenizer(folder / "tokenizer.json", settings, bos_id, eos_id)
    raise TokenizerError(
        f"{folder}: no tokenizer found: expected tokenizer.model (Llama 1/2) or tokenizer.json (Llama 3)"
    )
