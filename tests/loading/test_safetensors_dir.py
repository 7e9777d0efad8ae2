"""SafetensorsDir: single file and sharded dirs, lazy reads, one clear ModelLoadError per broken input."""

import json

import pytest
import torch
from safetensors.torch import save_file

from hotexperts.errors import ModelLoadError
from hotexperts.loading.safetensors_dir import INDEX_NAME, SafetensorsDir


def write_dir(path, tensors: dict, shards: int = 1, config: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config or {"model_type": "qwen3_moe"}))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return path
    wm = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(path / fname))
        wm.update(dict.fromkeys(part, fname))
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return path


TENSORS = {f"w{i}": torch.full((4, 3), float(i)) for i in range(6)}


@pytest.mark.parametrize("shards", [1, 3])
def test_reads_config_and_tensors(tmp_path, shards):
    d = SafetensorsDir(write_dir(tmp_path / "m", TENSORS, shards))
    assert d.config["model_type"] == "qwen3_moe"
    assert d.generation_config == {}
    assert sorted(d.names()) == sorted(TENSORS)
    assert d.shape("w2") == (4, 3)
    assert torch.equal(d.get("w5"), TENSORS["w5"])
    assert dict(d.items()).keys() == TENSORS.keys()


def test_generation_config_is_read(tmp_path):
    path = write_dir(tmp_path / "m", TENSORS)
    (path / "generation_config.json").write_text('{"eos_token_id": [1, 2]}')
    assert SafetensorsDir(path).generation_config["eos_token_id"] == [1, 2]


def test_missing_config(tmp_path):
    path = write_dir(tmp_path / "m", TENSORS)
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json not found"):
        SafetensorsDir(path)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        SafetensorsDir(tmp_path / "nope")


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        SafetensorsDir(tmp_path)


def test_missing_shard(tmp_path):
    path = write_dir(tmp_path / "m", TENSORS, shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00003.safetensors"):
        SafetensorsDir(path)


def test_index_names_tensor_absent_from_shard(tmp_path):
    path = write_dir(tmp_path / "m", TENSORS, shards=2)
    index = json.loads((path / INDEX_NAME).read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="ghost"):
        SafetensorsDir(path)


@pytest.mark.parametrize("keep", [5, 40, -8])
def test_truncated_file(tmp_path, keep):
    path = write_dir(tmp_path / "m", TENSORS)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep > 0 else data[:keep])
    with pytest.raises(ModelLoadError, match="truncated"):
        SafetensorsDir(path)


def test_garbage_file(tmp_path):
    path = write_dir(tmp_path / "m", TENSORS)
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        SafetensorsDir(path)


def test_missing_tensor(tmp_path):
    d = SafetensorsDir(write_dir(tmp_path / "m", TENSORS))
    with pytest.raises(ModelLoadError, match="'nope' is missing"):
        d.get("nope")


def test_bad_json(tmp_path):
    path = write_dir(tmp_path / "m", TENSORS)
    (path / "config.json").write_text("{oops")
    with pytest.raises(ModelLoadError, match="cannot parse"):
        SafetensorsDir(path)
