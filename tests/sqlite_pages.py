"""Crafting SQLite files whose pages disagree with each other: a table b-tree leaf linked from
its parent twice, so that a seek by key passes it by while a scan of every page reads it.
(SQLite's file format: https://www.sqlite.org/fileformat2.html, section 1.6.)"""

from __future__ import annotations

import sqlite3
import struct
from pathlib import Path

_INTERIOR, _LEAF = 5, 13  # table b-tree page kinds


def _varint(data: bytes | bytearray, at: int) -> int:
    value = 0
    for i in range(9):
        byte = data[at + i]
        if i == 8:
            return value << 8 | byte
        value = value << 7 | byte & 0x7F
        if not byte & 0x80:
            return value
    raise AssertionError("unreachable")


def _encode_varint(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | value & 0x7F)
        value >>= 7
    return bytes(reversed(out))


def link_leaf_twice(path: Path, table: str, key: int) -> None:
    """Give the leaf that holds rowid `key` a second link from its parent, just before the first
    one, under the separator `key - 1`: a seek for `key` skips the new link, a scan reads the
    leaf through both."""
    with sqlite3.connect(path) as connection:
        (root,) = connection.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
    connection.close()
    data = bytearray(path.read_bytes())
    page_size = struct.unpack(">H", data[16:18])[0]
    page_size = 65536 if page_size == 1 else page_size

    def header(page: int) -> int:
        return (page - 1) * page_size + (100 if page == 1 else 0)

    def cells(page: int) -> list[int]:
        at = header(page)
        count = struct.unpack(">H", data[at + 3 : at + 5])[0]
        return [
            (page - 1) * page_size + struct.unpack(">H", data[at + 12 + 2 * i : at + 14 + 2 * i])[0]
            for i in range(count)
        ]

    page = root
    while True:
        at = header(page)
        assert data[at] == _INTERIOR, "the table must be deeper than one page"
        links = [
            (struct.unpack(">I", data[c : c + 4])[0], _varint(data, c + 4)) for c in cells(page)
        ]
        links.append((struct.unpack(">I", data[at + 8 : at + 12])[0], 1 << 62))  # right-most
        index = next(i for i, (_, separator) in enumerate(links) if key <= separator)
        child = links[index][0]
        if data[header(child)] == _LEAF:
            break
        page = child
    cell = struct.pack(">I", child) + _encode_varint(key - 1)
    count = len(links) - 1
    content = struct.unpack(">H", data[at + 5 : at + 7])[0] or 65536
    start = (page - 1) * page_size
    new_content = content - len(cell)
    assert start + new_content >= at + 12 + 2 * (count + 1), "no room on the parent page"
    data[start + new_content : start + content] = cell
    pointers = data[at + 12 : at + 12 + 2 * count]
    pointers[2 * index : 2 * index] = struct.pack(">H", new_content)
    data[at + 12 : at + 12 + len(pointers)] = pointers
    data[at + 3 : at + 5] = struct.pack(">H", count + 1)
    data[at + 5 : at + 7] = struct.pack(">H", new_content)
    path.write_bytes(bytes(data))
