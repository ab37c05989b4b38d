"""One way to show a token as text, everywhere: plots, tables, widgets and explorers.

A vocabulary piece is hard to read as it is stored: a sentencepiece vocabulary (Llama 1/2) writes a
leading space as ``▁`` and a newline as the byte piece ``<0x0A>``; a byte-level BPE vocabulary
(Llama 3, SmolLM2) spells every byte as a printable letter, so a space is ``Ġ`` and a newline
``Ċ``. :func:`shown` keeps the space marks (they are the lesson: the space belongs to the piece)
and turns what would be invisible into visible signs; :data:`LEGEND` explains them once.
"""

from __future__ import annotations

import functools
import re

# Invisible characters, by what stands for them in a vocabulary, and the sign shown instead.
_SIGNS = {"\n": "⏎", "<0x0A>": "⏎", "\t": "⇥", "<0x09>": "⇥", "\r": "␍", "<0x0D>": "␍", "<0x20>": "␣"}
# In a byte-level vocabulary these letters are bytes 0x0A, 0x09, 0x0D; elsewhere they are letters
# (č is Czech), so they are replaced only for a byte-level vocabulary.
_BYTE_LEVEL_SIGNS = {"Ċ": "⏎", "ĉ": "⇥", "č": "␍"}


def _pattern(signs: dict) -> re.Pattern:
    return re.compile("|".join(re.escape(k) for k in sorted(signs, key=len, reverse=True)))


_SIGN_RE = _pattern(_SIGNS)
_BYTE_LEVEL_RE = _pattern({**_SIGNS, **_BYTE_LEVEL_SIGNS})

LEGEND = {
    "▁": "the piece starts with a space (sentencepiece vocabularies: Llama 1/2)",
    "Ġ": "the piece starts with a space (byte-level BPE vocabularies: Llama 3, SmolLM2)",
    "⏎": "a newline",
    "⇥": "a tab",
    "␍": "a carriage return",
    "␣": "a space on its own",
    "<0xNN>": "one byte of a character the vocabulary lacks, or of one split across tokens",
}


@functools.cache
def _byte_of_letter() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the letter a byte-level vocabulary writes -> the byte.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, 0x7F-0xA0, 0xAD)
    are shifted to U+0100.. so that every byte has a visible letter (space -> Ġ, newline -> Ċ).
    """
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(0x100 + i): b for i, b in enumerate(shifted)})
    return table


def _byte_level_text(piece: str) -> str | None:
    """A byte-level piece as the text its bytes spell: ``Ã©`` -> ``é``, with a space kept as ``Ġ``
    (it belongs to the piece: the lesson), bytes of a character split across pieces as ``<0xNN>``,
    and None for a piece outside the alphabet (an added token such as a CJK word)."""
    table = _byte_of_letter()
    if not all(c in table for c in piece):
        return None
    # surrogateescape keeps each byte of an incomplete character as U+DC80+byte, found below.
    text = bytes(table[c] for c in piece).decode("utf-8", errors="surrogateescape")
    text = re.sub("[\udc80-\udcff]", lambda m: f"<0x{ord(m.group(0)) - 0xDC00:02X}>", text)
    if text and not text.strip(" "):  # only spaces: a space on its own
        return "␣" * len(text)
    return text.replace(" ", "Ġ")


def shown(piece: str, *, byte_level: bool = False) -> str:
    """``piece`` with newlines, tabs and lone spaces as visible signs (see :data:`LEGEND`);
    ``byte_level``: the piece is from a byte-level BPE vocabulary (``Tokenizer.byte_level``), whose
    letters are bytes: they are shown as the characters they spell (``Ã©`` -> ``é``)."""
    text = _byte_level_text(piece) if byte_level else None
    if text is not None:  # now plain text: its č is a Czech letter again, not a byte
        piece, byte_level = text, False
    signs = {**_SIGNS, **_BYTE_LEVEL_SIGNS} if byte_level else _SIGNS
    text = (_BYTE_LEVEL_RE if byte_level else _SIGN_RE).sub(lambda m: signs[m.group(0)], piece)
    if text and not text.strip():  # only spaces: nothing would show
        text = text.replace(" ", "␣")
    return text


def quoted(piece: str, *, byte_level: bool = False) -> str:
    """:func:`shown` between thin marks, so that a lone ``.`` or ``,`` stays visible as a token."""
    return f"‹{shown(piece, byte_level=byte_level)}›"


def legend(pieces=None, *, byte_level: bool = False) -> str:
    """One line explaining the signs, limited to those in ``pieces`` when given."""
    if pieces is not None:
        text = "".join(shown(p, byte_level=byte_level) for p in pieces)
        keys = [k for k in LEGEND if (k in text if k != "<0xNN>" else "<0x" in text)]
    else:
        keys = list(LEGEND)
    return "; ".join(f"{k} {LEGEND[k]}" for k in keys)


@functools.cache
def _font_chars() -> frozenset[int]:
    from matplotlib import font_manager, ft2font

    path = font_manager.findfont("DejaVu Sans")
    return frozenset(ft2font.FT2Font(path).get_charmap())


def plot_label(piece: str, width: int = 14, *, byte_level: bool = False) -> str:
    """:func:`shown`, made safe for a matplotlib axis: characters the font lacks (emoji) become
    U+XXXX, other control characters escapes, ``$`` no mathtext, long pieces cut with an ellipsis."""
    chars = _font_chars()
    out = []
    for c in shown(piece, byte_level=byte_level):
        if ord(c) < 32 or ord(c) not in chars:
            out.append(f"U+{ord(c):04X}")
        else:
            out.append(c)
    text = "".join(out).replace("$", r"\$")
    return text if len(text) <= width else text[: width - 1] + "…"


def plot_labels(pieces, width: int = 14, *, byte_level: bool = False) -> list[str]:
    return [plot_label(p, width, byte_level=byte_level) for p in pieces]
