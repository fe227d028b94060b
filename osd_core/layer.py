"""The record of one compressed tensor, and how it becomes a dense delta again.

One record type serves every method, so the artifact writer, the reader and the reconstruction
never branch on the method, only on the encoding ``kind``:

- ``factored``: sparse (or dense) factors ``U`` (n×k) and ``V`` (d×k); delta = ``U @ V.T``.
- ``sparse``: selected entries of the delta itself.
- ``dense``: the whole delta, stored in a narrow float type, or in int8 or packed int4 with one
  float32 ``scale`` (norms, biases, unknown tensors).
- ``replace``: the fine-tuned tensor itself, for tensors the base lacks (a new head).
- ``zero``: the delta is exactly zero (frozen layers); nothing is stored.
- ``sign``: the sign of every entry, one bit each in ``bitmap`` (set: positive), times one float32
  ``scale`` (BitDelta's encoding, ``osd_core.factorize``).
- ``experts``: a mixture-of-experts tensor (experts × n × d), one matrix record per expert slice
  under the part prefix ``e<i>.``: a slice with ``u.``/``v.`` parts is factored, one with plain
  parts is sparse, one with no parts is zero (an expert the fine-tune never routed to). Each slice
  has its own budget and int8 scales, exactly as if it were a layer of its own.

A fine-tune whose vocabulary grew (added tokens) has embedding and output rows the base lacks.
Its record has ``new_rows``: the kind encodes the delta of the rows both share (``shared_shape``),
and ``rows.values`` holds the appended rows whole (fp16, or fp32 where fp16 would not hold them).

Kept entries of a factor (or of a sparse delta) are a ``<prefix>values`` vector located by either
``<prefix>index`` (flat row-major positions in the narrowest signed integer type that holds them;
empty when the matrix is kept whole) or ``<prefix>bitmap`` (one bit per slot, packed eight to a
byte, least significant bit first). Values are floats, or integers with a float32 ``<prefix>scale``
per column (value = q · scale[column]): int8; int4 (q in [-7, 7]) packed two to a ``uint8``, low
nibble first, each stored as q + 8; or int2 (q in [-1, 1]) packed four to a byte, lowest bits
first, each stored as q + 2. An all-zero field is padding and never a value.

A factored layer may store its singular vectors at mixed widths (Delta-CoMe's encoding): instead
of one ``u.``/``v.`` pair, one pair per width under ``q8.``, ``q4.`` and ``q2.`` (``q4.u.values``),
each kept whole with a scale per column. The groups hold the leading columns in that order, widest
first, so ``U`` is their columns side by side; each group's column count is its scale's length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .errors import ArtifactError
from .finite import all_finite

KINDS = ("factored", "sparse", "dense", "replace", "zero", "experts", "sign")

# The encoded matrices of each kind, by part prefix; dense kinds carry one plain "values" tensor.
MATRICES: dict[str, tuple[str, ...]] = {"factored": ("u.", "v."), "sparse": ("",)}
FLOAT_VALUES = (torch.float32, torch.float16, torch.bfloat16)
ROWS = "rows.values"  # the appended rows of a layer with new_rows
INT_LEVELS = {"int8": 127, "int4": 7, "int2": 1}  # the largest |q| of each integer value type (symmetric)
PACKED_BITS = {"int4": 4, "int2": 2}  # integer types packed several to a byte
PACKED_INT4 = torch.uint8  # the stored dtype of packed values (int4, and int2 in width groups)
# The column groups of a mixed-width factored layer, in column order, and each group's value type.
WIDTH_GROUPS = {"q8.": "int8", "q4.": "int4", "q2.": "int2"}


@dataclass(frozen=True)
class CompressedLayer:
    """One tensor of a compressed delta: its encoding, payload and what it cost."""

    name: str
    kind: str
    shape: tuple[int, ...]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    k: int = 0
    budget_bits: int | None = None
    paper_bits: int = 0  # of the encoded delta; appended rows count in bytes only
    new_rows: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ArtifactError(f"{self.name}: unknown layer kind {self.kind!r}; expected one of {KINDS}")
        if self.new_rows:
            self._check_new_rows()
        if self.kind == "experts":
            if len(self.shape) != 3:
                raise ArtifactError(f"{self.name}: an experts layer is 3-D (experts × n × d), got {list(self.shape)}")
            slots = {f"e{i}." for i in range(self.shape[0])}
            stray = sorted(key for key in self.tensors if key[: key.find(".") + 1] not in slots)
            if stray:
                raise ArtifactError(
                    f"{self.name}: experts layer has parts outside its {self.shape[0]} slices: {stray[:3]}")
            self.slices()  # each slice checks its own parts
            return
        if self.kind == "sign":
            self._check_signs()
            return
        if self.kind in MATRICES:
            groups = self.width_groups()
            for group, dtype in groups:
                for matrix in MATRICES[self.kind]:
                    _check_parts(self.name, self.tensors, group + matrix, dtype)
            if groups[0][1] is not None:
                self._check_group_columns(groups)
            known = {f"{group}{matrix}{part}" for group, _ in groups for matrix in MATRICES[self.kind]
                     for part in ("values", "index", "bitmap", "scale")}
        else:
            known = set() if self.kind == "zero" else {"values"}
            if known - set(self.tensors):
                raise ArtifactError(f"{self.name}: {self.kind} layer lacks payload tensor 'values'")
            if known:
                known |= self._check_whole_values()
        unknown = set(self.tensors) - known - ({ROWS} if self.new_rows else set())
        if unknown:
            raise ArtifactError(f"{self.name}: {self.kind} layer has unexpected payload tensors {sorted(unknown)}")

    def width_groups(self) -> list[tuple[str, str | None]]:
        """The column groups of a factored or sparse layer: ``[("", None)]`` for one group of any
        value type, else each mixed-width group present (prefix and value type), in column order."""
        present = [(group, dtype) for group, dtype in WIDTH_GROUPS.items()
                   if self.kind == "factored" and any(key.startswith(group) for key in self.tensors)]
        return present or [("", None)]

    def _check_group_columns(self, groups: list[tuple[str, str | None]]) -> None:
        widths = []
        for group, _ in groups:
            u, v = self.tensors[f"{group}u.scale"], self.tensors[f"{group}v.scale"]
            if u.ndim != 1 or u.shape != v.shape or u.numel() == 0:
                raise ArtifactError(f"{self.name}: group {group!r} needs equal non-empty 1-D U and V scales, got "
                                    f"{tuple(u.shape)} and {tuple(v.shape)}")
            widths.append(u.numel())
        if sum(widths) != self.k:
            raise ArtifactError(f"{self.name}: its width groups hold {sum(widths)} columns, the layer's rank is {self.k}")

    def _check_whole_values(self) -> set[str]:
        """A tensor stored whole: float values, or (dense only) int8 or packed int4 with one float32 ``scale``."""
        values = self.tensors["values"]
        numel = math.prod(self.shared_shape)
        if values.dtype == PACKED_INT4:
            unpack_levels(values, numel, 4, self.name, "whole")  # checks its length and fields
        elif values.numel() != numel:
            raise ArtifactError(f"{self.name}: a {self.kind} layer of shape {list(self.shape)} needs {numel} "
                                f"values, got shape {tuple(values.shape)}")
        if values.dtype in FLOAT_VALUES:
            return set()
        scale = self.tensors.get("scale")
        if self.kind != "dense" or values.dtype not in (torch.int8, PACKED_INT4) or scale is None \
                or scale.dtype != torch.float32 or tuple(scale.shape) != (1,):
            raise ArtifactError(f"{self.name}: {self.kind} values of dtype {values.dtype} need a float type, or "
                                "(dense layers) int8 or packed int4 with a float32 'scale' of shape (1,)")
        return {"scale"}

    def _check_signs(self) -> None:
        numel = math.prod(self.shared_shape)
        bitmap, scale = self.tensors.get("bitmap"), self.tensors.get("scale")
        if set(self.tensors) - {ROWS} != {"bitmap", "scale"} or bitmap.dtype != torch.uint8 \
                or tuple(bitmap.shape) != (math.ceil(numel / 8),) or scale.dtype != torch.float32 \
                or tuple(scale.shape) != (1,):
            raise ArtifactError(f"{self.name}: a sign layer of shape {list(self.shape)} needs a uint8 'bitmap' of "
                                f"{math.ceil(numel / 8)} bytes and a float32 'scale' of shape (1,)")

    def _check_new_rows(self) -> None:
        if self.kind not in ("factored", "sparse", "dense", "zero", "sign") or len(self.shape) != 2 \
                or not 0 < self.new_rows < self.shape[0]:
            raise ArtifactError(f"{self.name}: a {self.kind} layer of shape {list(self.shape)} cannot have "
                                f"{self.new_rows} new rows")
        rows = self.tensors.get(ROWS)
        expected = self.new_rows * math.prod(self.shape[1:])
        if rows is None or rows.dtype not in FLOAT_VALUES or rows.ndim != 1 or rows.numel() != expected:
            raise ArtifactError(f"{self.name}: its {self.new_rows} new rows need a float vector '{ROWS}' of "
                                f"{expected} values")

    @property
    def shared_shape(self) -> tuple[int, ...]:
        """The shape of the rows base and fine-tune share: what the kind's delta covers."""
        return (self.shape[0] - self.new_rows, *self.shape[1:]) if self.new_rows else self.shape

    def appended_rows(self) -> torch.Tensor:
        """The fine-tune's rows beyond the base's (added tokens), whole, in float32."""
        rows = self.tensors[ROWS].to(torch.float32)
        return _finite(rows, self.name, "new rows").reshape(self.new_rows, *self.shape[1:])

    @property
    def nbytes(self) -> int:
        """Real bytes of the payload as stored (excluding the artifact's manifest)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def slices(self) -> list[CompressedLayer]:
        """The per-expert matrix records of an experts layer, named ``<name>[<i>]``."""
        if self.kind != "experts":
            raise ArtifactError(f"{self.name}: a {self.kind} layer has no expert slices")
        records = []
        for i in range(self.shape[0]):
            prefix = f"e{i}."
            parts = {key[len(prefix):]: t for key, t in self.tensors.items() if key.startswith(prefix)}
            kind = "factored" if "u.values" in parts else "sparse" if parts else "zero"
            records.append(CompressedLayer(f"{self.name}[{i}]", kind, self.shape[1:], parts, k=self.k))
        return records

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The dense ``U`` (n×k) and ``V`` (d×k) of a factored layer, zeros where masked."""
        if self.kind != "factored":
            raise ArtifactError(f"{self.name}: a {self.kind} layer has no factors")
        n, d = self.shared_shape
        us, vs = [], []
        for group, dtype in self.width_groups():
            cols = self.k if dtype is None else self.tensors[f"{group}u.scale"].numel()
            bits = PACKED_BITS.get(dtype, 4)
            us.append(decode_matrix(self.tensors, f"{group}u.", n, cols, self.name, "U", bits).view(n, cols))
            vs.append(decode_matrix(self.tensors, f"{group}v.", d, cols, self.name, "V", bits).view(d, cols))
        return torch.cat(us, dim=1), torch.cat(vs, dim=1)

    def delta(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The dense float32 delta (or, for ``replace``, the tensor itself) this layer encodes, over
        the rows base and fine-tune share (``appended_rows`` holds any others)."""
        if self.kind == "zero":
            return torch.zeros(self.shared_shape, dtype=torch.float32, device=device)
        if self.kind == "experts":
            return torch.stack([part.delta(device) for part in self.slices()])
        if self.kind == "sign":
            numel = math.prod(self.shared_shape)
            positive = unpack_bitmap(self.tensors["bitmap"], numel).to(device)
            scale = _finite(self.tensors["scale"], self.name, "scale").to(device)
            return (torch.where(positive, 1.0, -1.0) * scale).view(self.shared_shape)
        if self.kind in ("dense", "replace"):
            values = self.tensors["values"]
            if values.dtype == PACKED_INT4:
                values = unpack_levels(values, math.prod(self.shared_shape), 4, self.name, "whole")
            values = values.to(device=device, dtype=torch.float32)
            if "scale" in self.tensors:
                values = values * _finite(self.tensors["scale"], self.name, "scale").to(device)
            return values.reshape(self.shared_shape)
        if self.kind == "sparse":
            rows, cols = self.shared_shape
            return decode_matrix(self.tensors, "", rows, cols, self.name, "delta").to(device).view(rows, cols)
        u, v = self.factors()
        return (u.to(device) @ v.to(device).T).contiguous()


def stack_experts(name: str, slices: list[CompressedLayer], budget_bits: int) -> CompressedLayer:
    """One experts record of the per-slice records ``compress_matrix`` returned, in expert order."""
    kinds = {part.kind for part in slices} - {"zero"}
    if not kinds <= {"factored", "sparse"}:
        raise ArtifactError(f"{name}: expert slices must be factored, sparse or zero, got {sorted(kinds)}")
    ranks = {part.k for part in slices if part.kind == "factored"}
    if len(ranks) > 1:
        raise ArtifactError(f"{name}: factored expert slices must share one rank k, got {sorted(ranks)}")
    tensors = {f"e{i}.{key}": t for i, part in enumerate(slices) for key, t in part.tensors.items()}
    shape = (len(slices), *slices[0].shape)
    return CompressedLayer(name, "experts", shape, tensors, k=ranks.pop() if ranks else 0,
                           budget_bits=budget_bits, paper_bits=sum(part.paper_bits for part in slices))


def narrow_whole(values: torch.Tensor) -> torch.Tensor:
    """Values stored whole, flat: in fp16, or fp32 where fp16 would overflow or lose them entirely."""
    narrow = values.to(torch.float16)
    stored = narrow if all_finite(narrow) else values.to(torch.float32)
    return stored.reshape(-1).contiguous()


def quantize_whole(values: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat ``dtype`` values (int8, or int4 packed two to a byte) and the one float32 scale
    (max |value| / the type's largest level) they are multiples of."""
    flat = values.reshape(-1).to(torch.float32)
    scale = flat.abs().max().reshape(1) / INT_LEVELS[dtype]
    return to_levels(flat, scale, dtype), scale


def to_levels(values: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """``values / scale`` rounded to the symmetric levels of ``dtype``, as stored: int8, or int4 or
    int2 packed several to a byte. One rule for factors and whole deltas, so all decode the same way."""
    top = INT_LEVELS[dtype]
    q = (values / scale).round().clamp(-top, top).to(torch.int8)
    return pack_levels(q, PACKED_BITS[dtype]) if dtype in PACKED_BITS else q


def with_appended_rows(layer: CompressedLayer, rows: torch.Tensor) -> CompressedLayer:
    """``layer`` with the fine-tune's appended rows stored whole: fp16, or fp32 where fp16 overflows."""
    return CompressedLayer(layer.name, layer.kind, (layer.shape[0] + rows.shape[0], *layer.shape[1:]),
                           {**layer.tensors, ROWS: narrow_whole(rows)}, k=layer.k,
                           budget_bits=layer.budget_bits, paper_bits=layer.paper_bits, new_rows=rows.shape[0])


def index_dtype(positions: int) -> torch.dtype:
    """The narrowest signed integer type that can address ``positions`` slots."""
    if positions <= torch.iinfo(torch.int16).max + 1:
        return torch.int16
    if positions <= torch.iinfo(torch.int32).max + 1:
        return torch.int32
    return torch.int64


def pack_levels(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers in [-(2^(bits-1) - 1), 2^(bits-1) - 1], 8 / bits to a byte, the first in the lowest
    bits, each stored as q + 2^(bits-1), so that an all-zero field is padding and never a value."""
    per_byte, offset = 8 // bits, 1 << (bits - 1)
    fields = (q.reshape(-1).to(torch.int16) + offset).to(torch.uint8)
    padded = torch.zeros(per_byte * math.ceil(fields.numel() / per_byte), dtype=torch.uint8, device=q.device)
    padded[: fields.numel()] = fields
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=q.device)
    return (padded.view(-1, per_byte) << shifts).sum(1, dtype=torch.uint8)  # fields never overlap: no carries


def unpack_levels(packed: torch.Tensor, count: int, bits: int, name: str, what: str) -> torch.Tensor:
    """The ``count`` int8 values that ``pack_levels`` packed at ``bits``; a wrong length, a zero field
    inside or a non-zero one in the padding raises ``ArtifactError``."""
    per_byte = 8 // bits
    if packed.ndim != 1 or packed.numel() != math.ceil(count / per_byte):
        raise ArtifactError(f"{name}: {what} int{bits} values must be {math.ceil(count / per_byte)} bytes for "
                            f"{count} entries, got {tuple(packed.shape)}")
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8)
    fields = ((packed[:, None] >> shifts) & ((1 << bits) - 1)).reshape(-1)
    if bool((fields[:count] == 0).any()) or bool(fields[count:].any()):
        raise ArtifactError(f"{name}: {what} int{bits} values hold a zero field or non-zero padding")
    return fields[:count].to(torch.int8) - (1 << (bits - 1))


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
                  what: str, packed_bits: int = 4) -> torch.Tensor:
    """The flat float32 ``rows × cols`` matrix stored under ``prefix``, zeros where not kept; packed
    values hold ``packed_bits`` each (int4, or int2 in a ``q2.`` width group).

    Every structural fact is checked (lengths, ranges, padding bits, scale shape, finiteness), so
    a damaged artifact raises ``ArtifactError`` and never becomes wrong weights silently.
    """
    numel = rows * cols
    values = tensors[f"{prefix}values"]
    if values.dtype == PACKED_INT4:
        values = unpack_levels(values, _kept_count(tensors, prefix, numel, name, what), packed_bits, name, what)
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


def _kept_count(tensors: dict[str, torch.Tensor], prefix: str, numel: int, name: str, what: str) -> int:
    """How many entries the positions keep (all ``numel`` for an empty index): what packed int4
    values must hold. ``_positions`` checks the positions themselves against that count."""
    bitmap = tensors.get(f"{prefix}bitmap")
    if bitmap is not None:
        _check_bitmap(bitmap, numel, name, what)
        return int(unpack_bitmap(bitmap, numel).sum())
    index = tensors[f"{prefix}index"]
    return index.numel() or numel


def _positions(tensors: dict[str, torch.Tensor], prefix: str, numel: int, count: int, name: str,
               what: str) -> torch.Tensor | None:
    """Flat positions of the ``count`` kept entries (``None``: all ``numel`` slots, in order)."""
    bitmap = tensors.get(f"{prefix}bitmap")
    if bitmap is not None:
        _check_bitmap(bitmap, numel, name, what)
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


def _check_bitmap(bitmap: torch.Tensor, numel: int, name: str, what: str) -> None:
    if bitmap.dtype != torch.uint8 or tuple(bitmap.shape) != (math.ceil(numel / 8),):
        raise ArtifactError(f"{name}: {what} bitmap must be uint8 of shape ({math.ceil(numel / 8)},), got "
                            f"{bitmap.dtype} {tuple(bitmap.shape)}")


def _check_parts(name: str, tensors: dict[str, torch.Tensor], prefix: str, dtype: str | None = None) -> None:
    """One values vector, exactly one position encoding, and a scale exactly when values are
    integers; in a width group, integers of the group's type kept whole (an empty index)."""
    values = tensors.get(f"{prefix}values")
    if values is None:
        raise ArtifactError(f"{name}: payload lacks tensor '{prefix}values'")
    if dtype is not None:
        index = tensors.get(f"{prefix}index")
        stored = torch.int8 if dtype == "int8" else PACKED_INT4
        if values.dtype != stored or index is None or index.numel() or f"{prefix}scale" not in tensors:
            raise ArtifactError(f"{name}: width group '{prefix}' holds {dtype} values ({stored}) kept whole: an "
                                f"empty '{prefix}index' and a '{prefix}scale'")
    if (f"{prefix}index" in tensors) == (f"{prefix}bitmap" in tensors):
        raise ArtifactError(f"{name}: '{prefix}values' needs exactly one of '{prefix}index' or '{prefix}bitmap'")
    if values.dtype not in (*FLOAT_VALUES, torch.int8, PACKED_INT4):
        raise ArtifactError(f"{name}: '{prefix}values' has dtype {values.dtype}; expected a float type, int8 or "
                            "packed int4 (uint8)")
    if (values.dtype in (torch.int8, PACKED_INT4)) != (f"{prefix}scale" in tensors):
        raise ArtifactError(f"{name}: '{prefix}scale' must accompany integer values, and only them")


def _finite(values: torch.Tensor, name: str, what: str) -> torch.Tensor:
    if not all_finite(values):
        raise ArtifactError(f"{name}: {what} values contain NaN or Inf")
    return values
