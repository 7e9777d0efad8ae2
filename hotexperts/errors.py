"""User-facing errors: one clear message, no traceback (the CLI prints `error: <message>`)."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path


class HotExpertsError(Exception):
    """Base for every error a user can cause (bad files, bad flags, prompt too long, ...)."""


class ModelLoadError(HotExpertsError):
    """A model directory or file cannot be read: missing/truncated shard, wrong shape, unknown type."""


class UnsupportedArchitectureError(ModelLoadError):
    """config.json names a model_type this engine does not implement."""


class ContextLengthError(HotExpertsError):
    """The prompt (plus requested tokens) does not fit in the model's context."""


class PlacementError(HotExpertsError):
    """Placement flags that contradict each other or do not fit the VRAM budget."""


class ExpertComputeError(HotExpertsError):
    """The CPU expert worker failed or did not answer during a step: the engine's fault, not the request's
    (the server answers 500, the CLI prints the message)."""


@contextmanager
def about(path: str | Path):
    """Inside, a HotExpertsError whose message does not name `path` gets it as a prefix (same type): a
    loader wraps its body so every error names the file it came from."""
    try:
        yield
    except HotExpertsError as e:
        if Path(path).name in str(e):
            raise
        raise type(e)(f"{path}: {e}") from None


MAX_JSON_DEPTH = 64          # arrays/objects nested deeper are refused before parsing (no RecursionError)
_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_depth_exceeds(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """True when `text` nests arrays/objects deeper than max_depth (strings skipped; linear time)."""
    if isinstance(text, bytes | bytearray):
        text = text.decode("utf-8", errors="replace")
    depth = 0
    for m in _JSON_TOKENS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > max_depth:
                return True
        elif c in "]}":
            depth -= 1
    return False


def loads_json(text: str | bytes, where: str, error: type[HotExpertsError] = HotExpertsError,
               max_depth: int = MAX_JSON_DEPTH):
    """json.loads with a nesting bound: bad JSON or nesting beyond max_depth raise one `error` naming
    `where` (a file or "the request body")."""
    if json_depth_exceeds(text, max_depth):
        raise error(f"{where}: JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise error(f"{where} is not valid JSON: {e}") from None


def read_json(path: str | Path, what: str, error: type[HotExpertsError] = HotExpertsError):
    """The JSON document in `path`; a missing or unreadable file raises `error` naming `what` it should be."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path} is not a readable {what} (JSON): {e}") from None
    try:
        return loads_json(text, "the document", error)
    except HotExpertsError as e:
        raise error(f"{path} is not a readable {what} (JSON): {e}") from None


def read_json_object(path: str | Path, required: bool = True) -> dict:
    """The JSON object in a model file `path` (config.json, tokenizer_config.json, ...); {} when optional and
    absent. A missing required file, an unreadable one, bad JSON or a non-object raise ModelLoadError."""
    path = Path(path)
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.name} not found in {path.parent} "
                                 "(is this a Hugging Face model directory?)")
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"cannot parse {path}: {e}") from e
    data = loads_json(text, f"cannot parse {path}", ModelLoadError)
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return data
