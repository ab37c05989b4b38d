"""A minimal reader for R's serialization format and lazy-load databases.

The janeaustenr package stores the six novels as character vectors in R's
lazy-load database (``data/Rdata.rdx`` + ``data/Rdata.rdb``).  Rather than
require an R install to extract them, this module reads the XDR
("big-endian binary") serialization format directly.  It implements only the
object types such data files use: character/numeric/logical vectors, generic
vectors (lists), pairlists, symbols and attributes.  Anything else raises
``ValueError`` naming the type code, so a format change fails loudly.

Format reference: R's ``src/main/serialize.c`` (``ReadItem``) and
``src/main/lazyload`` code (``lazyLoadDBfetch``).
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

# SEXP type codes (Rinternals.h) and the pseudo-types used only in streams.
NILSXP, SYMSXP, LISTSXP = 0, 1, 2
CHARSXP, LGLSXP, INTSXP, REALSXP = 9, 10, 13, 14
STRSXP, VECSXP = 16, 19
REFSXP, NILVALUE_SXP, GLOBALENV_SXP = 255, 254, 253
EMPTYENV_SXP, BASEENV_SXP = 242, 241
NA_INTEGER = -(2**31)


@dataclass
class RObject:
    """An R value: ``value`` is a Python list (vectors) and ``attributes`` its named attributes."""

    rtype: int
    value: list
    attributes: dict[str, RObject | list] = field(default_factory=dict)

    @property
    def names(self) -> list[str] | None:
        """The ``names`` attribute as a list of str, or None when absent."""
        names = self.attributes.get("names")
        return None if names is None else list(names.value)


class _Reader:
    """Reads one XDR-serialized object from a byte buffer."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0
        # Symbols (and environments) are written once and then referenced by index.
        self.refs: list[object] = []

    def _take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        if len(chunk) != n:
            raise ValueError("R serialized data ends early")
        self.pos += n
        return chunk

    def _int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def read_header(self) -> None:
        """Checks the stream header ('X\\n', version 2 or 3) and skips it."""
        if self._take(2) != b"X\n":
            raise ValueError("not an XDR-format R serialization (expected 'X\\n')")
        version = self._int()
        self._int()  # version of R that wrote it
        self._int()  # minimal version of R that can read it
        if version == 3:
            # Version 3 names the native encoding of the writer.
            self._take(self._int())
        elif version != 2:
            raise ValueError(f"unsupported R serialization version {version}")

    def read_item(self):
        """Reads one item; returns an RObject, a str (CHARSXP/SYMSXP) or None (NULL)."""
        flags = self._int()
        rtype = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        has_tag = bool(flags & (1 << 10))

        if rtype in (NILVALUE_SXP, NILSXP):
            return None
        if rtype in (GLOBALENV_SXP, EMPTYENV_SXP, BASEENV_SXP):
            return None
        if rtype == REFSXP:
            index = flags >> 8
            if index == 0:
                index = self._int()
            return self.refs[index - 1]
        if rtype == SYMSXP:
            name = self.read_item()  # a CHARSXP
            self.refs.append(name)
            return name
        if rtype == CHARSXP:
            length = self._int()
            if length == -1:
                return None  # NA_character_
            return self._take(length).decode("utf-8", errors="replace")
        if rtype == LISTSXP:
            return self._read_pairlist(has_attr, has_tag)
        if rtype in (STRSXP, VECSXP):
            value = [self.read_item() for _ in range(self._int())]
        elif rtype in (INTSXP, LGLSXP):
            n = self._int()
            value = [None if v == NA_INTEGER else v for v in struct.unpack(f">{n}i", self._take(4 * n))]
        elif rtype == REALSXP:
            n = self._int()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        else:
            raise ValueError(f"R object type {rtype} is not supported by this minimal reader")
        obj = RObject(rtype, value)
        if has_attr:
            obj.attributes = self._attributes_from(self.read_item())
        return obj

    def _read_pairlist(self, has_attr: bool, has_tag: bool) -> RObject:
        # A pairlist is a linked list of (tag, value) cells; the CDR of the last one is NULL.
        # Read it iteratively so long lists do not hit Python's recursion limit.
        tags: list[str | None] = []
        values: list[object] = []
        while True:
            if has_attr:
                self.read_item()  # attributes on a cell: none in the data we read
            tags.append(self.read_item() if has_tag else None)
            values.append(self.read_item())
            flags = self._int()
            rtype = flags & 0xFF
            if rtype != LISTSXP:
                # Put the terminator back and let read_item consume it (usually NILVALUE_SXP).
                self.pos -= 4
                self.read_item()
                break
            has_attr = bool(flags & (1 << 9))
            has_tag = bool(flags & (1 << 10))
        return RObject(LISTSXP, values, {"names": RObject(STRSXP, tags)})

    @staticmethod
    def _attributes_from(pairlist) -> dict:
        if pairlist is None:
            return {}
        return dict(zip(pairlist.names, pairlist.value, strict=True))


def unserialize(data: bytes):
    """Decodes one object from R's XDR serialization (the format of ``saveRDS`` without gzip)."""
    reader = _Reader(data)
    reader.read_header()
    return reader.read_item()


def _decompress_entry(blob: bytes) -> bytes:
    # Each lazy-load entry: 4-byte big-endian uncompressed length, then the payload.
    # zlib entries follow directly; bzip2/xz ones carry a one-byte type code first.
    expected = struct.unpack(">I", blob[:4])[0]
    body = blob[4:]
    if body[:1] == b"2":
        out = bz2.decompress(body[1:])
    elif body[:1] == b"X":
        out = lzma.decompress(body[1:])
    elif body[:1] == b"0":
        out = body[1:]
    else:
        out = zlib.decompress(body)
    if len(out) != expected:
        raise ValueError(f"lazy-load entry decompressed to {len(out)} bytes, expected {expected}")
    return out


def read_lazyload_db(stem: Path) -> dict[str, object]:
    """Reads every variable of an R lazy-load database given its path without extension.

    ``stem`` is e.g. ``.../data/Rdata``; the index ``Rdata.rdx`` (a compressed serialized
    list whose ``variables`` element maps names to (offset, length) into ``Rdata.rdb``)
    and the database ``Rdata.rdb`` must sit beside each other.
    """
    stem = Path(stem)
    raw_index = stem.with_suffix(".rdx").read_bytes()
    # Written with saveRDS-style compression: gzip in current R, plain zlib in old ones.
    index_bytes = gzip.decompress(raw_index) if raw_index[:2] == b"\x1f\x8b" else zlib.decompress(raw_index[4:])
    index = unserialize(index_bytes)
    variables = dict(zip(index.names, index.value, strict=True))["variables"]
    db = stem.with_suffix(".rdb").read_bytes()
    out = {}
    for name, where in zip(variables.names, variables.value, strict=True):
        offset, length = (int(v) for v in where.value)
        out[name] = unserialize(_decompress_entry(db[offset : offset + length]))
    return out
