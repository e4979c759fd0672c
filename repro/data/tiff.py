"""A small TIFF directory reader, and a writer that joins single-page TIFFs into one file.

libvips writes a pyramid only as a halving series (1, 1/2, 1/4, ...); PANDA's Radboud TIFFs have
pages at 1, 1/4 and 1/16, and an Aperio SVS has stripped thumbnail, label and macro pages between
its tiled levels. :func:`join_pages` builds such files from pages libvips wrote one by one: it
copies each page's file unchanged and writes new directories (IFDs) whose tile or strip offsets
point into the copies. Classic TIFF and BigTIFF, either byte order, are handled.

:func:`read_directories` lists the directories of a TIFF (tags and raw values) without decoding
pixels, e.g. to see which pages are tiled and how they are compressed.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4}
TYPE_SIZES.update({16: 8, 17: 8, 18: 8})
_INT_FORMATS = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}

NEW_SUBFILE_TYPE = 254
WIDTH, HEIGHT, COMPRESSION, DESCRIPTION = 256, 257, 259, 270
STRIP_OFFSETS, TILE_WIDTH, TILE_OFFSETS = 273, 322, 324
SUB_IFDS, EXIF_IFD, GPS_IFD = 330, 34665, 34853
_OFFSET_TAGS = (STRIP_OFFSETS, TILE_OFFSETS)
_DROPPED_TAGS = (SUB_IFDS, EXIF_IFD, GPS_IFD)  # pointers to further directories


class TiffFormatError(ValueError):
    """Not a TIFF, or a damaged one."""


@dataclass(frozen=True)
class Entry:
    """One directory entry: tag, TIFF type, value count and the raw value bytes."""

    tag: int
    type: int
    count: int
    data: bytes

    def values(self, order: str) -> tuple[int, ...]:
        """The integer values (integer types only)."""
        code = _INT_FORMATS.get(self.type)
        if code is None:
            raise TiffFormatError(f"tag {self.tag} has non-integer type {self.type}")
        return struct.unpack(f"{order}{self.count}{code}", self.data)

    def text(self) -> str:
        """An ASCII value without its trailing NULs."""
        return self.data.rstrip(b"\x00").decode("latin-1")


@dataclass(frozen=True)
class Directory:
    """One TIFF directory (a page)."""

    entries: dict[int, Entry]
    order: str  # struct byte-order character: "<" or ">"

    def get(self, tag: int, default: int | None = None) -> int | None:
        """The first integer value of ``tag``, or ``default``."""
        entry = self.entries.get(tag)
        return entry.values(self.order)[0] if entry is not None else default

    @property
    def width(self) -> int:
        return int(self.get(WIDTH, 0))

    @property
    def height(self) -> int:
        return int(self.get(HEIGHT, 0))

    @property
    def tiled(self) -> bool:
        return TILE_WIDTH in self.entries

    @property
    def compression(self) -> int:
        return int(self.get(COMPRESSION, 1))

    @property
    def description(self) -> str:
        entry = self.entries.get(DESCRIPTION)
        return entry.text() if entry is not None else ""


def _layout(header: bytes) -> tuple[str, bool]:
    """(byte order, bigtiff) from the first bytes of a file."""
    if header[:2] == b"II":
        order = "<"
    elif header[:2] == b"MM":
        order = ">"
    else:
        raise TiffFormatError("not a TIFF file (no II/MM byte-order mark)")
    magic = struct.unpack(f"{order}H", header[2:4])[0]
    if magic not in (42, 43):
        raise TiffFormatError(f"not a TIFF file (magic number {magic})")
    return order, magic == 43


def read_directories(path: str | os.PathLike[str], limit: int = 1000) -> list[Directory]:
    """The directories (pages) of a TIFF, in file order; sub-IFDs are not followed."""
    with open(path, "rb") as handle:
        header = handle.read(16)
        order, big = _layout(header)
        size = os.fstat(handle.fileno()).st_size
        offset = struct.unpack(f"{order}Q", header[8:16])[0] if big else None
        if offset is None:
            offset = struct.unpack(f"{order}I", header[4:8])[0]
        count_format, entry_size, pointer = ("Q", 20, "Q") if big else ("H", 12, "I")
        inline = 8 if big else 4
        directories: list[Directory] = []
        seen: set[int] = set()
        while offset and len(directories) < limit:
            if offset in seen or offset + 2 > size:
                raise TiffFormatError(f"directory offset {offset} is outside the file or loops")
            seen.add(offset)
            handle.seek(offset)
            width = struct.calcsize(count_format)
            (n_entries,) = struct.unpack(f"{order}{count_format}", handle.read(width))
            raw = handle.read(n_entries * entry_size + struct.calcsize(pointer))
            if len(raw) < n_entries * entry_size + struct.calcsize(pointer):
                raise TiffFormatError("truncated directory")
            entries: dict[int, Entry] = {}
            for index in range(n_entries):
                chunk = raw[index * entry_size : (index + 1) * entry_size]
                if big:
                    tag, kind, count = struct.unpack(f"{order}HHQ", chunk[:12])
                else:
                    tag, kind, count = struct.unpack(f"{order}HHI", chunk[:8])
                value = chunk[12:] if big else chunk[8:]
                nbytes = TYPE_SIZES.get(kind, 1) * count
                if nbytes <= inline:
                    data = value[:nbytes]
                else:
                    (where,) = struct.unpack(f"{order}{pointer}", value)
                    if where + nbytes > size:
                        raise TiffFormatError(f"tag {tag}: value outside the file")
                    position = handle.tell()
                    handle.seek(where)
                    data = handle.read(nbytes)
                    handle.seek(position)
                entries[tag] = Entry(tag, kind, count, data)
            directories.append(Directory(entries, order))
            (offset,) = struct.unpack(f"{order}{pointer}", raw[n_entries * entry_size :])
    return directories


def join_pages(
    sources: Sequence[str | os.PathLike[str]],
    path: str | os.PathLike[str],
    subfile_types: Sequence[int] | None = None,
) -> None:
    """Write one multi-page TIFF whose page ``k`` is the (first) page of ``sources[k]``.

    Args:
        sources: single-page TIFFs of one byte order (e.g. written by pyvips ``tiffsave``).
        path: the output file (written in place; use :func:`repro.io.atomic.atomic_path`).
        subfile_types: ``NewSubfileType`` per page (default: 0 for page 0, 1 = reduced
            resolution for the others).

    The output is a BigTIFF when the total size needs 64-bit offsets or any source is one.
    """
    directories = []
    sizes = []
    for source in sources:
        pages = read_directories(source, limit=1)
        if not pages:
            raise TiffFormatError(f"{source}: no directory")
        directories.append(pages[0])
        sizes.append(Path(source).stat().st_size)
    order = directories[0].order
    if any(d.order != order for d in directories):
        raise TiffFormatError("sources differ in byte order")
    if subfile_types is None:
        subfile_types = [0] + [1] * (len(sources) - 1)
    big = any(_is_bigtiff(source) for source in sources)
    big = big or sum(sizes) + 65536 * len(sources) >= 2**32 - 1
    header_size = 16 if big else 8
    bases, position = [], header_size
    for size in sizes:
        bases.append(position)
        position += size + (size % 2)
    blocks = [
        _directory_block(d, base, subfile, order, big)
        for d, base, subfile in zip(directories, bases, subfile_types, strict=True)
    ]
    # Lay the directories out after the copies; each block knows its own length.
    starts, cursor = [], position
    for block in blocks:
        starts.append(cursor)
        cursor += block.size
    with open(path, "wb") as out:
        magic = 43 if big else 42
        if big:
            out.write(struct.pack(f"{order}2sHHHQ", order_mark(order), magic, 8, 0, starts[0]))
        else:
            out.write(struct.pack(f"{order}2sHI", order_mark(order), magic, starts[0]))
        for source, size in zip(sources, sizes, strict=True):
            with open(source, "rb") as handle:
                shutil.copyfileobj(handle, out, length=16 * 2**20)
            if size % 2:
                out.write(b"\x00")
        for index, block in enumerate(blocks):
            following = starts[index + 1] if index + 1 < len(blocks) else 0
            out.write(block.render(starts[index], following))


def order_mark(order: str) -> bytes:
    """The byte-order mark of a TIFF header."""
    return b"II" if order == "<" else b"MM"


def _is_bigtiff(path: str | os.PathLike[str]) -> bool:
    with open(path, "rb") as handle:
        return _layout(handle.read(4))[1]


@dataclass
class _Block:
    """A directory and its out-of-line values, rendered once its position is known."""

    entries: list[Entry]
    order: str
    big: bool

    @property
    def _entry_size(self) -> int:
        return 20 if self.big else 12

    @property
    def _inline(self) -> int:
        return 8 if self.big else 4

    @property
    def _head(self) -> int:
        return (8 if self.big else 2) + len(self.entries) * self._entry_size + self._inline

    @property
    def size(self) -> int:
        extra = sum(_padded(len(e.data)) for e in self.entries if len(e.data) > self._inline)
        return self._head + extra

    def render(self, start: int, following: int) -> bytes:
        order, big = self.order, self.big
        head = [struct.pack(f"{order}{'Q' if big else 'H'}", len(self.entries))]
        tail: list[bytes] = []
        where = start + self._head
        for entry in self.entries:
            if big:
                head.append(struct.pack(f"{order}HHQ", entry.tag, entry.type, entry.count))
            else:
                head.append(struct.pack(f"{order}HHI", entry.tag, entry.type, entry.count))
            if len(entry.data) <= self._inline:
                head.append(entry.data.ljust(self._inline, b"\x00"))
            else:
                head.append(struct.pack(f"{order}{'Q' if big else 'I'}", where))
                tail.append(entry.data.ljust(_padded(len(entry.data)), b"\x00"))
                where += _padded(len(entry.data))
        head.append(struct.pack(f"{order}{'Q' if big else 'I'}", following))
        return b"".join(head + tail)


def _padded(n: int) -> int:
    return n + (n % 2)


def _directory_block(
    directory: Directory, base: int, subfile_type: int, order: str, big: bool
) -> _Block:
    """The entries of ``directory`` with pixel offsets moved by ``base`` and NewSubfileType set."""
    entries = {tag: entry for tag, entry in directory.entries.items() if tag not in _DROPPED_TAGS}
    for tag in _OFFSET_TAGS:
        if tag in entries:
            moved = [value + base for value in entries[tag].values(order)]
            kind, code = (16, "Q") if big else (4, "I")
            data = struct.pack(f"{order}{len(moved)}{code}", *moved)
            entries[tag] = Entry(tag, kind, len(moved), data)
    entries[NEW_SUBFILE_TYPE] = Entry(
        NEW_SUBFILE_TYPE, 4, 1, struct.pack(f"{order}I", subfile_type)
    )
    return _Block([entries[tag] for tag in sorted(entries)], order, big)
