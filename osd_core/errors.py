"""The exceptions osd-fleet raises at its boundaries.

Every error says which file, tensor or value was wrong and what was expected. The classes also
derive from the builtin a caller would naturally catch (``ValueError``, ``KeyError``) so code that
knows nothing about osd-fleet still handles them sensibly.
"""

from __future__ import annotations


class OSDError(Exception):
    """Base class of every error osd-fleet raises on bad input or bad artifacts."""

    def __str__(self) -> str:  # KeyError would otherwise print the repr of the message
        return str(self.args[0]) if self.args else self.__class__.__name__


class ConfigError(OSDError, ValueError):
    """A compression parameter is out of range or inconsistent."""


class BudgetError(OSDError, ValueError):
    """A bit budget cannot hold what a method needs (for instance not one entry per factor)."""


class CheckpointError(OSDError, ValueError):
    """A checkpoint directory or safetensors file is missing, unsafe, truncated or inconsistent."""


class MissingTensorError(CheckpointError, KeyError):
    """A tensor present in one checkpoint (or in a delta) is absent from the other."""


class OutputError(OSDError, ValueError):
    """An output path may not be written: it exists, is not ours to replace, or is an input."""


class ArtifactError(OSDError, ValueError):
    """A compressed delta fails its format, version or checksum checks."""


class CalibrationError(OSDError, ValueError):
    """Calibration data is missing, empty, malformed or does not fit the model."""
