"""GGUFFile: metadata decoding, torch-order shapes, split sets, and one clear error per broken file."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter

from hotexperts.errors import ModelLoadError
from hotexperts.loading.gguf_reader import GGUFFile, shard_paths


def write(path, split_max_tensors=0):
    w = GGUFWriter(path, "qwen3moe", split_max_tensors=split_max_tensors)
    w.add_block_count(2)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_bool("test.flag", True)
    w.add_token_list(["a", "b", "<|x|>"])
    w.add_chat_template("{{ messages }}")
    w.add_array("test.ints", [1, -2, 3])
    w.add_array("test.floats", [0.5, 1e-6])
    w.add_array("test.bools", [True, False])
    w.add_float64("test.f64", 0.1)
    w.add_tensor("i.weight", np.arange(6, dtype=np.int32).reshape(2, 3))
    w.add_tensor("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("b.weight", np.ones((2, 4, 8), dtype=np.float16))
    w.add_tensor("c.weight", np.zeros((4, 34), dtype=np.uint8), raw_dtype=Q.Q8_0)    # 4 rows of 32 weights
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    paths = w.format_shard_names(path)
    w.close()
    return paths


def test_metadata_and_tensors(tmp_path):
    f = GGUFFile(write(tmp_path / "m.gguf")[0])
    assert f.get("general.architecture") == "qwen3moe"
    assert f.get("qwen3moe.block_count") == 2
    assert f.get("qwen3moe.attention.layer_norm_rms_epsilon") == 1e-6        # float32 read back as 1e-06
    assert f.get("test.flag") is True
    assert f.get("tokenizer.ggml.tokens") == ["a", "b", "<|x|>"]
    assert f.get("tokenizer.chat_template") == "{{ messages }}"
    assert f.get("test.ints") == [1, -2, 3] and f.get("test.floats") == [0.5, 1e-6]
    assert f.get("test.bools") == [True, False] and f.get("test.f64") == 0.1
    assert f.names() == ["i.weight", "a.weight", "b.weight", "c.weight"]
    assert f.info("a.weight").shape == (3, 4) and f.info("a.weight").qtype == Q.F32
    assert f.info("b.weight").shape == (2, 4, 8)
    assert f.info("c.weight").shape == (4, 32) and f.info("c.weight").qtype == Q.Q8_0
    assert f.raw("a.weight")[2, 3] == 11
    with pytest.raises(ModelLoadError, match="missing"):
        f.raw("nope.weight")


def test_split_set(tmp_path):
    paths = write(tmp_path / "m.gguf", split_max_tensors=1)
    assert [p.name for p in paths] == [f"m-0000{i}-of-00004.gguf" for i in (1, 2, 3, 4)]
    assert shard_paths(paths[1]) == paths
    for p in (paths[0], paths[2]):                                # any shard opens the whole set
        f = GGUFFile(p)
        assert f.names() == ["i.weight", "a.weight", "b.weight", "c.weight"]
        assert f.get("qwen3moe.block_count") == 2                 # metadata of the first shard
        assert f.raw("c.weight").shape == (4, 34)
    paths[1].unlink()
    with pytest.raises(ModelLoadError, match="shard.*missing.*m-00002-of-00004.gguf"):
        GGUFFile(paths[0])


def test_truncated_file(tmp_path):
    p = write(tmp_path / "m.gguf")[0]
    data = p.read_bytes()
    p.write_bytes(data[:-40])                                      # cut inside the tensor data
    with pytest.raises(ModelLoadError, match="truncated"):
        GGUFFile(p)
    p.write_bytes(data[:200])                                      # cut inside the header
    with pytest.raises(ModelLoadError, match="truncated or not a valid GGUF"):
        GGUFFile(p)


def test_corrupt_and_missing_file(tmp_path):
    p = write(tmp_path / "m.gguf")[0]
    p.write_bytes(b"XXXX" + p.read_bytes()[4:])
    with pytest.raises(ModelLoadError, match="not a valid GGUF.*magic"):
        GGUFFile(p)
    with pytest.raises(ModelLoadError, match="does not exist"):
        GGUFFile(tmp_path / "absent.gguf")


def test_agrees_with_gguf_reader(tmp_path):
    """Our header parser and gguf's GGUFReader read the same fields and tensor bytes."""
    path = write(tmp_path / "m.gguf")[0]
    ours, ref = GGUFFile(path), GGUFReader(path)
    fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for k, field in fields.items():
        want = field.contents()
        if field.types[-1] == GGUFValueType.FLOAT32:
            want = [float(np.float32(x)) for x in want] if isinstance(want, list) else float(np.float32(want))
            got = ours.get(k)
            np.testing.assert_array_equal(np.float32(got), np.float32(want))
        else:
            assert ours.get(k) == want, k
    for t in ref.tensors:
        info = ours.info(t.name)
        assert info.shape == tuple(reversed(t.shape.tolist())) and info.qtype == t.tensor_type
        np.testing.assert_array_equal(ours.raw(t.name), t.data)
        assert ours.raw(t.name).dtype == t.data.dtype
