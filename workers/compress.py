"""Compress or measure one layer group: read its tensors by reference, write its payload.

Per tensor this is ``osd_core.compress.compress_tensor``, the unit ``compress_checkpoint`` runs
too, so a delta made by the fleet reconstructs to the same weights; the tests hold both paths to
that. What differs is where bytes come from (byte ranges of local files or
S3 objects) and where the payload goes (the object store).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Sequence
from contextlib import closing
from functools import lru_cache

import torch

from osd_core.allocate import layer_config
from osd_core.artifact import encode_payload
from osd_core.calibration_data import GradientFile
from osd_core.compress import allocated, compress_tensor, measure_tensor, pair_delta, resolve_device
from osd_core.config import CompressionConfig
from osd_core.errors import CheckpointError, ConfigError
from osd_core.layer import CompressedLayer
from osd_core.pair_buffers import Pair, PairBuffers, PairRead, read_pairs, reused_for
from osd_io.sources import local_copy
from osd_io.storage import ObjectStore, open_store
from osd_io.uris import is_s3
from workers.jobs import GroupJob, GroupResult, LayerCurve, LayerJob

log = logging.getLogger(__name__)


@lru_cache(maxsize=16)
def store_at(uri: str) -> ObjectStore:
    """One store (and S3 client) per URI and worker process."""
    return open_store(uri)


def compress_group(job: GroupJob, calibration: str | None) -> GroupResult:
    """Compress every tensor of the group and PUT the group's payload; return its record."""
    started = time.perf_counter()
    device = resolve_device(job.device)
    calib = _gradients(job, calibration)
    budgets = dict(job.budgets)
    scratch = PairBuffers()
    encoded = []
    with closing(_pairs(job.group.layers, device)) as pairs:
        for layer, (tuned, base) in zip(job.group.layers, pairs, strict=True):
            compressed, error = compress_layer(layer, tuned, base, job.config, calib, budgets.get(layer.name), device,
                                               scratch)
            encoded.append(
                (compressed, {"role": layer.plan.role.value, "dtype": layer.plan.dtype, "rel_error": round(error, 6)})
            )
    payload = encode_payload(job.group.payload_name, encoded)
    info = store_at(job.store).put_bytes(f"{job.prefix}/{payload.name}", payload.data)
    seconds = time.perf_counter() - started
    log.info("%s: %d tensors, %d payload bytes in %.2f s on %s", job.name, len(encoded), info.size, seconds, device)
    return GroupResult(payload.name, info.sha256 or "", info.size, payload.layers, seconds, str(device))


def measure_group(job: GroupJob, calibration: str | None) -> tuple[LayerCurve, ...]:
    """Damage of each tensor of the group that the job's allocation spends bits on, at its
    candidate budgets (``osd_core.compress.measure_tensor``)."""
    device = resolve_device(job.device)
    calib = _gradients(job, calibration)
    scratch = PairBuffers()
    measured = [layer for layer in job.group.layers if allocated(layer.plan, job.allocation)]
    curves = []
    with closing(_pairs(measured, device)) as pairs:
        for layer, (tuned, base) in zip(measured, pairs, strict=True):
            delta, _ = pair_delta(layer.plan, tuned, _base_of(layer, base), device, _where(layer), scratch)
            curves.append(LayerCurve(layer.name, measure_tensor(layer.plan, delta, job.config, calib, device)))
    return tuple(curves)


def compress_layer(
    layer: LayerJob,
    tuned: torch.Tensor,
    base: torch.Tensor | None,
    config: CompressionConfig,
    calib: GradientFile | None,
    budget: int | None,
    device: torch.device,
    scratch: PairBuffers,
) -> tuple[CompressedLayer, float]:
    """One tensor's compressed record and relative error: ``compress_tensor`` on the pair read by
    reference, as ``compress_checkpoint`` compresses it."""
    if layer.plan.action != "replace":
        base = _base_of(layer, base)
    return compress_tensor(
        layer.plan, tuned, base, layer_config(config, layer.plan.shape, budget), calib, budget_bits=budget,
        device=device, where=_where(layer), scratch=scratch,
    )


def _pairs(layers: Sequence[LayerJob], device: torch.device) -> Generator[Pair, None, None]:
    """The layers' tensor pairs, read as ``read_pairs`` reads: one ahead from an object store or for a GPU."""
    reads = [PairRead(layer.finetuned, layer.base, reused_for(layer.plan.action)) for layer in layers]
    local = not any(is_s3(ref.checkpoint) for layer in layers for ref in (layer.finetuned, layer.base) if ref)
    return read_pairs(reads, device, local=local)


def _base_of(layer: LayerJob, base: torch.Tensor | None) -> torch.Tensor:
    if base is None:
        raise CheckpointError(f"{layer.name}: no base tensor to subtract (planned as {layer.plan.action})")
    return base


def _where(layer: LayerJob) -> tuple[str, str]:
    return layer.finetuned.uri, layer.base.uri if layer.base else "base"


def _gradients(job: GroupJob, uri: str | None) -> GradientFile | None:
    """The calibration output, read lazily from a local (or locally cached) copy."""
    if not job.config.needs_gradients:
        return None
    if uri is None:
        raise ConfigError(f"{job.name}: method {job.config.method!r} needs calibration gradients; none were given")
    return GradientFile(local_copy(uri))
