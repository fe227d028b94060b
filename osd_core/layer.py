"""The record of one compressed tensor, and how it becomes a dense delta again.

One record type serves every method, so the artifact writer, the reader and the reconstruction
never branch on the method, only on the encoding ``kind``:

- ``factored``: sparse (or dense) factors ``U`` (n×k) and ``V`` (d×k); delta = ``U @ V.T``.
- ``sparse``: selected entries of the delta itself.
- ``dense``: the whole delta, stored in a narrow float type (norms, biases, unknown tensors).
- ``replace``: the fine-tuned tensor itself, for tensors the base lacks (a new head).
- ``zero``: the delta is exactly zero (frozen layers); nothing is stored.

Kept entries of a factor (or of a sparse delta) are a ``<prefix>values`` vector located by either
``<prefix>index`` (flat row-major positions in the narrowest signed integer type that holds them;
empty when the matrix is kept whole) or ``<prefix>bitmap`` (one bit per slot, packed eight to a
byte, least significant bit first). Values are floats, or int8 with a float32 ``<prefix>scale``
per column (value = q · scale[column]).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ArtifactError

KINDS = ("factored", "sparse", "dense", "replace", "zero")

# The encoded matrices of each kind, by part prefix; dense kinds carry one plain "values" tensor.
MATRICES: dict[str, tuple[str, ...]] = {"factored": ("u.", "v."), "sparse": ("",)}
FLOAT_VALUES = (torch.float32, torch.float16, torch.bfloat16)


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
        if self.kind in MATRICES:
            for prefix in MATRICES[self.kind]:
                _check_parts(self.name, self.tensors, prefix)
            known = {f"{p}{part}" for p in MATRICES[self.kind] for part in ("values", "index", "bitmap", "scale")}
        else:
            known = set() if self.kind == "zero" else {"values"}
            if known - set(self.tensors):
                raise ArtifactError(f"{self.name}: {self.kind} layer lacks payload tensor 'values'")
        unknown = set(self.tensors) - known
        if unknown:
            raise ArtifactError(f"{self.name}: {self.kind} layer has unexpected payload tensors {sorted(unknown)}")

    @property
    def nbytes(self) -> int:
        """Real bytes of the payload as stored (excluding the artifact's manifest)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense ``U`` (n×k) and ``V`` (d×k) of a factored layer, zeros where masked."""
        if self.kind != "factored":
            raise ArtifactError(f"{self.name}: a {self.kind} layer has no factors")
        n, d = self.shape
        u = decode_matrix(self.tensors, "u.", n, self.k, self.name, "U")
        v = decode_matrix(self.tensors, "v.", d, self.k, self.name, "V")
        return u.view(n, self.k), v.view(d, self.k)

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense float32 delta (or, for ``replace``, the tensor itself) this layer encodes."""
        if self.kind == "zero":
            return torch.zeros(self.shape, dtype=torch.float32, device=device)
        if self.kind in ("dense", "replace"):
            return self.tensors["values"].to(device=device, dtype=torch.float32).reshape(self.shape)
        if self.kind == "sparse":
            rows, cols = self.shape
            return decode_matrix(self.tensors, "", rows, cols, self.name, "delta").to(device).view(self.shape)
        u, v = self.factors()
        return (u.to(device) @ v.to(device).T).contiguous()


def index_dtype(positions: int) -> torch.dtype:
    """The narrowest signed integer type that can address ``positions`` slots."""
    if positions <= torch.iinfo(torch.int16).max + 1:
        return torch.int16
    if positions <= torch.iinfo(torch.int32).max + 1:
        return torch.int32
    return torch.int64


def pack_bitmap(mask: torch.Tensor) -> torch.Tensor:
    """Pack a flat boolean mask into bytes, eight slots each, least significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    padded = torch.zeros(math.ceil(flat.numel() / 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8, device=flat.device)
    return (padded.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def unpack_bitmap(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """The flat boolean mask of ``numel`` slots packed in ``bitmap`` (see ``pack_bitmap``)."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((bitmap[:, None] >> shifts) & 1).reshape(-1)[:numel].bool()


def decode_matrix(tensors: dict[str, torch.Tensor], prefix: str, rows: int, cols: int, name: str,
                  what: str) -> torch.Tensor:
    """The flat float32 ``rows × cols`` matrix stored under ``prefix``, zeros where not kept.

    Every structural fact is checked (lengths, ranges, padding bits, scale shape, finiteness), so
    a damaged artifact raises ``ArtifactError`` and never becomes wrong weights silently.
    """
    numel = rows * cols
    values = tensors[f"{prefix}values"]
    if values.ndim != 1 or values.numel() > numel:
        raise ArtifactError(f"{name}: {what} values must be 1-D with at most {numel} entries, got "
                            f"{tuple(values.shape)}")
    index = _positions(tensors, prefix, numel, values.numel(), name, what)
    if values.dtype == torch.int8:
        scale = tensors[f"{prefix}scale"]
        if scale.dtype != torch.float32 or tuple(scale.shape) != (cols,):
            raise ArtifactError(f"{name}: {what} scale must be float32 of shape ({cols},), got "
                                f"{scale.dtype} {tuple(scale.shape)}")
        column = torch.arange(numel) % cols if index is None else index % cols
        decoded = values.to(torch.float32) * _finite(scale, name, what)[column]
    else:
        decoded = _finite(values.to(torch.float32), name, what)
    if index is None:
        return decoded.clone()
    flat = torch.zeros(numel, dtype=torch.float32)
    flat[index] = decoded
    return flat


def _positions(tensors: dict[str, torch.Tensor], prefix: str, numel: int, count: int, name: str,
               what: str) -> torch.Tensor | None:
    """Flat positions of the ``count`` kept entries (``None``: all ``numel`` slots, in order)."""
    bitmap = tensors.get(f"{prefix}bitmap")
    if bitmap is not None:
        if bitmap.dtype != torch.uint8 or tuple(bitmap.shape) != (math.ceil(numel / 8),):
            raise ArtifactError(f"{name}: {what} bitmap must be uint8 of shape ({math.ceil(numel / 8)},), got "
                                f"{bitmap.dtype} {tuple(bitmap.shape)}")
        bits = unpack_bitmap(bitmap, math.ceil(numel / 8) * 8)
        if bool(bits[numel:].any()) or int(bits.sum()) != count:
            raise ArtifactError(f"{name}: {what} bitmap marks {int(bits.sum())} slots for {count} values")
        return bits[:numel].nonzero().reshape(-1)
    index = tensors[f"{prefix}index"]
    if index.numel() == 0 and count == numel:
        return None
    if index.ndim != 1 or index.numel() != count or index.dtype not in (torch.int16, torch.int32, torch.int64):
        raise ArtifactError(f"{name}: {what} positions ({tuple(index.shape)}, {index.dtype}) must be a 1-D "
                            f"integer vector as long as the values ({count})")
    index = index.to(torch.int64)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise ArtifactError(f"{name}: {what} position out of range [0, {numel})")
    return index


def _check_parts(name: str, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """One values vector, exactly one position encoding, and a scale exactly when values are int8."""
    values = tensors.get(f"{prefix}values")
    if values is None:
        raise ArtifactError(f"{name}: payload lacks tensor '{prefix}values'")
    if (f"{prefix}index" in tensors) == (f"{prefix}bitmap" in tensors):
        raise ArtifactError(f"{name}: '{prefix}values' needs exactly one of '{prefix}index' or '{prefix}bitmap'")
    if values.dtype not in (*FLOAT_VALUES, torch.int8):
        raise ArtifactError(f"{name}: '{prefix}values' has dtype {values.dtype}; expected a float type or int8")
    if (values.dtype == torch.int8) != (f"{prefix}scale" in tensors):
        raise ArtifactError(f"{name}: '{prefix}scale' must accompany int8 values, and only them")


def _finite(values: torch.Tensor, name: str, what: str) -> torch.Tensor:
    if not bool(torch.isfinite(values).all()):
        raise ArtifactError(f"{name}: {what} values contain NaN or Inf")
    return values
