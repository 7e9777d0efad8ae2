"""User-facing errors: one clear message, no traceback (the CLI prints `error: <message>`)."""

from __future__ import annotations

import json
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


def read_json(path: str | Path, what: str, error: type[HotExpertsError] = HotExpertsError):
    """The JSON document in `path`; a missing or unreadable file raises `error` naming `what` it should be."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise error(f"{path} is not a readable {what} (JSON): {e}") from None
