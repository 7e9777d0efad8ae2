"""User-facing errors: one clear message, no traceback (the CLI prints `error: <message>`)."""


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
