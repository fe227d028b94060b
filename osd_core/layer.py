"""The record of one compressed tensor, and how it becomes a dense delta again.

One record type serves every method, so the artifact writer, the reader and the reconstruction
never branch on the method, only on the encoding ``kind``:

- ``factored``: sparse (or dense) factors ``U`` (n×k) and ``V`` (d×k); delta = ``U @ V.T``.
- ``sparse``: selected entries of the delta itself.
- ``dense``: the whole delta, stored in a narrow float type (norms, biases, unknown tensors).
- ``replace``: the fine-tuned tensor itself, for tensors the base lacks (a new head).
- ``zero``: the delta is exactly zero (frozen layers); nothing is stored.

Positions are flat indices into the factor (row-major) stored in the narrowest signed integer type
that holds them; values are float32 as in the paper's accounting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ArtifactError

KINDS = ("factored", "sparse", "dense", "replace", "zero")

# The payload tensors each kind must carry.
PARTS: dict[str, tuple[str, ...]] = {
    "factored": ("u.index", "u.values", "v.index", "v.values"),
    "sparse": ("index", "values"),
    "dense": ("values",),
    "replace": ("values",),
    "zero": (),
}


@dataclass(frozen=True)
class CompressedLayer:
    """One tensor of a compressed delta: its encoding, payload and what it cost."""

    name: str
    kind: str
    shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    k: int = 0
    budget_bits: int | None = None
    paper_bits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ArtifactError(f"{self.name}: unknown layer kind {self.kind!r}; expected one of {KINDS}")
        missing = set(PARTS[self.kind]) - set(self.tensors)
        if missing:
            raise ArtifactError(f"{self.name}: {self.kind} layer lacks payload tensors {sorted(missing)}")

    @property
    def nbytes(self) -> int:
        """Real bytes of the payload as stored (excluding the artifact's manifest)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense ``U`` (n×k) and ``V`` (d×k) of a factored layer, zeros where masked."""
        if self.kind != "factored":
            raise ArtifactError(f"{self.name}: a {self.kind} layer has no factors")
        n, d = self.shape
        u = _scatter(self.tensors["u.index"], self.tensors["u.values"], n * self.k, self.name, "U")
        v = _scatter(self.tensors["v.index"], self.tensors["v.values"], d * self.k, self.name, "V")
        return u.view(n, self.k), v.view(d, self.k)

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense float32 delta (or, for ``replace``, the tensor itself) this layer encodes."""
        if self.kind == "zero":
            return torch.zeros(self.shape, dtype=torch.float32, device=device)
        if self.kind in ("dense", "replace"):
            return self.tensors["values"].to(device=device, dtype=torch.float32).reshape(self.shape)
        if self.kind == "sparse":
            numel = math.prod(self.shape)
            flat = _scatter(self.tensors["index"], self.tensors["values"], numel, self.name, "delta")
            return flat.to(device).view(self.shape)
        u, v = self.factors()
        return (u.to(device) @ v.to(device).T).contiguous()


def index_dtype(positions: int) -> torch.dtype:
    """The narrowest signed integer type that can address ``positions`` slots."""
    if positions <= torch.iinfo(torch.int16).max + 1:
        return torch.int16
    if positions <= torch.iinfo(torch.int32).max + 1:
        return torch.int32
    return torch.int64


def _scatter(index: torch.Tensor, values: torch.Tensor, numel: int, name: str, what: str) -> torch.Tensor:
    """Place ``values`` at flat ``index`` in a zero vector, refusing anything out of range.

    An empty ``index`` with ``numel`` values means the tensor was kept whole. The checks keep a
    damaged artifact from ever producing wrong weights silently.
    """
    if index.numel() == 0 and values.ndim == 1 and values.numel() == numel:
        return _finite(values.to(torch.float32), name, what).clone()
    if index.ndim != 1 or values.ndim != 1 or index.numel() != values.numel() or values.numel() > numel:
        raise ArtifactError(
            f"{name}: {what} positions ({tuple(index.shape)}) and values ({tuple(values.shape)}) must be "
            f"1-D, of equal length and at most {numel}"
        )
    flat = torch.zeros(numel, dtype=torch.float32)
    if index.numel() == 0:
        return flat
    index = index.to(torch.int64)
    if int(index.min()) < 0 or int(index.max()) >= numel:
        raise ArtifactError(f"{name}: {what} position out of range [0, {numel})")
    flat[index] = _finite(values.to(torch.float32), name, what)
    return flat


def _finite(values: torch.Tensor, name: str, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(values).all()):
        raise ArtifactError(f"{name}: {what} values contain NaN or Inf")
    return values
