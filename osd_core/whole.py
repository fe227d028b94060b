"""Tensors stored whole: 1-D deltas (biases, norms), heads too small to factor, replaced heads.

The paper's budget ``32·r·(n+d)`` counts factorised matrices only, so a delta's 1-D tensors are
stored beside it at ``dense_dtype``: at r = 0.25 on MiniLM they were a fifth of the bytes. The
``global-all`` allocation brings them inside the budget: each 1-D delta is one more layer with a
few options (dropped, or whole at each width no wider than ``dense_dtype``), and this module says
what each option costs and how it is stored, so measuring and compressing agree bit for bit.
"""

from __future__ import annotations

import torch

from .config import DENSE_DTYPES, SCALED_DTYPES, VALUE_DTYPES, CompressionConfig
from .errors import ConfigError
from .finite import all_finite, is_zero
from .layer import INT_LEVELS, CompressedLayer, narrow_whole, quantize_whole

SCALE_BITS = 32  # one float32 scale per integer tensor


def dense_layer(name: str, values: torch.Tensor, kind: str, dtype: str = "float16",
                budget_bits: int | None = None) -> CompressedLayer:
    """Store a tensor whole: a delta in ``dtype`` (int8 or int4: one float32 scale for the tensor);
    a replaced tensor, or one an integer type cannot scale, in fp16, or fp32 where fp16 would
    overflow or lose it. ``budget_bits`` is the share of the model's budget it was given, when an
    allocation counted it (``None``: stored beside the budget)."""
    if kind == "dense" and is_zero(values):
        return CompressedLayer(name, "zero", tuple(values.shape), budget_bits=budget_bits)
    if kind == "dense" and dtype in INT_LEVELS:
        quantized, scale = quantize_whole(values, dtype)
        if float(scale) > 0 and all_finite(scale):
            return CompressedLayer(name, kind, tuple(values.shape), {"values": quantized, "scale": scale},
                                   budget_bits=budget_bits, paper_bits=values.numel() * VALUE_DTYPES[dtype] + SCALE_BITS)
    stored = narrow_whole(values)
    return CompressedLayer(name, kind, tuple(values.shape), {"values": stored}, budget_bits=budget_bits,
                           paper_bits=stored.numel() * stored.element_size() * 8)


def whole_options(numel: int, config: CompressionConfig) -> dict[int, str | None]:
    """How a budgeted 1-D delta of ``numel`` entries may be stored, keyed by its bits: dropped
    (0 bits, ``None``), or whole at each of ``DENSE_DTYPES`` no wider than ``config.dense_dtype``;
    ascending."""
    widest = VALUE_DTYPES[config.dense_dtype]
    options: dict[int, str | None] = {0: None}
    for dtype in sorted(DENSE_DTYPES, key=VALUE_DTYPES.get):
        if VALUE_DTYPES[dtype] <= widest:
            options[numel * VALUE_DTYPES[dtype] + (SCALE_BITS if dtype in SCALED_DTYPES else 0)] = dtype
    return options


def whole_layer(name: str, delta: torch.Tensor, config: CompressionConfig, budget_bits: int) -> CompressedLayer:
    """A budgeted 1-D delta stored as the allocation chose: the option of exactly ``budget_bits``."""
    options = whole_options(delta.numel(), config)
    if budget_bits not in options:
        offered = ", ".join(f"{bits} ({dtype or 'dropped'})" for bits, dtype in options.items())
        raise ConfigError(f"{name}: {budget_bits} bits is none of its whole-tensor options: {offered}")
    dtype = options[budget_bits]
    if dtype is None:
        return CompressedLayer(name, "zero", tuple(delta.shape), budget_bits=0)
    return dense_layer(name, delta, "dense", dtype, budget_bits=budget_bits)
