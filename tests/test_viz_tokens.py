"""tracer/viz/tokens.py: one renderer for every token shown as text."""

from __future__ import annotations

import pytest
from tokenizers import decoders

from tracer.viz import tokens

# The byte-level alphabet's own decoder (the `tokenizers` library), as the oracle for what a
# piece's bytes spell.
BYTE_LEVEL = decoders.ByteLevel()


def spelled(piece: str) -> str:
    return BYTE_LEVEL.decode([piece])


@pytest.mark.parametrize(("piece", "expected"), [
    ("ĠParis", "ĠParis"),   # the leading space stays the piece's own mark
    ("Ã©", "é"),            # two bytes, one character
    ("ĠÃ©t", "Ġét"),
    ("ðŁĺĬ", "😊"),         # four bytes
    ("Äį", "č"),            # a Czech letter spelled by bytes stays a letter
    ("Ċ", "⏎"), ("ĉ", "⇥"), ("čĊ", "␍⏎"),
    ("Ġ", "␣"), ("ĠĠĠ", "␣␣␣"),
    ("Ã", "<0xC3>"),        # the first byte of a character whose second byte is the next token's
    ("<|im_end|>", "<|im_end|>"),
])
def test_byte_level_pieces_show_the_characters_their_bytes_spell(piece, expected):
    assert tokens.shown(piece, byte_level=True) == expected


def test_sentencepiece_pieces_are_not_read_as_bytes():
    assert tokens.shown("▁Paris") == "▁Paris"
    assert tokens.shown("<0x0A>") == "⏎"
    assert tokens.shown("č") == "č" and tokens.shown("Ċ") == "Ċ"  # letters, in a non-byte-level vocabulary


def test_every_piece_of_a_byte_level_vocabulary_reads_as_its_bytes(llama3_tokenizer_dir):
    """Undo the signs, and every complete piece of a real byte-level vocabulary is what the
    `tokenizers` ByteLevel decoder makes of it."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(llama3_tokenizer_dir / "tokenizer.json")).get_vocab()
    undo = {"Ġ": " ", "⏎": "\n", "⇥": "\t", "␍": "\r"}
    for piece in vocab:
        text, expected = tokens.shown(piece, byte_level=True), spelled(piece)
        if "<0x" in text:  # bytes of a split character: the decoder cannot spell them either
            assert "\ufffd" in expected, (piece, text, expected)
        elif expected and not expected.strip(" "):
            assert text == "␣" * len(expected), piece
        else:
            assert "".join(undo.get(c, c) for c in text) == expected, (piece, text, expected)


def test_legend_names_the_split_byte_sign():
    assert "<0xNN>" in tokens.legend(["Ã"], byte_level=True)
