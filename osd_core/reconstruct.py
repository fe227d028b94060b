"""Rebuild a fine-tuned checkpoint from its base and a compressed delta.

The result is an ordinary Hugging Face directory (``config.json`` of the fine-tune plus
safetensors weights) that ``from_pretrained`` loads like the original fine-tune, and a small
``osd-fleet-restore.json`` recording the sha256 of the delta's manifest and the base: the mark
that lets ``--overwrite`` replace it later (:mod:`osd_core.outputs`). Tensors stream through one
at a time; the directory appears atomically under its final name.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .artifact import DeltaArtifact
from .checkpoint import Checkpoint
from .errors import ArtifactError, CheckpointError
from .outputs import OutputDir, check_output, json_field
from .safetensors_io import DTYPES, write_safetensors
from .weight_files import INDEX_FILE, SINGLE_FILE, WEIGHT_SUFFIXES

SHARD_BYTES = 2 << 30
RESTORE_MARKER = "osd-fleet-restore.json"
RESTORE_FORMAT = "osd-fleet-restored-checkpoint"


def reconstruct_checkpoint(
    base_dir: str | Path,
    delta_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    check_base: bool = True,
    expected_sha256: str | None = None,
) -> Path:
    """Write ``base + delta`` to ``out_dir`` as a Hugging Face checkpoint and return its path.

    With ``check_base`` the base's content hash must equal the one recorded at compression:
    applying a delta to the wrong base would silently produce a different model.
    """
    output = OutputDir(out_dir, what="restored checkpoint", inputs=(base_dir, delta_dir), overwrite=overwrite,
                       is_ours=is_restored_dir)
    artifact = DeltaArtifact.open(delta_dir, expected_sha256=expected_sha256)
    base = Checkpoint.open(base_dir)
    if check_base:
        check_base_matches(base, artifact)
    with output as tmp:
        _copy_side_files(base.local_dir, artifact, tmp)
        _write_weights(base, artifact, tmp)
        marker = {"format": RESTORE_FORMAT, "delta_manifest_sha256": artifact.manifest_sha256,
                  "base": base.source.canonical}
        (tmp / RESTORE_MARKER).write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        return output.publish()


def check_base_matches(base: Checkpoint, artifact: DeltaArtifact) -> None:
    """Refuse a base whose weights differ from the one the delta was made against: applying a
    delta to the wrong base would silently produce a different model."""
    recorded = artifact.manifest.base.get("sha256")
    actual = base.identity()["sha256"]
    if recorded != actual:
        raise CheckpointError(
            f"{base.location}: base weights (sha256 {actual[:12]}…) differ from the base this delta was "
            f"made against (sha256 {str(recorded)[:12]}…)"
        )


def check_restore_output(out: str | Path, *, inputs: tuple[str | Path, ...] = (), overwrite: bool = False) -> None:
    """Raise now, before a download, unless a checkpoint may be restored into ``out``."""
    check_output(Path(out), what="restored checkpoint", inputs=inputs, overwrite=overwrite, is_ours=is_restored_dir)


def is_restored_dir(path: Path) -> bool:
    """Whether ``path`` is a checkpoint this module restored (so ``--overwrite`` may replace it)."""
    return json_field(path / RESTORE_MARKER, "format") == RESTORE_FORMAT


def apply_layer_delta(base: torch.Tensor | None, layer, dtype: torch.dtype) -> torch.Tensor:
    """``base + Δ̂`` in float32, cast to ``dtype``, with any rows the fine-tune appended; a ``replace``
    layer is the tensor itself."""
    if layer.kind == "replace":
        return layer.delta().to(dtype)
    if base is None:
        raise ArtifactError(f"{layer.name}: delta has no base tensor to apply to")
    if tuple(base.shape) != tuple(layer.shared_shape):
        raise ArtifactError(f"{layer.name}: delta shape {list(layer.shared_shape)} does not match base "
                            f"{list(base.shape)}")
    tensor = base.float() + layer.delta()
    if layer.new_rows:  # a vocabulary the fine-tune grew: its added tokens' rows, stored whole
        tensor = torch.cat([tensor, layer.appended_rows()])
    return tensor.to(dtype)


def _write_weights(base: Checkpoint, artifact: DeltaArtifact, out: Path) -> None:
    layers = artifact.manifest.layers
    unknown = sorted(set(layers) - set(base.tensors) - {n for n, v in layers.items() if v.kind == "replace"})
    if unknown:
        raise ArtifactError(f"{artifact.path}: delta has tensors the base lacks, e.g. {unknown[0]!r}")
    # The delta is small by construction, so it is held whole; base tensors stream.
    deltas = {layer.name: layer for layer in artifact.layers()}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shards = 0, []
    for name, tensor in base.iter_tensors():
        if name in deltas:
            layer = deltas.pop(name)
            tensor = apply_layer_delta(tensor, layer, _stored_dtype(artifact, name))
        shard[name] = tensor.contiguous()
        shard_bytes += tensor.numel() * tensor.element_size()
        if shard_bytes >= SHARD_BYTES:
            shards.append(_flush(shard, out, len(shards)))
            shard, shard_bytes = {}, 0
    for name, layer in deltas.items():  # only new tensors (replace) remain
        shard[name] = apply_layer_delta(None, layer, _stored_dtype(artifact, name))
    if shard or not shards:
        shards.append(_flush(shard, out, len(shards)))
    if len(shards) == 1:
        (out / shards[0][0]).rename(out / SINGLE_FILE)
        return
    weight_map = {name: file for file, names in shards for name in names}
    index = {"metadata": {"total_size": sum((out / f).stat().st_size for f, _ in shards)}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True))


def _stored_dtype(artifact: DeltaArtifact, name: str) -> torch.dtype:
    dtype = artifact.manifest.layers[name].dtype
    if dtype not in DTYPES:
        raise ArtifactError(f"{artifact.path}: layer {name!r} has unknown dtype {dtype!r}")
    return DTYPES[dtype]


def _flush(shard: dict[str, torch.Tensor], out: Path, number: int) -> tuple[str, list[str]]:
    name = f"model-{number + 1:05d}.safetensors"
    write_safetensors(out / name, shard, {"format": "pt"})
    return name, sorted(shard)


def _copy_side_files(base_dir: Path, artifact: DeltaArtifact, out: Path) -> None:
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and path.suffix not in WEIGHT_SUFFIXES and not path.name.endswith(".index.json"):
            shutil.copyfile(path, out / path.name)
    for name in artifact.manifest.files:
        (out / name).write_bytes(artifact.side_file(name))
