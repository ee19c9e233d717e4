"""GGUF writing: a valid GGUF v3 file holding only key/values (zero tensors).

That is what the simulated store's model blobs contain, so the launcher reads facts the same way
from a real store and a simulated one. Callers import from `launcher.models.gguf`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

from launcher.models.ggufio import (
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    SCALAR_FORMATS,
    GGUFArray,
    GGUFError,
    GGUFValueType,
)


def _int_type(values: list[int]) -> GGUFValueType:
    low, high = min(values, default=0), max(values, default=0)
    if low >= 0:
        if high < 1 << 32:
            return GGUFValueType.UINT32
        if high < 1 << 64:
            return GGUFValueType.UINT64
    elif low >= -(1 << 31) and high < 1 << 31:
        return GGUFValueType.INT32
    if low >= -(1 << 63) and high < 1 << 63:
        return GGUFValueType.INT64
    raise GGUFError(f"integer out of GGUF's 64-bit range: {low if low < -(1 << 63) else high}")


def _infer_type(value: object, key: str) -> GGUFValueType:
    if isinstance(value, bool):  # before int: bool is an int subclass
        return GGUFValueType.BOOL
    if isinstance(value, int):
        return _int_type([value])
    if isinstance(value, float):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, list | tuple):
        return GGUFValueType.ARRAY
    raise GGUFError(f"{key}: cannot store a {type(value).__name__} in GGUF (str, int, float, bool or a list)")


def _array_item_type(items: list[object] | tuple[object, ...], key: str) -> GGUFValueType:
    if not items:
        return GGUFValueType.UINT32  # any type will do for an empty array; llama.cpp uses this one
    kinds = {_infer_type(item, key) for item in items}
    if kinds <= {GGUFValueType.UINT32, GGUFValueType.UINT64, GGUFValueType.INT32, GGUFValueType.INT64}:
        return _int_type([int(item) for item in items])  # type: ignore[call-overload]
    if GGUFValueType.FLOAT32 in kinds and kinds <= {GGUFValueType.FLOAT32, GGUFValueType.UINT32, GGUFValueType.INT32}:
        return GGUFValueType.FLOAT32
    if len(kinds) == 1:
        return kinds.pop()
    names = ", ".join(sorted(kind.name.lower() for kind in kinds))
    raise GGUFError(f"{key}: GGUF arrays hold one type, this list mixes {names}")


def _encode_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _encode_value(value: object, value_type: GGUFValueType, key: str) -> bytes:
    if value_type is GGUFValueType.STRING:
        return _encode_string(str(value))
    if value_type is GGUFValueType.ARRAY:
        items = list(value)  # type: ignore[call-overload]
        item_type = _array_item_type(items, key)
        parts = [struct.pack("<IQ", item_type, len(items))]
        if item_type in SCALAR_FORMATS:
            parts.append(struct.pack(f"<{len(items)}{SCALAR_FORMATS[item_type]}", *items))
        else:
            parts.extend(_encode_value(item, item_type, key) for item in items)
        return b"".join(parts)
    try:
        return struct.pack("<" + SCALAR_FORMATS[value_type], value)
    except (struct.error, OverflowError) as exc:
        raise GGUFError(f"{key}: {value!r} does not fit GGUF {value_type.name.lower()}: {exc}") from None


def encode_gguf_metadata(metadata: Mapping[str, object]) -> bytes:
    """The bytes of a GGUF v3 file holding `metadata` and no tensors (see `write_gguf_metadata`)."""
    parts = [GGUF_MAGIC, struct.pack("<IQQ", 3, 0, len(metadata))]
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise GGUFError(f"GGUF keys are non-empty strings, got {key!r}")
        if isinstance(value, GGUFArray):
            raise GGUFError(f"{key}: a skipped array (only its length was read) cannot be written back")
        value_type = _infer_type(value, key)
        parts += [_encode_string(key), struct.pack("<I", value_type), _encode_value(value, value_type, key)]
    body = b"".join(parts)
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
        raise GGUFError(f"general.alignment must be a positive integer, got {alignment!r}")
    return body + b"\0" * (-len(body) % alignment)


def write_gguf_metadata(target: str | os.PathLike[str] | BinaryIO, metadata: Mapping[str, object]) -> None:
    """Write a valid GGUF v3 file with these key/values and zero tensors. Raises GGUFError.

    Types are inferred: str -> string, bool -> bool, int -> uint32 / uint64 (or int32 / int64 when
    negative) by range, float -> float32, list/tuple -> array of one inferred item type (nested lists
    -> arrays of arrays). A path is written whole (not atomically: callers that share a directory
    write to a temp name and rename); a file object is written at its current position.
    """
    data = encode_gguf_metadata(metadata)
    if isinstance(target, str | os.PathLike):
        Path(target).write_bytes(data)
    else:
        target.write(data)
