"""errors.read_json_object: the one reader of a model directory's JSON files (loading/safetensors_dir.py and
tokenizer.py): {} for an optional absent file, one ModelLoadError naming the file otherwise."""

import pytest

from hotexperts.errors import ModelLoadError, read_json_object


def test_reads_an_object(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe"}')
    assert read_json_object(tmp_path / "config.json") == {"model_type": "qwen3_moe"}


def test_an_optional_absent_file_is_empty(tmp_path):
    assert read_json_object(tmp_path / "generation_config.json", required=False) == {}


@pytest.mark.parametrize("text, message", [
    (None, "config.json not found in"), ("[1, 2]", "does not hold a JSON object"),
    ("{nope", "is not valid JSON"), ("[" * 100, "nested deeper"), (b"\xff\xfe", "cannot parse"),
])
def test_bad_files_raise_one_model_load_error(tmp_path, text, message):
    path = tmp_path / "config.json"
    if isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        read_json_object(path)
