"""Reused read memory changes no byte of a delta (``osd_core.pair_buffers``), in one process or
in the fleet's workers."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from osd_core.artifact import DeltaArtifact
from osd_core.checkpoint import Checkpoint
from osd_core.compress import compress_checkpoint, compress_tensor, plan_pair
from osd_core.config import CompressionConfig
from osd_core.pair_buffers import PairBuffers
from osd_io.sources import tensor_refs
from tests.conftest import write_bert_like
from workers.compress import compress_layer
from workers.jobs import LayerJob


def as_dtype(directory, dtype):
    path = directory / "model.safetensors"
    save_file({name: t.to(dtype) for name, t in load_file(path).items()}, str(path))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_delta_read_through_reused_memory_equals_one_read_fresh(tmp_path, dtype):
    # Matrices of three sizes, in file order small and large alternately: a slot grows and is reused.
    base_state = write_bert_like(tmp_path / "base", layers=2, hidden=48, intermediate=96, vocab=70, seed=0)
    write_bert_like(tmp_path / "ft", layers=2, hidden=48, intermediate=96, vocab=70, seed=1, base=base_state)
    for directory in (tmp_path / "base", tmp_path / "ft"):
        as_dtype(directory, dtype)
    config = CompressionConfig(method="magtruncsvd", rank=2)
    compress_checkpoint(tmp_path / "base", tmp_path / "ft", tmp_path / "delta", config, device="cpu")
    stored = {layer.name: layer for layer in DeltaArtifact.open(tmp_path / "delta").layers()}

    base, tuned = Checkpoint.open(tmp_path / "base"), Checkpoint.open(tmp_path / "ft")
    factorised = 0
    for plan in plan_pair(base, tuned, config):
        if plan.action != "factorise":
            continue
        fresh, _ = compress_tensor(plan, tuned.load(plan.name), base.load(plan.name), config, None)
        assert torch.equal(stored[plan.name].delta(), fresh.delta()), plan.name
        factorised += 1
    assert factorised == 13  # the embedding and 6 matrices a layer

    # A worker reads by reference into one set of buffers per layer group: here, the whole model.
    buffers, tuned_refs, base_refs = PairBuffers(), tensor_refs(tuned), tensor_refs(base)
    for plan in plan_pair(base, tuned, config):
        if plan.action == "copy":
            continue
        job = LayerJob(plan, tuned_refs[plan.name], base_refs[plan.name])
        layer, _ = compress_layer(job, config, None, None, torch.device("cpu"), buffers)
        assert torch.equal(stored[plan.name].delta(), layer.delta()), plan.name


def test_a_slot_holds_the_last_tensor_read_into_it_and_grows_to_the_largest(tmp_path):
    write_bert_like(tmp_path / "m", layers=1, hidden=8, intermediate=16, vocab=12, seed=0)
    checkpoint = Checkpoint.open(tmp_path / "m")
    buffers = PairBuffers()
    small = buffers.load("a", checkpoint, "bert.encoder.layer.0.attention.self.query.weight")
    assert torch.equal(small, checkpoint.load("bert.encoder.layer.0.attention.self.query.weight"))
    large = buffers.load("a", checkpoint, "bert.encoder.layer.0.intermediate.dense.weight")
    assert torch.equal(large, checkpoint.load("bert.encoder.layer.0.intermediate.dense.weight"))
    again = buffers.load("a", checkpoint, "bert.encoder.layer.0.attention.self.key.weight")
    assert again.data_ptr() == large.data_ptr()  # the grown memory, reused
    assert torch.equal(again, checkpoint.load("bert.encoder.layer.0.attention.self.key.weight"))
    delta = buffers.delta((16, 8))
    assert delta.dtype == torch.float32 and delta.shape == (16, 8)
