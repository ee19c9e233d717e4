"""GGUF reading: a model file's key/values and tensor infos, without its tensor data.

A GGUF file is `magic "GGUF" | version u32 | tensor_count u64 | kv_count u64 | key/values | tensor
infos | padding | tensor data`. The reader stops after the tensor infos, so a 40 GB blob's header reads
in the time it takes to walk its key/values; arrays longer than `max_array_items` (the tokenizer's
128k tokens and 280k merges) are skipped and kept as a `GGUFArray` that knows only its type and length.

Callers import from `launcher.models.gguf`, which re-exports this module and the writer (`launcher.ggufwrite`)
beside the ModelSpec mapping.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"
GGUF_DEFAULT_ALIGNMENT = 32
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_MAX_ARRAY_ITEMS = 1024

# Far above anything a real model carries; they only stop a corrupt count from allocating memory
# or recursing without end before the file runs out.
_MAX_STRING_BYTES = 1 << 30
_MAX_ARRAY_DEPTH = 8
_MAX_TENSOR_DIMS = 8
_READ_CHUNK_BYTES = 1 << 20


class GGUFError(ValueError):
    """The file is not a GGUF file we can read: the message says what is wrong and where."""


class GGUFValueType(IntEnum):
    """GGUF's value type tags (the numbering is fixed by the format)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


SCALAR_FORMATS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}


@dataclass(frozen=True)
class GGUFArray:
    """An array too long to keep: its item type and length only (`len()` works on it)."""

    item_type: GGUFValueType
    length: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class GGUFFile:
    """A parsed header: the key/values plus what the tensor infos tell without reading tensor data."""

    version: int
    byte_order: str  # "<" little-endian (every file in practice) or ">" big-endian
    metadata: dict[str, object]
    tensor_count: int
    parameter_count: int  # sum of all tensors' element counts; 0 for a metadata-only file
    expert_parameter_count: int  # elements of the MoE expert tensors ("*_exps"), a subset of the above
    tensor_data_offset: int  # where tensor data starts (after alignment padding)
    tensor_names: tuple[str, ...] = field(default=(), repr=False)
    # (name, ggml type number, shape) of each tensor, in file order: what /api/show lists.
    tensor_infos: tuple[tuple[str, int, tuple[int, ...]], ...] = field(default=(), repr=False)


# ---------------------------------------------------------------------------------------------- reading


class _Cursor:
    """Buffered little/big-endian reads over a binary file that track the file offset for error messages."""

    def __init__(self, f: BinaryIO, size_bytes: int | None, origin: int) -> None:
        self._f = f
        self._size_bytes = size_bytes  # from the origin to the end of the file, when the file can seek
        self._origin = origin  # file position of the GGUF magic; offsets count from here
        self._buf = b""
        self._pos = 0  # read position inside _buf
        self._buf_offset = 0  # file offset of _buf[0]
        self.order = "<"
        self.what = "the header"  # what is being read, for the truncation message

    @property
    def offset(self) -> int:
        return self._buf_offset + self._pos

    def _truncated(self, needed: int) -> GGUFError:
        return GGUFError(
            f"truncated GGUF file: needed {needed} more bytes at offset {self.offset} while reading {self.what}"
        )

    def _fill(self, n: int) -> None:
        available = len(self._buf) - self._pos
        if available >= n:
            return
        if self._size_bytes is not None and self.offset + n > self._size_bytes:
            raise self._truncated(n)
        chunks = [self._buf[self._pos :]]
        wanted = max(n - available, _READ_CHUNK_BYTES)
        while available < n:  # pipes and raw files may return less than asked before the end
            chunk = self._f.read(wanted)
            if not chunk:
                raise self._truncated(n - available)
            chunks.append(chunk)
            available += len(chunk)
            wanted -= len(chunk)
        self._buf_offset += self._pos
        self._buf = b"".join(chunks)
        self._pos = 0

    def take(self, n: int) -> bytes:
        self._fill(n)
        data = self._buf[self._pos : self._pos + n]
        self._pos += n
        return data

    def scalar(self, fmt: str) -> object:
        size = struct.calcsize(fmt)
        self._fill(size)
        (value,) = struct.unpack_from(self.order + fmt, self._buf, self._pos)
        self._pos += size
        return value

    def u32(self) -> int:
        return int(self.scalar("I"))  # type: ignore[call-overload]

    def u64(self) -> int:
        return int(self.scalar("Q"))  # type: ignore[call-overload]

    def skip(self, n: int) -> None:
        available = len(self._buf) - self._pos
        if n <= available:
            self._pos += n
            return
        target = self.offset + n
        if self._size_bytes is not None and target > self._size_bytes:
            raise self._truncated(n)
        self._buf, self._pos, self._buf_offset = b"", 0, target
        if self._f.seekable():
            self._f.seek(self._origin + target)
            return
        remaining = n - available
        while remaining > 0:  # a pipe: read and drop
            got = len(self._f.read(min(remaining, _READ_CHUNK_BYTES)))
            if got == 0:
                self._buf_offset = target - remaining
                raise self._truncated(remaining)
            remaining -= got

    def string_length(self) -> int:
        length = self.u64()
        if length > _MAX_STRING_BYTES:
            raise GGUFError(f"corrupt GGUF file: string of {length} bytes at offset {self.offset} in {self.what}")
        return length

    def string(self) -> str:
        # Token texts are not always valid UTF-8 (byte-level BPE pieces); never fail on them.
        return self.take(self.string_length()).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        """Skip `count` length-prefixed strings: the hot loop for 100k-entry tokenizer arrays."""
        unpack_length = struct.Struct(self.order + "Q").unpack_from
        remaining = count
        while remaining:
            buf, pos, end = self._buf, self._pos, len(self._buf)
            while remaining and pos + 8 <= end:  # strings wholly inside the buffer, without method calls
                (length,) = unpack_length(buf, pos)
                if pos + 8 + length > end:
                    break
                pos += 8 + length
                remaining -= 1
            self._pos = pos
            if remaining:  # one string crossing the buffer's end (or a corrupt length)
                length = self.string_length()
                self.skip(length)
                remaining -= 1


def _value_type(raw: int, cursor: _Cursor) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise GGUFError(f"corrupt GGUF file: unknown value type {raw} in {cursor.what}") from None


def _read_value(cursor: _Cursor, value_type: GGUFValueType, max_array_items: int, depth: int = 0) -> object:
    if value_type is GGUFValueType.STRING:
        return cursor.string()
    if value_type is not GGUFValueType.ARRAY:
        return cursor.scalar(SCALAR_FORMATS[value_type])
    if depth >= _MAX_ARRAY_DEPTH:
        raise GGUFError(f"corrupt GGUF file: arrays nested deeper than {_MAX_ARRAY_DEPTH} in {cursor.what}")
    item_type = _value_type(cursor.u32(), cursor)
    length = cursor.u64()
    if length > max_array_items:
        _skip_items(cursor, item_type, length, depth)
        return GGUFArray(item_type, length)
    if item_type in SCALAR_FORMATS:
        fmt = f"{cursor.order}{length}{SCALAR_FORMATS[item_type]}"
        return list(struct.unpack(fmt, cursor.take(struct.calcsize(fmt))))
    return [_read_value(cursor, item_type, max_array_items, depth + 1) for _ in range(length)]


def _skip_items(cursor: _Cursor, item_type: GGUFValueType, length: int, depth: int) -> None:
    if item_type in SCALAR_FORMATS:
        cursor.skip(length * struct.calcsize(SCALAR_FORMATS[item_type]))
    elif item_type is GGUFValueType.STRING:
        cursor.skip_strings(length)
    else:  # nested arrays: walk each one
        if depth + 1 >= _MAX_ARRAY_DEPTH:
            raise GGUFError(f"corrupt GGUF file: arrays nested deeper than {_MAX_ARRAY_DEPTH} in {cursor.what}")
        for _ in range(length):
            inner_type = _value_type(cursor.u32(), cursor)
            _skip_items(cursor, inner_type, cursor.u64(), depth + 1)


def _read_preamble(cursor: _Cursor) -> tuple[int, int, int]:
    """Magic, version and counts; sets the cursor's byte order."""
    magic = cursor.take(4)
    if magic == b"FUGG":  # what Ollama's decoder takes for a big-endian file
        cursor.order = ">"
    elif magic != GGUF_MAGIC:
        raise GGUFError(f"not a GGUF file: it starts with {magic!r}, not {GGUF_MAGIC!r}")
    cursor.what = "the GGUF version"
    version = cursor.u32()
    if version & 0xFFFF == 0 and version:  # llama.cpp's big-endian files keep the magic, swap the rest
        cursor.order = ">"
        version = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in SUPPORTED_VERSIONS:
        supported = " and ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise GGUFError(f"unsupported GGUF version {version} (this reader handles versions {supported})")
    cursor.what = "the tensor and key/value counts"
    tensor_count, kv_count = cursor.u64(), cursor.u64()
    return version, tensor_count, kv_count


def _read_header(f: BinaryIO, max_array_items: int, with_tensors: bool) -> GGUFFile:
    size_bytes: int | None = None
    origin = 0
    if f.seekable():
        origin = f.tell()
        size_bytes = f.seek(0, os.SEEK_END) - origin
        f.seek(origin)
    cursor = _Cursor(f, size_bytes, origin)
    if size_bytes is not None and size_bytes < 4:
        raise GGUFError(f"not a GGUF file: only {size_bytes} bytes long")
    if size_bytes is None:
        cursor.what = "the GGUF magic"
    version, tensor_count, kv_count = _read_preamble(cursor)
    metadata: dict[str, object] = {}
    for index in range(kv_count):
        cursor.what = f"key/value {index + 1} of {kv_count}"
        key = cursor.string()
        cursor.what = f"the value of {key!r}"
        metadata[key] = _read_value(cursor, _value_type(cursor.u32(), cursor), max_array_items)
    if not with_tensors:
        return GGUFFile(version, cursor.order, metadata, tensor_count, 0, 0, 0)
    names: list[str] = []
    infos: list[tuple[str, int, tuple[int, ...]]] = []
    parameter_count = expert_parameter_count = 0
    for index in range(tensor_count):
        cursor.what = f"tensor info {index + 1} of {tensor_count}"
        name = cursor.string()
        n_dims = cursor.u32()
        if n_dims > _MAX_TENSOR_DIMS:
            raise GGUFError(f"corrupt GGUF file: tensor {name!r} has {n_dims} dimensions")
        shape = tuple(cursor.u64() for _ in range(n_dims))
        elements = math.prod(shape)
        ggml_type = cursor.u32()
        cursor.skip(8)  # data offset
        names.append(name)
        infos.append((name, ggml_type, shape))
        parameter_count += elements
        if "_exps" in name:  # llama.cpp's stacked expert tensors: ffn_{gate,up,down}_exps
            expert_parameter_count += elements
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFError(f"corrupt GGUF file: general.alignment is {alignment!r}")
    data_offset = -(-cursor.offset // alignment) * alignment
    return GGUFFile(
        version,
        cursor.order,
        metadata,
        tensor_count,
        parameter_count,
        expert_parameter_count,
        data_offset,
        tuple(names),
        tuple(infos),
    )


@contextmanager
def _opened(source: str | os.PathLike[str] | BinaryIO, mode: str) -> Iterator[BinaryIO]:
    if isinstance(source, str | os.PathLike):
        try:
            with open(source, mode) as f:
                yield f  # type: ignore[misc]
        except FileNotFoundError:
            raise GGUFError(f"{os.fspath(source)}: no such file") from None
        except IsADirectoryError:
            raise GGUFError(f"{os.fspath(source)}: is a directory, not a GGUF file") from None
        except OSError as exc:  # permissions, a symlink loop, an I/O error: still "cannot read it"
            raise GGUFError(f"{os.fspath(source)}: {exc.strerror or exc}") from None
    else:
        yield source


def read_gguf(source: str | os.PathLike[str] | BinaryIO, *, max_array_items: int = DEFAULT_MAX_ARRAY_ITEMS) -> GGUFFile:
    """Parse a GGUF header and its tensor infos (never tensor data). Raises GGUFError.

    `source` is a path or a binary file positioned at the start of the GGUF data (left positioned
    after the tensor infos). Arrays longer than `max_array_items` come back as `GGUFArray`.
    """
    with _opened(source, "rb") as f:
        return _read_header(f, max_array_items, with_tensors=True)


def read_gguf_metadata(
    source: str | os.PathLike[str] | BinaryIO, *, max_array_items: int = DEFAULT_MAX_ARRAY_ITEMS
) -> dict[str, object]:
    """The file's key/values, exactly as stored (see `read_gguf` for arguments and errors)."""
    with _opened(source, "rb") as f:
        return _read_header(f, max_array_items, with_tensors=False).metadata
