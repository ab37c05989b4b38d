"""One error hierarchy for everything the tracer refuses.

Every error is raised at the boundary where the problem is understood, and its message names the
file, field or value, says what was expected, and what to do. The CLI prints the message without a
traceback (``--debug`` shows it).
"""

from __future__ import annotations


class TracerError(Exception):
    """Base class: anything the tracer refuses with a clear message."""


class ConfigError(TracerError):
    """config.json or generation_config.json is missing, malformed or inconsistent."""


class CheckpointError(TracerError):
    """Weight files are missing, unsafe, truncated, corrupt or do not match the config."""


class TokenizerError(TracerError):
    """tokenizer.model / tokenizer.json is missing, corrupt or does not fit the model."""


class GenerationError(TracerError):
    """A generation request that cannot be honoured (bad sampling values, prompt too long...)."""


class DeviceError(TracerError):
    """The requested device is absent or has too little memory."""


class TraceError(TracerError):
    """A trace cannot be recorded, saved or loaded (budget exceeded, tampered folder...)."""


class NumericsError(GenerationError):
    """A non-finite value (inf/nan) appeared in the forward pass, e.g. an fp16 overflow."""
