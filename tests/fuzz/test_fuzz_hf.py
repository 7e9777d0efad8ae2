"""Fuzz: >= 300 deterministic mutations of a tiny-qwen3-moe HF safetensors directory (float32, sharded with
an index), each loaded in a worker process (tests/fuzz/worker.py). Classes: config-type / config-range
(config.json values of the wrong type or out of range, JSON nesting), json-bytes (config.json, the index,
generation_config.json, tokenizer_config.json cut or garbled), index (paths outside the directory,
missing or wrong shards), st-header (a shard's safetensors header: dtypes, shapes, offsets, lengths).
Pass as in the GGUF fuzz: a clean error naming the directory, or the original's logits bit for bit."""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from worker import FAILURES, Loader, check_suite, classify, main  # noqa: E402

BAD_VALUES = ["abc", -1, 0, 1e12, 10**12, True, [], {}, "false", 1.5, 2**31 + 1]
KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "max_position_embeddings",
        "rms_norm_eps", "rope_theta", "tie_word_embeddings", "norm_topk_prob", "rope_scaling", "model_type",
        "hidden_act", "bos_token_id", "eos_token_id", "mlp_only_layers", "decoder_sparse_step",
        "use_sliding_window", "attention_bias"]
SPECIAL = [("num_experts_per_tok", 17), ("head_dim", 33), ("num_attention_heads", 3),
           ("rope_scaling", "linear"), ("rope_scaling", {"rope_type": "yarn"}),
           ("tie_word_embeddings", "true"), ("rms_norm_eps", 0), ("rope_theta", -5),
           ("eos_token_id", 10**6), ("bos_token_id", -1),
           ("vocab_size", 10**9)]


def make_original(out: Path) -> Path:
    from hotexperts.engine.presets import write_hf_dir

    return write_hf_dir("tiny-qwen3-moe", out, dtype="float32", device="cpu", shard_bytes=1 << 20)


def _mutant(src: Path, dst: Path, changes: dict[str, bytes | None]) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in changes:
            os.link(f, dst / f.name)
    for name, data in changes.items():
        if data is not None:
            (dst / name).write_bytes(data)


def _config(src: Path):
    cfg = json.loads((src / "config.json").read_text())
    for key in KEYS:
        for v in BAD_VALUES:
            legal = key == "rope_theta" and type(v) in (int, float) and v > 0     # another valid model
            same_kind = isinstance(v, bool) and isinstance(cfg.get(key), bool)
            if v != cfg.get(key) and not legal and not same_kind:
                yield "config-type", f"{key}={v!r}", {"config.json": json.dumps({**cfg, key: v}).encode()}
    for key, v in SPECIAL:
        yield "config-range", f"{key}={v!r}", {"config.json": json.dumps({**cfg, key: v}).encode()}
    deep = '{"model_type": "qwen3_moe", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    yield "config-range", "100,000-deep JSON", {"config.json": deep.encode()}


def _json_bytes(src: Path, rng):
    for name in ("config.json", "model.safetensors.index.json", "generation_config.json",
                 "tokenizer_config.json"):
        raw = (src / name).read_bytes()
        for cut in sorted(rng.sample(range(1, len(raw)), 5)):
            yield "json-bytes", f"{name} cut at {cut}", {name: raw[:cut]}
        for bad in (b"\xff\xfe", b"[]", b"null", b"[" * 5000, b'"x"'):
            yield "json-bytes", f"{name} = {bad[:8]!r}", {name: bad}


def _index(src: Path):
    index = json.loads((src / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    shards = sorted(set(wm.values()))
    name = sorted(wm)[0]
    for target in ("../outside.safetensors", "/etc/passwd", "", 5, None, "sub/../../x.safetensors",
                   "missing.safetensors", shards[-1] if wm[name] != shards[-1] else shards[0]):
        new = {**index, "weight_map": {**wm, name: target}}
        yield "index", f"{name} -> {target!r}", {"model.safetensors.index.json": json.dumps(new).encode()}
    yield "index", "weight_map a list", {"model.safetensors.index.json": b'{"weight_map": []}'}
    yield "index", "a shard removed", {shards[0]: None}
    yield "index", "index removed", {"model.safetensors.index.json": None}


def _st_header(src: Path, rng, n: int = 120):
    shard = sorted(p.name for p in src.glob("*.safetensors"))[0]
    raw = (src / shard).read_bytes()
    hlen = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + hlen])
    names = [k for k in header if k != "__metadata__"]
    data = raw[8 + hlen:]

    def build(h: dict) -> bytes:
        blob = json.dumps(h).encode()
        blob += b" " * (-len(blob) % 8)
        return struct.pack("<Q", len(blob)) + blob + data

    for _ in range(n):
        name = rng.choice(names)
        info = dict(header[name])
        kind = rng.randrange(5)
        if kind == 0:
            info["dtype"] = rng.choice(["I32", "F16", "BF16", "U8", "F64", "I64", "BOOL", "F8_E4M3", "X"])
        elif kind == 1:
            info["shape"] = [rng.choice([0, 1, 3, 2**40, -1]), *info["shape"][1:]]
        elif kind == 2:
            a, b = info["data_offsets"]
            info["data_offsets"] = rng.choice([[a + 4, b + 4], [b, a], [0, b - a], [a, b + 2**40],
                                               [a, len(data) + 4]])
        elif kind == 3:
            info["shape"] = list(reversed(info["shape"]))
        else:
            info = {"dtype": info["dtype"]}
        yield "st-header", f"{name} {kind}", {shard: build({**header, name: info})}
    for hl in (0, 7, 2**63, len(raw)):
        yield "st-header", f"header length {hl}", {shard: struct.pack("<Q", hl) + raw[8:]}


def run(tmp: Path, seed: int = 18):
    src = make_original(tmp / "original")
    assert (src / "model.safetensors.index.json").is_file()
    rng = random.Random(seed)
    table, findings = collections.defaultdict(collections.Counter), []
    dst = tmp / "mutant"
    with Loader() as load:
        outcome, reference = load("hf", src)
        assert outcome == "loaded", reference
        for gen in (_config(src), _json_bytes(src, rng), _index(src), _st_header(src, rng)):
            for cls, label, changes in gen:
                _mutant(src, dst, changes)
                result = classify(*load("hf", dst), reference, (dst.name,))
                table[cls][result] += 1
                if result in FAILURES:
                    findings.append((cls, label, result))
    return table, findings


def test_fuzz_hf(tmp_path):
    check_suite(*run(tmp_path), at_least=300)


if __name__ == "__main__":
    main(run)
