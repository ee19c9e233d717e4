"""launcher.models.gguf against the independent `gguf` package (llama.cpp's gguf-py): files it writes we read,
files we write it reads, and model facts survive the trip through a GGUF header."""

from __future__ import annotations

import dataclasses
import io
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

import gguf
import numpy as np
import pytest

from launcher.facts.catalog import CATALOG, ModelSpec, find_model
from launcher.models.gguf import (
    FILE_TYPES,
    GGUFArray,
    GGUFError,
    GGUFValueType,
    file_type_name,
    file_type_number,
    gguf_metadata_for_spec,
    read_gguf,
    read_gguf_metadata,
    spec_from_gguf,
    write_gguf_metadata,
)

GB = 1000**3


def _write_with_gguf_py(path: Path, arch: str, fill: Any, *, endian: Any = None) -> None:
    """Write a GGUF file with llama.cpp's own writer; `fill(writer)` adds key/values and tensors."""
    kwargs = {} if endian is None else {"endianess": endian}
    writer = gguf.GGUFWriter(str(path), arch, **kwargs)
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _fields_by_gguf_py(path: Path) -> dict[str, tuple[list[Any], Any]]:
    """Every key/value as gguf-py's reader sees it: (value types, decoded contents)."""
    reader = gguf.GGUFReader(str(path))
    return {
        name: (list(field.types), field.contents())
        for name, field in reader.fields.items()
        if not name.startswith("GGUF.")
    }


def _without_catalog_names(spec: ModelSpec) -> ModelSpec:
    return dataclasses.replace(spec, aliases=(), capabilities=None)  # the template's, not the file's


# ------------------------------------------------------------------------------------- reading real files


def test_reads_every_value_type_written_by_gguf_py(tmp_path: Path) -> None:
    path = tmp_path / "types.gguf"

    def fill(w: Any) -> None:
        w.add_uint8("t.u8", 200)
        w.add_int8("t.i8", -100)
        w.add_uint16("t.u16", 60000)
        w.add_int16("t.i16", -30000)
        w.add_uint32("t.u32", 4_000_000_000)
        w.add_int32("t.i32", -2_000_000_000)
        w.add_float32("t.f32", 0.5)
        w.add_uint64("t.u64", 1 << 60)
        w.add_int64("t.i64", -(1 << 60))
        w.add_float64("t.f64", 1e-300)
        w.add_bool("t.yes", True)
        w.add_bool("t.no", False)
        w.add_string("t.text", "héllo wörld ✓")
        w.add_array("t.ints", [1, 2, 3])
        w.add_array("t.floats", [0.25, -1.5])
        w.add_array("t.words", ["a", "", "ccc"])
        w.add_array("t.nested", [[1, 2], [3, 4, 5]])
        w.add_array("t.nested_words", [["x"], ["y", "z"]])

    _write_with_gguf_py(path, "llama", fill)
    metadata = read_gguf_metadata(path)

    assert metadata == {
        "general.architecture": "llama",
        "t.u8": 200,
        "t.i8": -100,
        "t.u16": 60000,
        "t.i16": -30000,
        "t.u32": 4_000_000_000,
        "t.i32": -2_000_000_000,
        "t.f32": 0.5,
        "t.u64": 1 << 60,
        "t.i64": -(1 << 60),
        "t.f64": 1e-300,
        "t.yes": True,
        "t.no": False,
        "t.text": "héllo wörld ✓",
        "t.ints": [1, 2, 3],
        "t.floats": [0.25, -1.5],
        "t.words": ["a", "", "ccc"],
        "t.nested": [[1, 2], [3, 4, 5]],
        "t.nested_words": [["x"], ["y", "z"]],
    }


def test_long_arrays_keep_only_type_and_length(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.gguf"
    tokens = [f"<tok{i}>" for i in range(128_256)]

    def fill(w: Any) -> None:
        w.add_token_list(tokens)
        w.add_token_scores([0.0] * len(tokens))
        w.add_token_merges([f"a{i} b{i}" for i in range(5000)])
        w.add_array("t.nested", [[i, i] for i in range(2000)])
        w.add_string("t.after", "still read")  # keys after the skipped arrays come through intact

    _write_with_gguf_py(path, "llama", fill)
    metadata = read_gguf_metadata(path)

    assert metadata["tokenizer.ggml.tokens"] == GGUFArray(GGUFValueType.STRING, 128_256)
    assert len(metadata["tokenizer.ggml.tokens"]) == 128_256
    assert metadata["tokenizer.ggml.scores"] == GGUFArray(GGUFValueType.FLOAT32, 128_256)
    assert metadata["tokenizer.ggml.merges"] == GGUFArray(GGUFValueType.STRING, 5000)
    assert metadata["t.nested"] == GGUFArray(GGUFValueType.ARRAY, 2000)
    assert metadata["t.after"] == "still read"

    everything = read_gguf_metadata(path, max_array_items=200_000)
    assert everything["tokenizer.ggml.tokens"] == tokens
    nothing = read_gguf_metadata(path, max_array_items=0)
    assert nothing["t.after"] == "still read"
    assert isinstance(nothing["t.nested"], GGUFArray)


def test_tensor_infos_give_parameter_count_and_data_offset(tmp_path: Path) -> None:
    path = tmp_path / "moe.gguf"

    def fill(w: Any) -> None:
        w.add_block_count(1)
        w.add_embedding_length(16)
        w.add_expert_count(4)
        w.add_expert_used_count(1)
        w.add_tensor("token_embd.weight", np.zeros((10, 16), dtype=np.float32))
        w.add_tensor("blk.0.ffn_up_exps.weight", np.zeros((4, 8, 16), dtype=np.float32))
        w.add_tensor("blk.0.attn_q.weight", np.zeros((16, 16), dtype=np.float16))

    _write_with_gguf_py(path, "qwen3moe", fill)
    header = read_gguf(path)

    assert header.version == 3
    assert header.tensor_count == 3
    assert header.tensor_names == ("token_embd.weight", "blk.0.ffn_up_exps.weight", "blk.0.attn_q.weight")
    assert header.parameter_count == 160 + 512 + 256
    assert header.expert_parameter_count == 512
    assert header.tensor_data_offset == gguf.GGUFReader(str(path)).data_offset

    spec = spec_from_gguf(header, name="tiny-moe", file_size_bytes=path.stat().st_size)
    assert spec.parameter_count == 928  # the file states none: counted from the tensor infos
    assert spec.active_parameter_count == 928 - 512 * 3 // 4  # one of four experts read per token


def test_header_of_a_huge_blob_is_read_without_its_tensor_data(tmp_path: Path) -> None:
    """A 40 GB model: the tensor infos declare 40 GB of data (a sparse file), only the header is read."""
    path = tmp_path / "huge.gguf"
    rows = 40 * GB // (8192 * 2)

    def fill(w: Any) -> None:
        w.add_block_count(80)
        w.add_tensor_info("blk.0.ffn_up.weight", (rows, 8192), np.dtype(np.float16), rows * 8192 * 2)

    writer = gguf.GGUFWriter(str(path), "llama")
    fill(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    header_bytes = path.stat().st_size
    os.truncate(path, header_bytes + 40 * GB)  # sparse: no disk space used

    class CountingFile(io.FileIO):
        bytes_read = 0

        def read(self, size: int | None = -1) -> bytes:
            data = super().read(size)
            CountingFile.bytes_read += len(data)
            return data

    with CountingFile(path, "rb") as f:
        header = read_gguf(f)
    assert header.parameter_count == rows * 8192
    assert header.tensor_data_offset >= header_bytes - 32
    assert CountingFile.bytes_read <= header_bytes + (1 << 20)  # at most one read-ahead chunk past it


def test_big_endian_file(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"

    def fill(w: Any) -> None:
        w.add_block_count(12)
        w.add_array("t.ints", [7, 8])
        w.add_string("t.text", "big")

    _write_with_gguf_py(path, "bert", fill, endian=gguf.GGUFEndian.BIG)
    header = read_gguf(path)
    assert header.byte_order == ">"
    assert header.metadata == {
        "general.architecture": "bert",
        "bert.block_count": 12,
        "t.ints": [7, 8],
        "t.text": "big",
    }


def test_reads_from_an_unseekable_stream() -> None:
    data = io.BytesIO()
    metadata = {"general.architecture": "llama", "t.words": [f"w{i}" for i in range(3000)], "t.long": "y" * 5000}
    write_gguf_metadata(data, metadata)

    class Pipe(io.RawIOBase):
        def __init__(self, payload: bytes) -> None:
            self._inner = io.BytesIO(payload)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: Any) -> int:
            chunk = self._inner.read(min(len(buffer), 1000))  # short reads, like a pipe
            buffer[: len(chunk)] = chunk
            return len(chunk)

    stream: BinaryIO = Pipe(data.getvalue())  # type: ignore[assignment]
    assert read_gguf_metadata(stream) == {
        "general.architecture": "llama",
        "t.words": GGUFArray(GGUFValueType.STRING, 3000),
        "t.long": "y" * 5000,  # longer than one short read
    }
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_metadata(Pipe(data.getvalue()[:-2000]))  # type: ignore[arg-type]


def test_reads_a_header_that_starts_inside_a_file() -> None:
    data = io.BytesIO(b"prefix")
    data.seek(0, os.SEEK_END)
    write_gguf_metadata(data, {"general.architecture": "llama", "t.big": list(range(300_000)), "t.after": "ok"})
    data.seek(len(b"prefix"))
    metadata = read_gguf_metadata(data)  # skipping 1.2 MB of array seeks relative to where GGUF starts
    assert metadata == {
        "general.architecture": "llama",
        "t.big": GGUFArray(GGUFValueType.UINT32, 300_000),
        "t.after": "ok",
    }


# --------------------------------------------------------------------------------------------- errors


def test_not_a_gguf_file(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest"
    manifest.write_text('{"schemaVersion": 2}')
    with pytest.raises(GGUFError, match=r"not a GGUF file: it starts with b'\{\"sc'"):
        read_gguf_metadata(manifest)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(GGUFError, match="not a GGUF file: only 0 bytes long"):
        read_gguf_metadata(empty)
    with pytest.raises(GGUFError, match="no such file"):
        read_gguf_metadata(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="is a directory"):
        read_gguf_metadata(tmp_path)


@pytest.mark.parametrize("version", [1, 4, 0x7FFF])
def test_unsupported_version(version: int) -> None:
    blob = b"GGUF" + struct.pack("<IQQ", version, 0, 0)
    with pytest.raises(GGUFError, match=f"unsupported GGUF version {version}"):
        read_gguf_metadata(io.BytesIO(blob))


def test_version_2_is_read() -> None:
    good = io.BytesIO()
    write_gguf_metadata(good, {"general.architecture": "llama"})
    blob = bytearray(good.getvalue())
    blob[4:8] = struct.pack("<I", 2)
    assert read_gguf(io.BytesIO(bytes(blob))).version == 2


def test_every_truncation_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "full.gguf"

    def fill(w: Any) -> None:
        w.add_block_count(2)
        w.add_array("t.words", ["alpha", "beta"])
        w.add_array("t.nested", [[1], [2, 3]])
        w.add_tensor("blk.0.attn_q.weight", np.zeros((4, 4), dtype=np.float32))

    _write_with_gguf_py(path, "llama", fill)
    blob = path.read_bytes()
    end_of_infos = read_gguf(path).tensor_data_offset
    for cut in range(4, end_of_infos - 32):
        with pytest.raises(GGUFError, match="truncated GGUF file") as excinfo:
            read_gguf(io.BytesIO(blob[:cut]))
        assert "while reading" in str(excinfo.value)


def test_corrupt_value_type_and_lengths_are_errors() -> None:
    head = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"key"
    with pytest.raises(GGUFError, match="unknown value type 99 in the value of 'key'"):
        read_gguf_metadata(io.BytesIO(head + struct.pack("<I", 99)))
    huge_string = head + struct.pack("<IQ", GGUFValueType.STRING, 1 << 62)
    with pytest.raises(GGUFError, match="corrupt GGUF file: string of"):
        read_gguf_metadata(io.BytesIO(huge_string))
    huge_array = head + struct.pack("<IIQ", GGUFValueType.ARRAY, GGUFValueType.UINT32, 1 << 40)
    with pytest.raises(GGUFError, match="truncated"):
        read_gguf_metadata(io.BytesIO(huge_array))


# ----------------------------------------------------------------------------------- our writer, read back


def test_written_types_as_gguf_py_reads_them(tmp_path: Path) -> None:
    path = tmp_path / "ours.gguf"
    write_gguf_metadata(
        path,
        {
            "general.architecture": "llama",
            "small": 7,
            "large": 1 << 40,
            "negative": -5,
            "very_negative": -(1 << 40),
            "ratio": 0.5,
            "flag": True,
            "ints": [1, 2, 3],
            "big_ints": [1, 1 << 33],
            "signed": [-1, 1],
            "mixed_numbers": [1, 2.5],
            "words": ["a", "b"],
            "flags": [True, False],
            "nested": [[1, 2], [3]],
            "empty": [],
        },
    )
    t = gguf.GGUFValueType
    fields = _fields_by_gguf_py(path)
    assert fields == {
        "general.architecture": ([t.STRING], "llama"),
        "small": ([t.UINT32], 7),
        "large": ([t.UINT64], 1 << 40),
        "negative": ([t.INT32], -5),
        "very_negative": ([t.INT64], -(1 << 40)),
        "ratio": ([t.FLOAT32], 0.5),
        "flag": ([t.BOOL], True),
        "ints": ([t.ARRAY, t.UINT32], [1, 2, 3]),
        "big_ints": ([t.ARRAY, t.UINT64], [1, 1 << 33]),
        "signed": ([t.ARRAY, t.INT32], [-1, 1]),
        "mixed_numbers": ([t.ARRAY, t.FLOAT32], [1.0, 2.5]),
        "words": ([t.ARRAY, t.STRING], ["a", "b"]),
        "flags": ([t.ARRAY, t.BOOL], [True, False]),
        # gguf-py's contents() flattens nested arrays and reports no item type for an empty one.
        "nested": ([t.ARRAY, t.ARRAY, t.UINT32], [1, 2, 3]),
        "empty": ([t.ARRAY], []),
    }
    assert path.stat().st_size % 32 == 0  # padded to the tensor-data alignment, like llama.cpp's writer
    assert read_gguf_metadata(path)["nested"] == [[1, 2], [3]]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ({"x": {"a": 1}}, "x: cannot store a dict"),
        ({"x": [1, "a"]}, "x: GGUF arrays hold one type, this list mixes string, uint32"),
        ({"x": 1 << 64}, "integer out of GGUF's 64-bit range"),
        ({"x": 1e300}, "x: 1e\\+300 does not fit GGUF float32"),
        ({"x": GGUFArray(GGUFValueType.STRING, 5)}, "x: a skipped array"),
        ({"": 1}, "GGUF keys are non-empty strings"),
        ({"general.alignment": 0}, "general.alignment must be a positive integer"),
    ],
)
def test_writer_refuses_what_gguf_cannot_hold(metadata: dict[str, object], message: str) -> None:
    with pytest.raises(GGUFError, match=message):
        write_gguf_metadata(io.BytesIO(), metadata)


# ------------------------------------------------------------------------------------------- model facts


def test_file_type_numbers_match_llama_cpp() -> None:
    for number, name in FILE_TYPES.items():
        expected = "ALL_F32" if name == "F32" else f"MOSTLY_{name}"
        assert gguf.LlamaFileType(number).name == expected
    assert file_type_number("q4_k_m") == 15
    assert file_type_number("Q4_K") == 15
    assert file_type_name(1024) == "unknown"
    with pytest.raises(GGUFError, match="unknown quantization 'Q9_Z'"):
        file_type_number("Q9_Z")


@pytest.mark.parametrize("spec", CATALOG, ids=lambda s: s.name)
def test_catalog_model_round_trips_through_a_gguf_file(tmp_path: Path, spec: ModelSpec) -> None:
    path = tmp_path / "model.gguf"
    write_gguf_metadata(path, gguf_metadata_for_spec(spec))

    fields = _fields_by_gguf_py(path)  # the independent reader agrees on the standard keys
    arch = spec.family
    assert fields["general.architecture"][1] == arch
    assert (
        fields["general.file_type"][1]
        == gguf.LlamaFileType["ALL_F32" if spec.quantization == "F32" else f"MOSTLY_{spec.quantization}"]
    )
    assert fields[f"{arch}.block_count"][1] == spec.block_count
    assert fields[f"{arch}.attention.head_count_kv"][1] == spec.head_count_kv
    assert fields[f"{arch}.context_length"][1] == spec.context_length
    assert (f"{arch}.pooling_type" in fields) == spec.embedding_only
    assert path.stat().st_size < 1024

    back = spec_from_gguf(read_gguf(path), name=spec.name, file_size_bytes=spec.file_size_bytes)
    assert back == _without_catalog_names(spec)


def test_real_style_metadata_per_layer_heads_and_token_vocab(tmp_path: Path) -> None:
    """What convert_hf_to_gguf writes: per-layer head counts, the vocabulary as the token array."""
    path = tmp_path / "gemma3n-like.gguf"
    heads_kv = [2, 2, 2, 0, 4, 4]  # 0: a layer without attention (recurrent); max is what sizes the cache

    def fill(w: Any) -> None:
        w.add_name("Some Model 4B Instruct")
        w.add_file_type(gguf.LlamaFileType.MOSTLY_Q6_K)
        w.add_block_count(len(heads_kv))
        w.add_context_length(32768)
        w.add_embedding_length(2048)
        w.add_head_count([8] * len(heads_kv))
        w.add_head_count_kv(heads_kv)
        w.add_key_length(256)
        w.add_value_length(256)
        w.add_token_list([f"t{i}" for i in range(5000)])
        w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float16))

    _write_with_gguf_py(path, "granitehybrid", fill)
    spec = spec_from_gguf(read_gguf(path), name="hybrid", file_size_bytes=3 * GB)

    assert spec.name == "hybrid:latest"
    assert spec.family == "granitehybrid"
    assert spec.quantization == "Q6_K"
    assert (spec.block_count, spec.embedding_length, spec.context_length) == (6, 2048, 32768)
    assert (spec.head_count, spec.head_count_kv) == (8, 4)
    assert (spec.key_length, spec.value_length) == (256, 256)
    assert spec.vocab_size == 5000  # from tokenizer.ggml.tokens, skipped but counted
    assert spec.parameter_count == 32  # from the tensor infos
    assert not spec.embedding_only
    # Given only the key/values (no tensor infos), the count is estimated from the file size.
    estimated = spec_from_gguf(read_gguf_metadata(path), name="hybrid", file_size_bytes=3 * GB)
    assert estimated.parameter_count == int(3 * GB * 8 / 6.56)


def test_embedding_models_are_recognised() -> None:
    base = {"bert.block_count": 12, "bert.embedding_length": 384, "bert.attention.head_count": 12}
    assert spec_from_gguf({"general.architecture": "bert", **base}, name="e", file_size_bytes=1).embedding_only
    pooled = {"general.architecture": "qwen3", "qwen3.block_count": 2, "qwen3.embedding_length": 8}
    assert spec_from_gguf({**pooled, "qwen3.pooling_type": 3}, name="e", file_size_bytes=1).embedding_only
    assert not spec_from_gguf(pooled, name="e", file_size_bytes=1).embedding_only


def test_defaults_llama_cpp_applies_and_errors_for_missing_facts() -> None:
    minimal = {"general.architecture": "llama", "llama.block_count": 4, "llama.embedding_length": 64}
    spec = spec_from_gguf({**minimal, "llama.attention.head_count": 8}, name="m", file_size_bytes=GB)
    assert spec.head_count_kv == 8  # no GQA stated: one KV head per head
    assert spec.context_length == 2048
    assert spec.quantization == "unknown"
    assert spec.vocab_size == 0

    with pytest.raises(GGUFError, match=r"no general\.architecture"):
        spec_from_gguf({"llama.block_count": 4}, name="m", file_size_bytes=GB)
    with pytest.raises(GGUFError, match=r"no llama\.embedding_length"):
        spec_from_gguf({"general.architecture": "llama", "llama.block_count": 4}, name="m", file_size_bytes=GB)
    with pytest.raises(GGUFError, match=r"llama\.block_count: expected a non-negative integer, got 'four'"):
        spec_from_gguf({**minimal, "llama.block_count": "four"}, name="m", file_size_bytes=GB)


def test_moe_active_parameters_survive_the_metadata_file() -> None:
    mixtral = find_model("mixtral:8x7b")
    assert mixtral is not None
    metadata = gguf_metadata_for_spec(mixtral)
    assert metadata["llama.expert_count"] == 8
    assert metadata["corral.active_parameter_count"] == mixtral.active_parameter_count
    data = io.BytesIO()
    write_gguf_metadata(data, metadata)
    data.seek(0)
    back = spec_from_gguf(read_gguf(data), name="mixtral:8x7b", file_size_bytes=mixtral.file_size_bytes)
    assert back.active_fraction == pytest.approx(mixtral.active_fraction)
