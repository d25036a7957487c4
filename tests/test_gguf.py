"""openherd.gguf: hostile files fail with one clear line; real files read exactly.

Also checks tests/tinymodels.py, which every other test builds on: real llama.cpp
loads the tiny GGUF, its tokenizer round-trips any UTF-8, and the GGUF and the HF
directory are the same model (llama.cpp vs transformers logits).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import tinymodels as tm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import openherd.gguf as og
from openherd.errors import HerdError, InvalidModelFile
from openherd.gguf import ArrayRef, GGUFInfo, is_gguf, read_gguf

# --------------------------------------------------------------------------- a hand-rolled GGUF builder


def u32(x: int) -> bytes:
    return struct.pack("<I", x)


def u64(x: int) -> bytes:
    return struct.pack("<Q", x)


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return u64(len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, 4, u32(value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, 8, gstr(value))


def tinfo(name: str, dims: list[int], ggml_type: int = 0, offset: int = 0) -> bytes:
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(ggml_type) + u64(offset)


def build(
    kvs=(), tensors=(), data: bytes = b"", *, version: int = 3, n_tensors=None, n_kv=None, align: int = 32
) -> bytes:
    """Header, key-values, tensor infos, padding to `align`, then `data`."""
    out = b"GGUF" + u32(version) + u64(len(tensors) if n_tensors is None else n_tensors)
    out += u64(len(kvs) if n_kv is None else n_kv) + b"".join(kvs) + b"".join(tensors)
    out += b"\0" * (-len(out) % align)
    return out + data


ARCH = kv_str("general.architecture", "llama")
F32_TENSOR = tinfo("a.weight", [8, 2], 0, 0)  # 16 floats = 64 bytes
F32_DATA = np.arange(16, dtype=np.float32).tobytes()


def write(tmp_path: Path, data: bytes, name: str = "model.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def assert_invalid(path: Path, *needles: str) -> str:
    with pytest.raises(InvalidModelFile) as ei:
        read_gguf(path)
    msg = str(ei.value)
    assert "\n" not in msg and "\r" not in msg, msg
    assert path.name in msg, msg
    assert str(path.parent) not in msg, f"full path leaked: {msg}"
    for needle in needles:
        assert needle in msg, msg
    return msg


# --------------------------------------------------------------------------- hostile files

HOSTILE = {
    "empty": (b"", ["not a GGUF file", "only 0 bytes"]),
    "two_bytes": (b"GG", ["not a GGUF file"]),
    "four_bytes": (b"GGUF", ["truncated header"]),
    "zip": (b"PK\x03\x04" + b"\0" * 60, ["not a GGUF file", "bad magic b'PK\\x03\\x04'"]),
    "png": (b"\x89PNG\r\n\x1a\n" + b"\0" * 60, ["not a GGUF file", "bad magic b'\\x89PNG'"]),
    "version_7": (build([ARCH], version=7), ["unsupported", "version 7"]),
    "version_1": (build([ARCH], version=1), ["version 1 is obsolete"]),
    "big_endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + b"\0" * 64, ["big-endian"]),
    "tensor_count_2_62": (build([ARCH], n_tensors=2**62), ["4611686018427387904 tensors"]),
    "kv_count_2_62": (build([ARCH], n_kv=2**62), ["4611686018427387904 key-values"]),
    "kv_count_2_64_minus_1": (build([ARCH], n_kv=2**64 - 1), ["18446744073709551615 key-values"]),
    "huge_key_length": (
        build([u64(2**60) + b"general.name"], n_kv=1) + b"\0" * 64,
        ["key-value #0", "string length 1152921504606846976", "past the end"],
    ),
    "huge_value_length": (
        build([gstr("general.name") + u32(8) + u64(2**60)]) + b"\0" * 64,
        ["'general.name'", "string length 1152921504606846976"],
    ),
    "huge_array_length": (
        build([kv("tokenizer.ggml.tokens", 9, u32(8) + u64(2**61))]) + b"\0" * 64,
        ["'tokenizer.ggml.tokens'", "array of 2305843009213693952 string items"],
    ),
    "huge_u32_array": (
        build([kv("x.arr", 9, u32(4) + u64(2**40))]) + b"\0" * 64,
        ["array of 1099511627776 uint32"],
    ),
    "truncated_kv": (build([ARCH, kv_str("general.name", "tiny model")])[:60], ["file ends"]),
    "truncated_value": (
        (b"GGUF" + u32(3) + u64(0) + u64(1) + gstr("general.name") + u32(4) + b"\x01"),
        ["'general.name'", "file ends"],
    ),
    "unknown_value_type": (build([kv("x.y", 13, u32(0))]), ["'x.y'", "unknown value type 13"]),
    "unknown_array_type": (build([kv("x.y", 9, u32(77) + u64(1) + u32(0))]), ["unknown array item type 77"]),
    "nested_too_deep": (
        build([kv("x.y", 9, u32(9) + u64(1) + u32(9) + u64(1) + u32(4) + u64(1) + u32(0))]),
        ["nested deeper than 2"],
    ),
    "duplicate_key": (build([ARCH, ARCH]), ["duplicate key"]),
    "five_dims": (
        build([ARCH], [tinfo("a.weight", [1, 1, 1, 1, 1])], F32_DATA),
        ["'a.weight'", "5 dimensions"],
    ),
    "zero_dims": (build([ARCH], [tinfo("a.weight", [])], F32_DATA), ["0 dimensions"]),
    "zero_dim": (
        build([ARCH], [tinfo("a.weight", [8, 0])], F32_DATA),
        ["'a.weight'", "zero or out-of-range", "[8, 0]"],
    ),
    "dim_over_int64": (build([ARCH], [tinfo("a.weight", [2**63, 1])], F32_DATA), ["out-of-range"]),
    "elements_over_int64": (
        build([ARCH], [tinfo("a.weight", [2**40, 2**40])], F32_DATA),
        ["more than int64"],
    ),
    "unknown_ggml_type": (build([ARCH], [tinfo("a.weight", [8, 2], 99)], F32_DATA), ["unknown ggml type 99"]),
    "removed_ggml_type_q4_2": (
        build([ARCH], [tinfo("a.weight", [32], 4)], F32_DATA),
        ["unknown ggml type 4"],
    ),
    "block_size": (
        build([ARCH], [tinfo("a.weight", [33, 2], 8)], F32_DATA * 4),
        ["first dimension 33", "Q8_0 block size 32"],
    ),
    "offset_past_end": (
        build([ARCH], [tinfo("a.weight", [8, 2], 0, 4096)], F32_DATA),
        ["'a.weight'", "past the end"],
    ),
    "offset_near_2_64": (
        build([ARCH], [tinfo("a.weight", [8, 2], 0, 2**64 - 32)], F32_DATA),
        ["past the end"],
    ),
    "size_past_end": (
        build([ARCH], [tinfo("a.weight", [8, 4], 0, 0)], F32_DATA),
        ["'a.weight'", "runs past the end of the file"],
    ),
    "huge_tensor": (build([ARCH], [tinfo("a.weight", [2**31, 2**31], 0, 0)], F32_DATA), ["past the end"]),
    "misaligned_offset": (
        build([ARCH], [tinfo("a.weight", [2, 2], 0, 4)], F32_DATA),
        ["offset 4", "alignment 32"],
    ),
    "alignment_not_pow2": (
        build([ARCH, kv_u32("general.alignment", 24)], align=24),
        ["24 is not a power of two"],
    ),
    "alignment_zero": (build([ARCH, kv_u32("general.alignment", 0)]), ["0 is not a power of two"]),
    # llama.cpp reads general.alignment with gguf_get_val_u32, which aborts on any other type.
    "alignment_wrong_type": (build([ARCH, kv_str("general.alignment", "32")]), ["must be a uint32"]),
    "duplicate_tensor": (build([ARCH], [F32_TENSOR, F32_TENSOR], F32_DATA), ["duplicate tensor name"]),
    "overlapping_tensors": (
        build([ARCH], [F32_TENSOR, tinfo("b.weight", [8, 2], 0, 32)], F32_DATA * 2),
        ["'a.weight'", "'b.weight'", "overlap"],
    ),
    "long_tensor_name": (build([ARCH], [tinfo("x" * 64, [8, 2])], F32_DATA), ["longer than 63 bytes"]),
    "newline_in_name": (build([ARCH], [tinfo("evil\nname", [8, 2], 0, 4096)], F32_DATA), ["'evil\\nname'"]),
    "data_section_past_end": (build([ARCH], [F32_TENSOR])[:-4], ["past the end"]),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_file_rejected_with_one_line(tmp_path: Path, case: str):
    data, needles = HOSTILE[case]
    assert_invalid(write(tmp_path, data), *needles)


def test_invalid_model_file_is_a_400_herd_error(tmp_path: Path):
    with pytest.raises(HerdError) as ei:
        read_gguf(write(tmp_path, b"PK\x03\x04"))
    assert ei.value.status == 400
    assert ei.value.to_openai()["error"]["code"] == "invalid_model_file"


def test_missing_file_directory_and_fifo(tmp_path: Path):
    assert_invalid(tmp_path / "nope.gguf", "cannot read model file nope.gguf")
    (tmp_path / "dir.gguf").mkdir()
    assert_invalid(tmp_path / "dir.gguf", "not a regular file")
    # Opening a FIFO for reading blocks until a writer appears: it must be refused, not opened.
    os.mkfifo(tmp_path / "pipe.gguf")
    assert_invalid(tmp_path / "pipe.gguf", "not a regular file")
    assert not is_gguf(tmp_path / "pipe.gguf")


def test_limits_bound_work_on_plausible_files(tiny_gguf: Path, monkeypatch: pytest.MonkeyPatch):
    # The real limits need 100+ MB files to reach; lower them to see each one fire.
    monkeypatch.setattr(og, "MAX_WALKED_ITEMS", 600)  # tokens (512) + merges (253)
    with pytest.raises(InvalidModelFile, match="more than 600 items in total"):
        read_gguf(tiny_gguf)
    monkeypatch.undo()
    monkeypatch.setattr(og, "MAX_STRING_BYTES", 64)  # the chat template is longer
    with pytest.raises(InvalidModelFile, match=r"'tokenizer.chat_template': string of \d+ bytes"):
        read_gguf(tiny_gguf)
    monkeypatch.undo()
    monkeypatch.setattr(og, "MAX_LOADED_ITEMS", 300)  # load_arrays keeps the 512 tokens as a reference
    info = read_gguf(tiny_gguf, load_arrays=True)
    assert info.metadata["tokenizer.ggml.tokens"] == ArrayRef(8, 512)
    assert isinstance(info.metadata["tokenizer.ggml.merges"], list)


# --------------------------------------------------------------------------- real files


def test_tiny_gguf_metadata(tiny_gguf: Path):
    info = read_gguf(tiny_gguf)
    assert isinstance(info, GGUFInfo)
    assert (info.version, info.alignment, info.file_size) == (3, 32, tiny_gguf.stat().st_size)
    assert info.path == str(tiny_gguf)
    assert info.architecture == "llama"
    assert info.name == "tiny-llama-f32-s0"
    assert info.context_length == 512
    assert info.embedding_length == 64
    assert info.block_count == 2
    assert (info.head_count, info.head_count_kv) == (4, 2)
    assert info.vocab_size == 512
    assert info.chat_template == tm.CHATML_TEMPLATE
    assert (info.bos_token_id, info.eos_token_id) == (tm.BOS_ID, tm.EOS_ID)
    assert info.quantization == "F32"
    assert info.get("tokenizer.ggml.model") == "gpt2"
    assert info.get("tokenizer.ggml.add_bos_token") is False
    assert info.get("llama.rope.freq_base") == 10000.0
    # Long arrays are validated but not loaded by default.
    assert info.metadata["tokenizer.ggml.tokens"] == ArrayRef(8, 512)
    assert info.metadata["tokenizer.ggml.tokens"].item_type_name == "string"
    assert info.metadata["tokenizer.ggml.token_type"] == ArrayRef(5, 512)


def test_tiny_gguf_tensors_match_the_writer(tiny_gguf: Path):
    info = read_gguf(tiny_gguf)
    expected = tm.gguf_tensors(tm.TinyConfig())
    assert [t.name for t in info.tensors] == list(expected)
    assert info.parameter_count == sum(a.size for a in expected.values())
    for t in info.tensors:
        assert t.shape == tuple(reversed(expected[t.name].shape))  # GGML order: ne[0] first
        assert t.offset % 32 == 0 and t.offset >= info.data_offset
        assert t.type_name == "F32" and t.nbytes == expected[t.name].nbytes
    # The data really is where the reader says it is.
    embd = info.tensor("token_embd.weight")
    with open(tiny_gguf, "rb") as f:
        f.seek(embd.offset)
        raw = np.frombuffer(f.read(embd.nbytes), dtype=np.float32)
    np.testing.assert_array_equal(raw.reshape(512, 64), expected["token_embd.weight"])
    assert info.tensor("missing") is None


def test_agrees_with_gguf_py_reader(tmp_path: Path):
    """gguf-py's GGUFReader (the reference implementation) on the same files."""
    for dtype in tm.GGUF_DTYPES:
        path = tm.write_tiny_gguf(tmp_path / f"{dtype}.gguf", dtype=dtype, arch="qwen2")
        ours = read_gguf(path, load_arrays=True)
        ref = gguf.GGUFReader(path)
        assert ours.data_offset == ref.data_offset
        assert [(t.name, t.shape, t.ggml_type, t.offset, t.nbytes) for t in ours.tensors] == [
            (t.name, tuple(int(d) for d in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
            for t in ref.tensors
        ]
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            assert key in ours.metadata
            expected = field.contents()
            got = ours.metadata[key]
            if isinstance(expected, float):
                assert got == pytest.approx(expected)
            else:
                assert got == expected, key


@pytest.mark.parametrize(("dtype", "quant", "matrix_type"), [("f16", "F16", "F16"), ("q8_0", "Q8_0", "Q8_0")])
def test_quantization_and_tensor_types(tmp_path: Path, dtype: str, quant: str, matrix_type: str):
    info = read_gguf(tm.write_tiny_gguf(tmp_path / "m.gguf", dtype=dtype))
    assert info.quantization == quant
    for t in info.tensors:
        assert t.type_name == (matrix_type if len(t.shape) == 2 else "F32"), t
    assert info.parameter_count == sum(a.size for a in tm.gguf_tensors(tm.TinyConfig()).values())


def test_quantization_falls_back_to_dominant_tensor_type(tmp_path: Path):
    path = tmp_path / "no-file-type.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_tensor("big", np.zeros((8, 64), dtype=np.float16))
    w.add_tensor("small", np.zeros(64, dtype=np.float32))
    w.add_tensor(
        "q",
        gguf.quants.quantize(np.zeros((2, 32), np.float32), gguf.GGMLQuantizationType.Q8_0),
        raw_dtype=gguf.GGMLQuantizationType.Q8_0,
    )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    info = read_gguf(path)
    assert "general.file_type" not in info.metadata
    assert info.quantization == "F16"
    assert info.tensor("q").shape == (32, 2) and info.tensor("q").nbytes == 2 * 34
    assert info.parameter_count == 8 * 64 + 64 + 64


def test_load_arrays(tiny_gguf: Path, tmp_path: Path):
    voc = tm.tiny_vocab()
    full = read_gguf(tiny_gguf, load_arrays=True)
    assert full.metadata["tokenizer.ggml.tokens"] == voc.tokens
    assert full.metadata["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in voc.merges]
    assert full.metadata["tokenizer.ggml.token_type"] == [3, 3, 3] + [1] * 509
    assert full.vocab_size == 512
    # max_array raises the load threshold without load_arrays.
    assert read_gguf(tiny_gguf, max_array=1000).metadata["tokenizer.ggml.tokens"] == voc.tokens
    assert read_gguf(tiny_gguf, max_array=0).metadata["tokenizer.ggml.tokens"] == ArrayRef(8, 512)
    spm = read_gguf(tm.write_tiny_gguf(tmp_path / "spm.gguf", vocab="spm"), load_arrays=True)
    assert spm.metadata["tokenizer.ggml.scores"] == tm.tiny_vocab("spm").scores
    assert spm.metadata["tokenizer.ggml.token_type"] == tm.tiny_vocab("spm").token_types


def test_small_values_of_every_type(tmp_path: Path):
    kvs = [
        kv("t.u8", 0, b"\xff"),
        kv("t.i8", 1, b"\xff"),
        kv("t.u16", 2, struct.pack("<H", 65535)),
        kv("t.i16", 3, struct.pack("<h", -2)),
        kv_u32("t.u32", 2**32 - 1),
        kv("t.i32", 5, struct.pack("<i", -3)),
        kv("t.f32", 6, struct.pack("<f", 0.5)),
        kv("t.bool", 7, b"\x01"),
        kv_str("t.str", "héllo 🦙"),
        kv("t.u64", 10, u64(2**64 - 1)),
        kv("t.i64", 11, struct.pack("<q", -(2**63))),
        kv("t.f64", 12, struct.pack("<d", 1e300)),
        kv("t.bools", 9, u32(7) + u64(3) + b"\x01\x00\x01"),
        kv("t.strs", 9, u32(8) + u64(2) + gstr("a") + gstr("")),
        kv("t.nested", 9, u32(9) + u64(2) + u32(4) + u64(1) + u32(7) + u32(8) + u64(1) + gstr("z")),
        kv("t.empty", 9, u32(4) + u64(0)),
        kv_str("t.bad_utf8", b"\xff\xfeok"),
    ]
    info = read_gguf(write(tmp_path, build(kvs)))
    assert info.metadata == {
        "t.u8": 255,
        "t.i8": -1,
        "t.u16": 65535,
        "t.i16": -2,
        "t.u32": 2**32 - 1,
        "t.i32": -3,
        "t.f32": 0.5,
        "t.bool": True,
        "t.str": "héllo 🦙",
        "t.u64": 2**64 - 1,
        "t.i64": -(2**63),
        "t.f64": 1e300,
        "t.bools": [True, False, True],
        "t.strs": ["a", ""],
        "t.nested": [[7], ["z"]],
        "t.empty": [],
        "t.bad_utf8": "\ufffd\ufffdok",
    }
    assert info.tensors == [] and info.architecture is None and info.quantization is None
    assert info.parameter_count == 0 and info.context_length is None and info.vocab_size is None


def test_custom_alignment_and_version_2(tmp_path: Path):
    data = build(
        [ARCH, kv_u32("general.alignment", 64)],
        [tinfo("a.weight", [8, 2], 0, 0), tinfo("b.weight", [4], 0, 64)],
        align=64,
    )
    data += F32_DATA + F32_DATA[:16] + b"\0" * 48
    data = data[:4] + u32(2) + data[8:]
    info = read_gguf(write(tmp_path, data))
    assert (info.version, info.alignment) == (2, 64)
    assert info.data_offset % 64 == 0
    assert [t.offset - info.data_offset for t in info.tensors] == [0, 64]
    assert info.tensor("b.weight").nbytes == 16


def test_is_gguf(tmp_path: Path, tiny_gguf: Path):
    assert is_gguf(tiny_gguf)
    assert not is_gguf(write(tmp_path, b"PK\x03\x04zip"))
    assert not is_gguf(write(tmp_path, b"GG", "short.gguf"))
    assert not is_gguf(tmp_path / "missing.gguf")
    assert not is_gguf(tmp_path)


# --------------------------------------------------------------------------- fuzzing


def _fuzz_seed() -> tuple[bytes, list[tuple[int, int]]]:
    """A small but complete GGUF (strings, string and int arrays, a template, three tensor
    types) and its integer fields as (offset, width) slots: every length, count, type,
    dim and offset, located with gguf-py's reader so the fuzzer can aim at them."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "seed.gguf"
        w = gguf.GGUFWriter(path, "llama")
        w.add_context_length(64)
        w.add_block_count(1)
        w.add_token_list(["<s>", "a", "b", "ab", "🦙"])
        w.add_token_types([3, 1, 1, 1, 1])
        w.add_token_merges(["a b"])
        w.add_chat_template("{{ messages }}")
        w.add_tensor("token_embd.weight", np.ones((5, 32), np.float32))
        w.add_tensor("output_norm.weight", np.ones(32, np.float16))
        w.add_tensor(
            "output.weight",
            gguf.quants.quantize(np.ones((5, 32), np.float32), gguf.GGMLQuantizationType.Q8_0),
            raw_dtype=gguf.GGMLQuantizationType.Q8_0,
        )
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        reader = gguf.GGUFReader(path)
        slots = []
        for fld in [*reader.fields.values(), *(t.field for t in reader.tensors)]:
            at = fld.offset
            for part in fld.parts:
                if part.dtype.itemsize in (4, 8):
                    slots += [
                        (at + i, part.dtype.itemsize) for i in range(0, part.nbytes, part.dtype.itemsize)
                    ]
                at += part.nbytes
        return path.read_bytes(), sorted(set(slots))


FUZZ_SEED, FUZZ_SLOTS = _fuzz_seed()
FUZZ_HEADER_END = 576  # data_offset of the seed file (checked in test_fuzz_seed_file_is_valid)
# Values that hit edge cases when they land on a count, length, type, dim or offset field.
INTERESTING = [
    0,
    1,
    2,
    3,
    4,
    5,
    7,
    8,
    9,
    12,
    13,
    31,
    32,
    33,
    64,
    255,
    2**31,
    2**32 - 1,
    2**32,
    2**62,
    2**63,
    2**64 - 1,
]


@st.composite
def mutated_gguf(draw) -> bytes:
    """Edge-case integers written into the header's integer fields, random byte flips in
    the header region, then maybe a truncation.

    Positions are drawn with sampled_from (uniform) because hypothesis' integers favour
    small values and would rarely reach the tensor infos at the end of the header.
    """
    data = bytearray(FUZZ_SEED)
    for (pos, width), value in draw(
        st.lists(st.tuples(st.sampled_from(FUZZ_SLOTS), st.sampled_from(INTERESTING)), max_size=3)
    ):
        data[pos : pos + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
    for pos, byte in draw(
        st.lists(st.tuples(st.sampled_from(range(FUZZ_HEADER_END)), st.integers(0, 255)), max_size=3)
    ):
        data[pos] = byte
    cut = draw(st.one_of(st.none(), st.none(), st.sampled_from(range(len(data)))))
    return bytes(data if cut is None else data[:cut])


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_fuzz_seed_file_is_valid(fuzz_dir: Path):
    info = read_gguf(write(fuzz_dir, FUZZ_SEED, "seed.gguf"))
    assert len(info.tensors) == 3 and info.vocab_size == 5
    assert info.data_offset == FUZZ_HEADER_END
    assert len(FUZZ_SLOTS) > 40 and FUZZ_SLOTS[0] == (4, 4)  # the version field


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated_gguf())
def test_fuzz_mutations_only_raise_invalid_model_file(fuzz_dir: Path, data: bytes):
    path = write(fuzz_dir, data, "fuzz.gguf")
    try:
        info = read_gguf(path, load_arrays=True)
    except InvalidModelFile as e:
        assert "\n" not in str(e) and "fuzz.gguf" in str(e)
        return
    # Whatever was accepted is self-consistent.
    assert info.alignment & (info.alignment - 1) == 0 and info.data_offset % info.alignment == 0
    end = info.data_offset
    for t in sorted(info.tensors, key=lambda t: t.offset):
        assert 1 <= len(t.shape) <= 4 and min(t.shape) >= 1
        assert t.offset % info.alignment == 0 and end <= t.offset and t.offset + t.nbytes <= len(data)
        end = t.offset + t.nbytes


# --------------------------------------------------------------------------- tinymodels with real llama.cpp


def test_tinymodels_are_deterministic(tmp_path: Path):
    a = tm.write_tiny_gguf(tmp_path / "a.gguf", seed=1).read_bytes()
    b = tm.write_tiny_gguf(tmp_path / "b.gguf", seed=1).read_bytes()
    c = tm.write_tiny_gguf(tmp_path / "c.gguf", seed=2).read_bytes()
    assert a == b and a != c
    hf1 = tm.write_tiny_hf_dir(tmp_path / "h1", seed=1)
    hf2 = tm.write_tiny_hf_dir(tmp_path / "h2", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (hf1 / name).read_bytes() == (hf2 / name).read_bytes(), name


@pytest.mark.parametrize("kind", tm.VOCABS)
def test_tiny_vocab_covers_every_byte(kind: str):
    voc = tm.tiny_vocab(kind)
    assert len(voc) == len(set(voc.tokens)) == len(voc.token_types) == 512
    assert (voc.unk_id, voc.bos_id, voc.eos_id) == (tm.UNK_ID, tm.BOS_ID, tm.EOS_ID)
    if kind == "bpe":
        assert voc.tokens[:3] == list(tm.SPECIAL_TOKENS)
        assert voc.tokens[3:259] == [tm.bytes_to_unicode()[b] for b in range(256)]
    else:
        assert voc.tokens[:3] == list(tm.SPM_SPECIAL_TOKENS)
        assert voc.tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
        assert voc.token_types[3:259] == [tm.TOKEN_BYTE] * 256
        assert len(voc.scores) == 512
    known = set(voc.tokens)
    assert all(a in known and b in known and a + b in known for a, b in voc.merges)


TEXTS = ["héllo wörld 🦙 中文", "The herd moved slowly.", "  two  spaces\n\ttab", "digits 12345", "a\nb", ""]


@pytest.mark.parametrize("vocab", tm.VOCABS)
def test_llama_cpp_tokenizer_round_trips_and_matches_hf(tmp_path: Path, vocab: str):
    import llama_cpp

    voc = tm.tiny_vocab(vocab)
    llm = llama_cpp.Llama(model_path=str(tm.write_tiny_gguf(tmp_path / "m.gguf", vocab=vocab)), verbose=False)
    hf = tm.build_hf_tokenizer(vocab)
    try:
        assert (llm.n_vocab(), llm.token_bos(), llm.token_eos()) == (512, voc.bos_id, voc.eos_id)
        for text in TEXTS:
            # add_bos=True means "as the model says": BOS for "spm", nothing for "bpe".
            ids = llm.tokenize(text.encode(), add_bos=True, special=False)
            assert ids[:1] == [voc.bos_id] if voc.add_bos else voc.bos_id not in ids
            # SentencePiece's leading "▁" is dropped after BOS, so the text comes back exactly.
            assert llm.detokenize(ids).decode("utf-8") == text
            # llama.cpp and the HF tokenizer built from the same vocabulary agree exactly.
            assert ids == hf.encode(text).ids, text
            assert hf.decode(ids, skip_special_tokens=True) == text
        # Special tokens parse to single CONTROL ids.
        eos = voc.tokens[voc.eos_id]
        assert llm.tokenize(f"hi{eos}".encode(), add_bos=False, special=True)[-1] == voc.eos_id
    finally:
        llm.close()


def test_llama_cpp_generates_from_tiny_gguf(tiny_gguf: Path):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, verbose=False)
    try:
        assert llm.metadata["tokenizer.chat_template"] == tm.CHATML_TEMPLATE
        out = llm("The herd moved", max_tokens=12, temperature=0.0)
        again = llm("The herd moved", max_tokens=12, temperature=0.0)
        other = llm("What is the capital of France?", max_tokens=12, temperature=0.0)
        assert out["usage"]["completion_tokens"] == 12  # quiet_specials: greedy never stops early
        assert out["choices"][0]["finish_reason"] == "length"
        assert out["choices"][0]["text"] == again["choices"][0]["text"]
        assert out["choices"][0]["text"] != other["choices"][0]["text"]  # output depends on the prompt
    finally:
        llm.close()


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_llama_cpp_loads_quantized_tiny_gguf(tmp_path: Path, dtype: str):
    import llama_cpp

    path = tm.write_tiny_gguf(tmp_path / f"{dtype}.gguf", dtype=dtype, tie_embeddings=True)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    try:
        out = llm("Hello", max_tokens=4, temperature=0.0)
        assert out["usage"]["completion_tokens"] == 4
    finally:
        llm.close()


@pytest.mark.parametrize(
    ("arch", "tie", "vocab"), [("llama", False, "bpe"), ("llama", True, "bpe"), ("qwen2", False, "bpe"),
                               ("llama", False, "spm")]
)  # fmt: skip
def test_gguf_and_hf_dir_are_the_same_model(tmp_path: Path, arch: str, tie: bool, vocab: str):
    """llama.cpp on the GGUF and transformers on the HF dir give the same tokens and logits.

    This pins the Q/K row permutation (llama), the tensor-name mapping and the HF
    tokenizer files, which the torch loader, the converter and the exporters rely on.
    """
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = tm.write_tiny_gguf(tmp_path / "m.gguf", arch=arch, vocab=vocab, tie_embeddings=tie, seed=7)
    hf_dir = tm.write_tiny_hf_dir(tmp_path / "hf", arch=arch, vocab=vocab, tie_embeddings=tie, seed=7)
    text = "The herd moved slowly, 🦙 中文 42"
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, logits_all=True, verbose=False)
    try:
        ids = llm.tokenize(text.encode())  # BOS as the model's add_bos_token says
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    assert tokenizer.encode(text) == ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    atol = 2e-2
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)
    # The same next token wherever the reference's best logit leads its runner-up by more
    # than the two can differ (2 * atol). A random tiny model has near-ties, and which side
    # of one a position lands on depends on the CPU's kernels (AVX2 against AVX-512 sums
    # in another order): those positions are covered by the allclose above instead.
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * atol
    assert clear.sum() >= len(ids) // 2  # the check below is not vacuous
    assert (ours.argmax(-1)[clear] == ref.argmax(-1)[clear]).all()


def test_hf_dir_chat_template_renders_chatml(tiny_hf_dir: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
