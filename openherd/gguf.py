"""Validating GGUF header reader.

Every model file openherd touches passes through ``read_gguf`` before llama.cpp,
the store or the torch loader sees it. llama.cpp's own parser trusts many fields
(an alignment of the wrong type aborts the process, for example), so this reader
checks the whole header against the file first and turns every problem into one
``InvalidModelFile`` line. It is written with ``struct`` over a file object rather
than ``gguf.GGUFReader`` because that reader memory-maps the file and builds numpy
views of whatever lengths the header claims: a hostile file must never crash,
hang, or make us allocate more than the file itself could justify.

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), little-endian:

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, ne: u64 x n_dims, ggml_type: u32, offset: u64)
    padding to `general.alignment` (default 32), then the data section;
    tensor offsets are relative to the start of the data section.

    string = len: u64, then len bytes of UTF-8 (no terminator)
    array  = item_type: u32, count: u64, then count values

What is checked, in order: magic, version (2 or 3, little-endian), counts against
the file size, every string/array length against the bytes left *before* reading
it, value types, array nesting depth, tensor dims (1..4, each >= 1, products within
int64), ggml types and block sizes, `general.alignment` (u32, power of two), and
each tensor's offset (aligned, inside the file, not overlapping another tensor).
Python ints cannot overflow, so "checked arithmetic" is comparing against the file
size before any read or allocation.
"""

from __future__ import annotations

import functools
import itertools
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from .errors import InvalidModelFile

__all__ = ["ArrayRef", "GGUFInfo", "TensorInfo", "is_gguf", "read_gguf"]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp rejects tensor names of 64 bytes or more (ggml.h GGML_MAX_NAME)
INT64_MAX = 2**63 - 1

# Limits that no real model comes near but that bound work and memory on hostile input.
MAX_KV_COUNT = 1 << 20  # real files carry tens to a few hundred key-values
MAX_TENSOR_COUNT = 1 << 20  # the largest MoE checkpoints carry a few thousand per shard
MAX_STRING_BYTES = 64 << 20  # chat templates are kilobytes; nothing legitimate is 64 MiB
MAX_ARRAY_DEPTH = 2  # arrays of arrays at most; real files never nest arrays at all
MAX_WALKED_ITEMS = 1 << 25  # string/array items visited one by one (vocab + merges ~ 1e6)
MAX_LOADED_ITEMS = 1 << 24  # arrays longer than this stay ArrayRef even with load_arrays

_CHUNK = 1 << 20  # header bytes read per refill

# Smallest possible encodings, used to bound counts by the bytes left in the file.
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, value type, one-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # empty name, n_dims, one dim, type, offset

# GGUF value types (gguf.md "gguf_metadata_value_type"): id -> (name, struct code, size).
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, tuple[str, str, int]] = {
    0: ("uint8", "B", 1),
    1: ("int8", "b", 1),
    2: ("uint16", "H", 2),
    3: ("int16", "h", 2),
    4: ("uint32", "I", 4),
    5: ("int32", "i", 4),
    6: ("float32", "f", 4),
    7: ("bool", "B", 1),  # stored as one byte; decoded to bool below
    10: ("uint64", "Q", 8),
    11: ("int64", "q", 8),
    12: ("float64", "d", 8),
}
_TYPE_NAMES = {**{k: v[0] for k, v in _SCALARS.items()}, _STRING: "string", _ARRAY: "array"}
_BOOL = 7
_UINT32 = 4

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_HEADER = struct.Struct("<4sIQQ")


# --------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class ArrayRef:
    """A metadata array that was validated and skipped instead of loaded."""

    item_type: int  # GGUF value type of the items (8 = string, 5 = int32, ...)
    length: int

    @property
    def item_type_name(self) -> str:
        return _TYPE_NAMES.get(self.item_type, str(self.item_type))

    def __len__(self) -> int:
        return self.length


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGML order: shape[0] is ne[0], the contiguous dim (numpy order reversed)
    ggml_type: int  # gguf.GGMLQuantizationType value
    type_name: str  # "F32", "Q4_1", ...
    offset: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return _product(self.shape)


@dataclass
class GGUFInfo:
    path: str
    version: int
    file_size: int
    alignment: int
    data_offset: int  # absolute offset of the data section
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def _arch_value(self, suffix: str) -> Any:
        arch = self.architecture
        return self.metadata.get(f"{arch}.{suffix}") if arch else None

    def _arch_int(self, suffix: str) -> int | None:
        value = self._arch_value(suffix)
        # Some architectures store per-layer values as arrays (e.g. head counts); report the largest.
        if isinstance(value, list) and value and all(_is_int(v) for v in value):
            return max(value)
        return value if _is_int(value) else None

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get("general.architecture")
        return value if isinstance(value, str) else None

    @property
    def name(self) -> str | None:
        value = self.metadata.get("general.name")
        return value if isinstance(value, str) else None

    @property
    def context_length(self) -> int | None:
        return self._arch_int("context_length")

    @property
    def embedding_length(self) -> int | None:
        return self._arch_int("embedding_length")

    @property
    def block_count(self) -> int | None:
        return self._arch_int("block_count")

    @property
    def head_count(self) -> int | None:
        return self._arch_int("attention.head_count")

    @property
    def head_count_kv(self) -> int | None:
        return self._arch_int("attention.head_count_kv")

    @property
    def vocab_size(self) -> int | None:
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if isinstance(tokens, (list, ArrayRef)):
            return len(tokens)
        return self._arch_int("vocab_size")

    @property
    def chat_template(self) -> str | None:
        value = self.metadata.get("tokenizer.chat_template")
        return value if isinstance(value, str) and value else None

    @property
    def bos_token_id(self) -> int | None:
        value = self.metadata.get("tokenizer.ggml.bos_token_id")
        return value if _is_int(value) else None

    @property
    def eos_token_id(self) -> int | None:
        value = self.metadata.get("tokenizer.ggml.eos_token_id")
        return value if _is_int(value) else None

    @property
    def parameter_count(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def quantization(self) -> str | None:
        """ "Q4_1", "F16", "Q4_K_M", ... from general.file_type, else the dominant tensor type."""
        file_type = self.metadata.get("general.file_type")
        if _is_int(file_type):
            name = _file_type_name(file_type)
            if name:
                return name
        by_type: dict[str, int] = {}
        for t in self.tensors:
            by_type[t.type_name] = by_type.get(t.type_name, 0) + t.nbytes
        return max(by_type, key=by_type.__getitem__) if by_type else None

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)


def is_gguf(path: str | os.PathLike[str]) -> bool:
    """Cheap check: does the file start with the GGUF magic? (No validation.)"""
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):  # never open a FIFO or device: open() could block
            return False
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_gguf(path: str | os.PathLike[str], *, load_arrays: bool = False, max_array: int = 64) -> GGUFInfo:
    """Validate the GGUF file at `path` and return its header.

    Arrays with more than `max_array` items are validated but kept as ``ArrayRef``
    unless `load_arrays` is true (up to MAX_LOADED_ITEMS items). Raises
    ``InvalidModelFile`` with a one-line message for anything wrong with the file.
    """
    label = _label(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise InvalidModelFile(f"cannot read model file {label}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidModelFile(f"cannot read model file {label}: not a regular file")
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            return _parse(f, str(path), label, file_size, load_arrays, max_array)
    except OSError as e:
        raise InvalidModelFile(f"cannot read model file {label}: {e.strerror or e}") from None


# --------------------------------------------------------------------------- parsing


def _parse(f, path: str, label: str, file_size: int, load_arrays: bool, max_array: int) -> GGUFInfo:
    head = f.read(_HEADER.size)
    if len(head) < 4:
        raise InvalidModelFile(f"not a GGUF file: only {file_size} bytes ({label})")
    if head[:4] != GGUF_MAGIC:
        raise InvalidModelFile(f"not a GGUF file: bad magic {head[:4]!r} ({label})")
    if len(head) < _HEADER.size:
        raise InvalidModelFile(f"corrupt GGUF file {label}: truncated header ({file_size} bytes)")
    _, version, n_tensors, n_kv = _HEADER.unpack(head)
    _check_version(version, label)

    cur = _Cursor(f, file_size, label, pos=_HEADER.size)
    room = file_size - _HEADER.size
    if n_kv > MAX_KV_COUNT or n_kv * _MIN_KV_BYTES > room:
        cur.fail(f"header claims {n_kv} key-values, more than a {file_size}-byte file can hold")
    if n_tensors > MAX_TENSOR_COUNT or n_tensors * _MIN_TENSOR_BYTES + n_kv * _MIN_KV_BYTES > room:
        cur.fail(f"header claims {n_tensors} tensors, more than a {file_size}-byte file can hold")

    limit = max(0, max_array)
    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        cur.where = f"key-value #{i}"
        key = cur.string()
        cur.where = f"key-value {_show(key)}"
        if key in metadata:
            cur.fail("duplicate key")
        vtype = cur.u32()
        cur.types[key] = vtype
        metadata[key] = _read_value(cur, vtype, load_arrays, limit)

    alignment = _alignment(cur, metadata)

    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        cur.where = f"tensor #{i}"
        name = cur.string()
        cur.where = f"tensor {_show(name)}"
        if name in seen:
            cur.fail("duplicate tensor name")
        seen.add(name)
        if len(name.encode()) >= GGML_MAX_NAME:
            cur.fail(f"name is longer than {GGML_MAX_NAME - 1} bytes")
        n_dims = cur.u32()
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            cur.fail(f"has {n_dims} dimensions (GGML allows 1 to {GGML_MAX_DIMS})")
        shape = tuple(cur.u64() for _ in range(n_dims))
        ggml_type = cur.u32()
        rel_offset = cur.u64()
        tensors.append(_tensor_info(cur, name, shape, ggml_type, rel_offset))
    cur.where = ""

    data_offset = _align(cur.pos, alignment)
    if tensors and data_offset > file_size:
        cur.fail(f"data section at offset {data_offset} starts past the end of the file ({file_size} bytes)")
    for t in tensors:
        _place_tensor(cur, t, data_offset, alignment)
    _check_overlaps(cur, tensors)
    return GGUFInfo(path, version, file_size, alignment, data_offset, metadata, tensors)


def _check_version(version: int, label: str) -> None:
    if version in SUPPORTED_VERSIONS:
        return
    # A big-endian file stores the version byte-swapped: 3 reads as 0x03000000 here.
    if version & 0xFFFF == 0 and _bswap32(version) in SUPPORTED_VERSIONS:
        raise InvalidModelFile(
            f"unsupported GGUF file {label}: big-endian GGUF is not supported; convert it to little-endian"
        )
    if version == 1:
        raise InvalidModelFile(
            f"unsupported GGUF file {label}: version 1 is obsolete; re-convert it with a current llama.cpp"
        )
    raise InvalidModelFile(
        f"unsupported GGUF file {label}: version {version} (openherd reads versions 2 and 3)"
    )


def _read_value(cur: _Cursor, vtype: int, load_arrays: bool, max_array: int, depth: int = 0) -> Any:
    if vtype == _STRING:
        return cur.string()
    if vtype == _ARRAY:
        return _read_array(cur, load_arrays, max_array, depth)
    scalar = _SCALARS.get(vtype)
    if scalar is None:
        cur.fail(f"unknown value type {vtype}")
    _, code, size = scalar
    (value,) = struct.unpack_from("<" + code, cur.take(size))
    return bool(value) if vtype == _BOOL else value


def _read_array(cur: _Cursor, load_arrays: bool, max_array: int, depth: int) -> list[Any] | ArrayRef:
    item_type = cur.u32()
    count = cur.u64()
    if item_type not in _TYPE_NAMES:
        cur.fail(f"unknown array item type {item_type}")
    if item_type == _ARRAY and depth + 1 >= MAX_ARRAY_DEPTH:
        cur.fail(f"arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
    min_item = _SCALARS[item_type][2] if item_type in _SCALARS else (8 if item_type == _STRING else 12)
    if count * min_item > cur.remaining():
        cur.fail(
            f"array of {count} {_TYPE_NAMES[item_type]} items at offset {cur.pos} "
            f"runs past the end of the file ({cur.size} bytes)"
        )
    load = count <= max_array or (load_arrays and count <= MAX_LOADED_ITEMS)
    if item_type in _SCALARS:
        _, code, size = _SCALARS[item_type]
        if not load:
            cur.skip(count * size)
            return ArrayRef(item_type, count)
        values = list(struct.unpack_from(f"<{count}{code}", cur.take(count * size)))
        return [bool(v) for v in values] if item_type == _BOOL else values
    cur.spend_items(count)
    if item_type == _STRING:
        out: list[str] | None = [] if load else None
        cur.walk_strings(count, out)
        return out if out is not None else ArrayRef(item_type, count)
    # Arrays of arrays: each item is a bare (item_type, count, values) array. Rare, and the
    # item budget above bounds the walk, so plain recursion is fine.
    items = [_read_array(cur, load_arrays, max_array, depth + 1) for _ in range(count)]
    return items if load else ArrayRef(item_type, count)


def _alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    cur.where = "key-value 'general.alignment'"
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    # llama.cpp reads this key with gguf_get_val_u32, which aborts the process on any other type.
    if cur.types.get("general.alignment") != _UINT32:
        cur.fail("must be a uint32")
    if value == 0 or value & (value - 1):
        cur.fail(f"{value} is not a power of two")
    return value


def _tensor_info(
    cur: _Cursor, name: str, shape: tuple[int, ...], ggml_type: int, rel_offset: int
) -> TensorInfo:
    if any(d < 1 or d > INT64_MAX for d in shape):
        cur.fail(f"has a zero or out-of-range dimension (shape {list(shape)})")
    n_elements = _product(shape)
    if n_elements > INT64_MAX:
        cur.fail(f"has {n_elements} elements, more than int64 can count (shape {list(shape)})")
    sizes, names = _ggml_types()
    if ggml_type not in sizes:
        cur.fail(f"has unknown ggml type {ggml_type}")
    block, type_size = sizes[ggml_type]
    if shape[0] % block:
        cur.fail(f"first dimension {shape[0]} is not a multiple of the {names[ggml_type]} block size {block}")
    nbytes = n_elements // block * type_size
    # The offset is stored relative to the data section until _place_tensor fixes it up.
    return TensorInfo(name, shape, ggml_type, names[ggml_type], rel_offset, nbytes)


def _place_tensor(cur: _Cursor, t: TensorInfo, data_offset: int, alignment: int) -> None:
    rel = t.offset
    cur.where = f"tensor {_show(t.name)}"
    if rel % alignment:
        cur.fail(f"data offset {rel} is not a multiple of the alignment {alignment}")
    start = data_offset + rel
    if start + t.nbytes > cur.size:
        cur.fail(f"data at offset {start}+{t.nbytes} runs past the end of the file ({cur.size} bytes)")
    t.offset = start


def _check_overlaps(cur: _Cursor, tensors: list[TensorInfo]) -> None:
    cur.where = ""
    ordered = sorted(tensors, key=lambda t: t.offset)
    for prev, nxt in itertools.pairwise(ordered):
        if prev.offset + prev.nbytes > nxt.offset:
            cur.fail(f"tensors {_show(prev.name)} and {_show(nxt.name)} overlap in the data section")


# --------------------------------------------------------------------------- the cursor


class _Cursor:
    """Bounded, buffered reads over the header region of one open file.

    Every read checks the bytes it needs against the file size first, so a length
    field can never make us read or allocate past the end of the file. The header is
    read in 1 MiB chunks and walked with ``unpack_from``: a 49k-token vocabulary is
    ~100k strings, far too many for one ``read()`` call each.
    """

    def __init__(self, f, size: int, label: str, pos: int):
        self.f = f
        self.size = size
        self.label = label
        self.pos = pos  # absolute offset of the next byte to parse
        self.buf = b""
        self.base = pos  # absolute offset of buf[0]
        self.where = ""  # what is being parsed, for error messages
        self.items_left = MAX_WALKED_ITEMS
        self.types: dict[str, int] = {}  # value type of each top-level key (see _alignment)

    def fail(self, message: str) -> NoReturn:
        where = f"{self.where}: " if self.where else ""
        raise InvalidModelFile(f"corrupt GGUF file {self.label}: {where}{message}")

    def remaining(self) -> int:
        return self.size - self.pos

    def _need(self, n: int) -> int:
        """Make buf hold bytes [pos, pos+n); return the index of pos in buf."""
        off = self.pos - self.base
        if off + n <= len(self.buf):
            return off
        if n > self.size - self.pos:
            self.fail(f"file ends at byte {self.size} while reading {n} bytes at offset {self.pos}")
        self.f.seek(self.pos)
        data = self.f.read(min(max(n, _CHUNK), self.size - self.pos))
        if len(data) < n:  # the file shrank under us
            self.fail(
                f"file ends at byte {self.pos + len(data)} while reading {n} bytes at offset {self.pos}"
            )
        self.buf, self.base = data, self.pos
        return 0

    def take(self, n: int) -> bytes:
        off = self._need(n)
        self.pos += n
        return self.buf[off : off + n]

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            self.fail(f"{n} bytes at offset {self.pos} run past the end of the file ({self.size} bytes)")
        self.pos += n

    def u32(self) -> int:
        off = self._need(4)
        self.pos += 4
        return _U32.unpack_from(self.buf, off)[0]

    def u64(self) -> int:
        off = self._need(8)
        self.pos += 8
        return _U64.unpack_from(self.buf, off)[0]

    def _string_len(self) -> int:
        at = self.pos
        n = self.u64()
        if n > self.size - self.pos:
            self.fail(f"string length {n} at offset {at} runs past the end of the file ({self.size} bytes)")
        if n > MAX_STRING_BYTES:
            self.fail(f"string of {n} bytes at offset {at} exceeds the {MAX_STRING_BYTES >> 20} MiB limit")
        return n

    def string(self) -> str:
        n = self._string_len()
        # Invalid UTF-8 is replaced, not fatal: llama.cpp stores token text as raw bytes too.
        return self.take(n).decode("utf-8", "replace")

    def spend_items(self, count: int) -> None:
        if count > self.items_left:
            self.fail(f"metadata arrays hold more than {MAX_WALKED_ITEMS} items in total")
        self.items_left -= count

    def walk_strings(self, count: int, out: list[str] | None) -> None:
        """Step over `count` strings, appending them to `out` when given.

        The inner loop handles every string wholly inside the buffer; a string that
        straddles the buffer edge (or claims a bogus length) goes through string(),
        which validates it and refills.
        """
        unpack = _U64.unpack_from
        while count:
            buf, off = self.buf, self.pos - self.base
            end = len(buf)
            while count and off + 8 <= end:
                n = unpack(buf, off)[0]
                stop = off + 8 + n
                if stop > end:
                    break
                if out is not None:
                    out.append(buf[off + 8 : stop].decode("utf-8", "replace"))
                off = stop
                count -= 1
            self.pos = self.base + off
            if count:
                s = self.string()
                if out is not None:
                    out.append(s)
                count -= 1


# --------------------------------------------------------------------------- helpers


@functools.cache
def _ggml_types() -> tuple[dict[int, tuple[int, int]], dict[int, str]]:
    """ggml type id -> (block size, bytes per block), and id -> name, from gguf-py.

    Imported lazily: gguf-py pulls in numpy (~0.1 s), which `herd --help` must not pay.
    """
    from gguf.constants import GGML_QUANT_SIZES

    sizes = {int(t): (int(b), int(s)) for t, (b, s) in GGML_QUANT_SIZES.items()}
    names = {int(t): t.name for t in GGML_QUANT_SIZES}
    return sizes, names


def _file_type_name(file_type: int) -> str | None:
    from gguf.constants import LlamaFileType

    try:
        name = LlamaFileType(file_type & ~LlamaFileType.GUESSED).name
    except ValueError:
        return None
    for prefix in ("MOSTLY_", "ALL_"):
        if name.startswith(prefix):
            return name[len(prefix) :]
    return None  # GUESSED alone carries no type


def _align(offset: int, alignment: int) -> int:
    return (offset + alignment - 1) // alignment * alignment


def _product(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _bswap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "little"), "big")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _show(name: str, limit: int = 80) -> str:
    """A key or tensor name quoted for a one-line message (newlines escaped, long names cut)."""
    return repr(name[:limit] + ("..." if len(name) > limit else ""))


def _label(path: str | os.PathLike[str]) -> str:
    """The file's base name, printable on one line (never the full path: it may go over HTTP)."""
    name = Path(os.fspath(path)).name or os.fspath(path)
    return name if name.isprintable() else repr(name)[1:-1]
