"""The exceptions of sketchx. The extension module raises these (looked up by name), so they live in Python:
``InvalidRequestError`` is both a ``SketchxError`` and a ``ValueError``; ``UnknownJobError`` a ``KeyError``."""

from __future__ import annotations

from typing import Optional


class SketchxError(Exception):
    """Base class of every sketchx error."""


class InvalidRequestError(SketchxError, ValueError):
    """A parameter is out of range or malformed, or the sketch cannot be decoded. Nothing was queued.

    ``field`` names the offending parameter (``"steps"``, ``"sketch"``, ...); the message names the allowed range.
    """

    field: Optional[str]

    def __init__(self, message: str, field: Optional[str] = None) -> None:
        super().__init__(message)
        self.field = field


class UnknownJobError(SketchxError, KeyError):
    """No job has this id (never submitted, malformed, or forgotten after cleanup)."""

    def __str__(self) -> str:  # KeyError would show the message quoted like a key
        return str(self.args[0]) if self.args else ""


class ModelLoadError(SketchxError):
    """A model could not be loaded: missing or malformed file, unsupported configuration, failed download, or an
    unavailable device."""


class QueueFullError(SketchxError):
    """The job queue is at capacity; try again later."""
