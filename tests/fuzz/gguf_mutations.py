"""Deterministic mutations of a GGUF file, by class, for the fuzz suite (tests/fuzz/test_fuzz_gguf.py).

    g = GGUFParts.read(path)                  header, raw KV records, tensor infos, data section
    g.to_bytes() == path.read_bytes()         (checked by the test)
    for cls, label, data in mutations(g, random.Random(seed)): ...

Classes (the file's own values are never replaced by other *legal* values, which no reader can tell from
the original: a float payload, an in-range integer, a token's text are left alone by the byte classes):
    truncate        the file cut at a random offset
    struct-bytes    one byte of the structure (header, key names and lengths, value types, string/array
                    lengths, tensor infos) set to a random value or one bit flipped
    meta-type       a key's value replaced by a value of another type
    meta-range      a key's value replaced by an out-of-range value of its own type (0, 2^31-1, 2^63, NaN...)
    tensor-info     a tensor's type, dims, n_dims, offset or name changed
    layout          counts, version, magic, alignment, duplicate/dropped/reordered records, huge arrays
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from gguf import GGMLQuantizationType, GGUFReader
from gguf import GGUFValueType as V

FMT = {V.UINT8: "<B", V.INT8: "<b", V.UINT16: "<H", V.INT16: "<h", V.UINT32: "<I", V.INT32: "<i",
       V.FLOAT32: "<f", V.BOOL: "<?", V.UINT64: "<Q", V.INT64: "<q", V.FLOAT64: "<d"}


def s(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def value(vt: V, v, et: V | None = None) -> bytes:
    if vt == V.STRING:
        return s(v if isinstance(v, bytes) else v.encode())
    if vt == V.ARRAY:
        return struct.pack("<IQ", et, len(v)) + b"".join(value(et, x) for x in v)
    return struct.pack(FMT[vt], v)


def kv(key: str, vt: V, v, et: V | None = None) -> bytes:
    return s(key.encode()) + struct.pack("<I", vt) + value(vt, v, et)


@dataclass(frozen=True)
class Info:
    name: bytes
    dims: tuple[int, ...]
    qtype: int
    offset: int
    nd: int | None = None

    def to_bytes(self) -> bytes:
        nd = len(self.dims) if self.nd is None else self.nd
        return s(self.name) + struct.pack("<I", nd) + b"".join(struct.pack("<Q", d & (2**64 - 1))
                                                                for d in self.dims) \
            + struct.pack("<IQ", self.qtype, self.offset)


@dataclass(frozen=True)
class GGUFParts:
    kvs: tuple[tuple[str, bytes], ...]           # (key, the record's bytes)
    infos: tuple[Info, ...]
    data: bytes
    align: int = 32
    version: int = 3
    magic: bytes = b"GGUF"
    counts: tuple[int | None, int | None] = (None, None)     # (n_tensors, n_kv) override
    structure: tuple[tuple[int, int], ...] = field(default=(), compare=False)   # structural byte ranges

    @classmethod
    def read(cls, path: Path) -> GGUFParts:
        r = GGUFReader(path)
        raw = Path(path).read_bytes()
        kvs, ranges = [], [(0, 24)]
        for f in r.fields.values():
            if f.name.startswith("GGUF."):
                continue
            pos, start = f.offset, f.offset
            for i, part in enumerate(f.parts):
                if i not in f.data:
                    ranges.append((pos, pos + part.nbytes))
                pos += part.nbytes
            kvs.append((f.name, raw[start:pos]))
        info_start = r.tensors[0].field.offset
        infos = tuple(Info(t.name.encode(), tuple(int(d) for d in t.shape), int(t.tensor_type),
                           t.data_offset - r.data_offset) for t in r.tensors)
        end = info_start + sum(len(i.to_bytes()) for i in infos)
        ranges.append((info_start, end))
        return cls(tuple(kvs), infos, raw[r.data_offset:], r.alignment, structure=tuple(ranges))

    def to_bytes(self) -> bytes:
        n_t, n_kv = self.counts
        head = self.magic + struct.pack("<IQQ", self.version, len(self.infos) if n_t is None else n_t,
                                        len(self.kvs) if n_kv is None else n_kv)
        body = head + b"".join(b for _, b in self.kvs) + b"".join(i.to_bytes() for i in self.infos)
        pad = -len(body) % self.align if self.align > 0 else 0
        return body + b"\0" * pad + self.data

    def with_kv(self, key: str, record: bytes | None) -> GGUFParts:
        """The record of `key` replaced (None: dropped); appended when the file has no such key."""
        kvs = [(k, record if k == key else b) for k, b in self.kvs if k != key or record is not None]
        if key not in dict(self.kvs) and record is not None:
            kvs.append((key, record))
        return replace(self, kvs=tuple(kvs))

    def with_info(self, i: int, **kw) -> GGUFParts:
        infos = list(self.infos)
        infos[i] = replace(infos[i], **kw)
        return replace(self, infos=tuple(infos))

    def relayout(self, align: int) -> GGUFParts:
        """The same tensors packed at another alignment (a legal file when align is a power of two)."""
        chunks, infos, off = [], [], 0
        ends = [i.offset for i in self.infos[1:]] + [len(self.data)]
        for info, end in zip(self.infos, ends, strict=True):
            blob = self.data[info.offset:end]
            size = _nbytes(info)
            chunks.append(blob[:size] + b"\0" * (-size % align))
            infos.append(replace(info, offset=off))
            off += size + (-size % align)
        return replace(self, infos=tuple(infos), data=b"".join(chunks), align=align)


def _nbytes(info: Info) -> int:
    from gguf import GGML_QUANT_SIZES

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(info.qtype)]
    n = 1
    for d in info.dims:
        n *= d
    return n // block * size


def key_types(path: Path) -> dict[str, tuple[V, V | None]]:
    """{key: (value type, element type of an array or None)} of a file's metadata."""
    return {f.name: (f.types[0], f.types[1] if len(f.types) > 1 else None)
            for f in GGUFReader(path).fields.values() if not f.name.startswith("GGUF.")}


INTS = (V.UINT8, V.INT8, V.UINT16, V.INT16, V.UINT32, V.INT32, V.UINT64, V.INT64)
BAD_INTS = {V.UINT32: (0, 2**31 - 1, 2**32 - 1), V.INT32: (0, -1, -2**31, 2**31 - 1),
            V.UINT64: (0, 2**63, 2**64 - 1), V.INT64: (0, -1, 2**63 - 1), V.UINT8: (0, 255), V.INT8: (0, -1),
            V.UINT16: (0, 65535), V.INT16: (0, -1)}
BAD_FLOATS = (float("nan"), float("inf"), float("-inf"), 0.0, -1.0, -1e-6)
QTYPES = [int(t) for t in GGMLQuantizationType] + [4, 5, 40, 99, 2**31, 2**32 - 1]


def _other_types(key: str, vt: V, et: V | None):
    """Records of `key` with a value of another type than (vt, et)."""
    yield kv(key, V.STRING, "abc") if vt != V.STRING else kv(key, V.UINT32, 7)
    yield kv(key, V.ARRAY, [1, 2], V.INT32) if vt != V.ARRAY else kv(key, V.ARRAY, [1.5, 2.5], V.FLOAT32)
    yield kv(key, V.FLOAT32, 4.0) if vt not in (V.FLOAT32, V.FLOAT64) else kv(key, V.UINT32, 4)
    yield kv(key, V.BOOL, True) if vt != V.BOOL else kv(key, V.INT8, 1)
    yield kv(key, V.ARRAY, [b"a", b"b"], V.STRING) if et != V.STRING else kv(key, V.ARRAY, [1, 2], V.UINT8)
    yield kv(key, V.ARRAY, [], V.ARRAY)


def _out_of_range(key: str, vt: V, et: V | None, n_tokens: int):
    if vt in BAD_INTS:
        for v in BAD_INTS[vt]:
            yield kv(key, vt, v)
        yield kv(key, V.UINT64, 2**63 + 5)
    elif vt in (V.FLOAT32, V.FLOAT64):
        for v in BAD_FLOATS:
            yield kv(key, vt, v)
    elif vt == V.STRING:
        for v in (b"", b"\xff\xfe", b"x" * 300, b"qwen3moe\0", b"../../x"):
            yield kv(key, vt, v)
    elif vt == V.ARRAY and et in INTS:
        yield kv(key, vt, [99] * n_tokens, et)
        yield kv(key, vt, [1] * (n_tokens - 1), et)
        yield kv(key, vt, [], et)
    elif vt == V.ARRAY and et == V.FLOAT32:
        yield kv(key, vt, [float("nan")] * n_tokens, et)
        yield kv(key, vt, [0.0] * (n_tokens + 3), et)
    elif vt == V.ARRAY and et == V.STRING:
        yield kv(key, vt, [b"a b"] * 3, et)
        yield kv(key, vt, [b"nospace", b"\xff \xfe"] * (n_tokens // 2), et)
        yield kv(key, vt, [b""] * n_tokens, et)


def _truncations(g: GGUFParts, raw: bytes, rng):
    head = max(e for _, e in g.structure)
    for _ in range(60):
        cut = rng.randrange(head) if rng.random() < 0.7 else rng.randrange(head, len(raw))
        yield "truncate", f"cut at {cut}", raw[:cut]


def _struct_bytes(g: GGUFParts, raw: bytes, rng, n: int = 320):
    spots = [(a, b) for a, b in g.structure if b > a]
    weights = [b - a for a, b in spots]
    for _ in range(n):
        a, b = rng.choices(spots, weights)[0]
        pos = rng.randrange(a, b)
        new = rng.randrange(256) if rng.random() < 0.5 else raw[pos] ^ (1 << rng.randrange(8))
        if new != raw[pos]:
            yield "struct-bytes", f"byte {pos}: {raw[pos]} -> {new}", raw[:pos] + bytes([new]) + raw[pos + 1:]


def _meta(g: GGUFParts, types: dict, n_tokens: int):
    for key, (vt, et) in types.items():
        for rec in _other_types(key, vt, et):
            yield "meta-type", f"{key} as another type", g.with_kv(key, rec).to_bytes()
        for rec in _out_of_range(key, vt, et, n_tokens):
            yield "meta-range", f"{key} out of range", g.with_kv(key, rec).to_bytes()
    arch = "qwen3moe"
    for key, rec in ((f"{arch}.expert_used_count", kv(f"{arch}.expert_used_count", V.UINT32, 17)),
                     (f"{arch}.block_count", kv(f"{arch}.block_count", V.UINT32, 1)),
                     (f"{arch}.block_count", kv(f"{arch}.block_count", V.UINT32, 2**24)),
                     (f"{arch}.attention.head_count_kv", kv(f"{arch}.attention.head_count_kv", V.UINT32, 3)),
                     (f"{arch}.attention.head_count", kv(f"{arch}.attention.head_count", V.UINT32, 3)),
                     (f"{arch}.embedding_length", kv(f"{arch}.embedding_length", V.UINT32, 2**20)),
                     (f"{arch}.rope.freq_basf", kv(f"{arch}.rope.freq_basf", V.FLOAT32, 1.0)),
                     ("tokenizer.ggml.bos_token_id", kv("tokenizer.ggml.bos_token_id", V.UINT32, n_tokens)),
                     ("tokenizer.ggml.unknown_token_id", kv("tokenizer.ggml.unknown_token_id", V.INT32, -1)),
                     ("general.alignment", kv("general.alignment", V.UINT32, 0)),
                     ("general.alignment", kv("general.alignment", V.UINT32, 3)),
                     ("general.alignment", kv("general.alignment", V.UINT32, 48)),
                     ("general.alignment", kv("general.alignment", V.UINT32, 64)),
                     ("general.alignment", kv("general.alignment", V.STRING, "32"))):
        yield "meta-range", f"{key} = hostile", g.with_kv(key, rec).to_bytes()


def _tensor_infos(g: GGUFParts, rng, count: int = 20):
    n = len(g.infos)
    for i in sorted(rng.sample(range(n), min(count, n))):
        info = g.infos[i]
        picks = rng.sample(QTYPES, 3)
        for t in picks:
            if t != info.qtype:
                yield "tensor-info", f"{info.name!r} type {t}", g.with_info(i, qtype=t).to_bytes()
        d = list(info.dims)
        for dims in ([0, *d[1:]], [d[0] + 32, *d[1:]], [*d[:-1], d[-1] + 1], [2**63, *d[1:]],
                     [2**32, 2**32, *d[2:]][:max(2, len(d))], [2**64 - 1, *d[1:]], [*d, 1, 1, 1, 1]):
            yield "tensor-info", f"{info.name!r} dims {dims}", g.with_info(i, dims=tuple(dims)).to_bytes()
        for nd in (0, 5, 2**31):
            yield "tensor-info", f"{info.name!r} n_dims {nd}", g.with_info(i, nd=nd).to_bytes()
        other = g.infos[rng.randrange(n)]
        for off in (info.offset + g.align, max(0, info.offset - g.align), info.offset + 1, other.offset,
                    2**63, len(g.data)):
            if off != info.offset:
                yield "tensor-info", f"{info.name!r} offset {off}", g.with_info(i, offset=off).to_bytes()
        bad = info.name.replace(b"weight", b"wei\xff")
        for name in (other.name, b"x" * 80, b"blk.99.attn_q.weight", bad):
            if name != info.name:
                label = f"{info.name!r} renamed {name[:20]!r}"
                yield "tensor-info", label, g.with_info(i, name=name).to_bytes()


def _layout(g: GGUFParts, types: dict, rng):
    n_t, n_kv = len(g.infos), len(g.kvs)
    for counts in ((n_t + 1, None), (n_t - 1, None), (2**63, None), (None, n_kv + 1), (None, n_kv - 1),
                   (None, 2**64 - 1), (2**40, 2**40)):
        yield "layout", f"counts {counts}", replace(g, counts=counts).to_bytes()
    for version in (0, 1, 4, 2**31):
        yield "layout", f"version {version}", replace(g, version=version).to_bytes()
    yield "layout", "magic", replace(g, magic=b"GGUG").to_bytes()
    for align in (1, 16, 64, 256):                          # legal re-layouts: must load the same model
        yield "layout", f"relayout {align}", g.relayout(align).with_kv(
            "general.alignment", kv("general.alignment", V.UINT32, align)).to_bytes()
    yield "layout", "relayout 64 without the key", replace(g.relayout(64), align=64).to_bytes()
    kvs = list(g.kvs)
    for _ in range(6):
        rng.shuffle(kvs)
        yield "layout", "kv records reordered", replace(g, kvs=tuple(kvs)).to_bytes()
    for key, rec in rng.sample(list(g.kvs), 8):
        yield "layout", f"duplicate {key}", replace(g, kvs=g.kvs + ((key, rec),)).to_bytes()
        yield "layout", f"drop {key}", g.with_kv(key, None).to_bytes()
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"):
        yield "layout", f"{key} count 2^62", g.with_kv(key, kv(key, V.ARRAY, [], V.STRING)[:-8]
                                                       + struct.pack("<Q", 2**62)).to_bytes()
    nested = struct.pack("<I", V.ARRAY) + b"".join(struct.pack("<IQ", V.ARRAY, 1) for _ in range(10_000))
    yield "layout", "arrays nested 10000 deep", g.with_kv("x.deep", s(b"x.deep") + nested).to_bytes()
    yield "layout", "string length 2^63", g.with_kv("general.name", s(b"general.name") + struct.pack(
        "<IQ", V.STRING, 2**63)).to_bytes()
    drop = [i for i, t in enumerate(g.infos) if t.name.startswith(b"blk.3.")]
    kept = replace(g, infos=tuple(t for i, t in enumerate(g.infos) if i not in drop))
    yield "layout", "block 3's tensor infos dropped", kept.relayout(g.align).to_bytes()
    yield "layout", "trailing garbage", g.to_bytes() + b"\x01" * 4096
    swapped = (g.infos[1], g.infos[0], *g.infos[2:])
    yield "layout", "tensor infos swapped", replace(g, infos=swapped).to_bytes()


def mutations(g: GGUFParts, path: Path, rng):
    """(class, label, file bytes) for every mutation, in a fixed order for a given rng seed."""
    raw = g.to_bytes()
    types = key_types(path)
    n_tokens = sum(1 for _ in GGUFReader(path).fields["tokenizer.ggml.tokens"].data)
    yield from _truncations(g, raw, rng)
    yield from _struct_bytes(g, raw, rng)
    yield from _meta(g, types, n_tokens)
    yield from _tensor_infos(g, rng)
    yield from _layout(g, types, rng)
